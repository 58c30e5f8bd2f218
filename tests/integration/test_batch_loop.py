"""The transactional batch loop against the real broker: a fatal producer error (what a
broker restart that timed our transaction out leaves behind) replaces both clients, and the
batch is processed again with every input yielding its output exactly once; a stalled
partition is re-read; a loop that stops turning is reported by its process watchdog."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from stages.ops.audit import read_topic
from stages.shared.batch_loop import RetryBatch, TransactionalBatchLoop
from stages.shared.kafka import Output, StopFlag, ensure_topics, producer_config
from stages.shared.settings import Settings
from stages.shared.watchdog import watch_loop, watch_loops_in_this_process

pytestmark = pytest.mark.integration


class _FailOnce:
    """A producer whose first commit fails with a fatal error after producing the batch, its
    transaction aborted on the broker (as when the broker restarted and timed it out)."""

    def __init__(self, real: Producer, failed: list[bool]) -> None:
        self._real = real
        self._failed = failed

    def commit_transaction(self, *args: Any) -> None:
        if not self._failed:
            self._failed.append(True)
            # The broker's side of it: the transaction is gone (aborted, as its timeout does).
            self._real.abort_transaction(10)
            raise KafkaException(
                KafkaError(KafkaError._FENCED, "injected: producer fenced", fatal=True)
            )
        self._real.commit_transaction(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _Loop(TransactionalBatchLoop):
    failed: list[bool]

    def _open(self) -> None:
        super()._open()
        self._producer = _FailOnce(self._producer, self.failed)  # type: ignore[arg-type,assignment]


def _input(settings: Settings, n: int) -> tuple[str, str]:
    """The test's input topic holding ``n`` records (values 0..n-1), and its output topic."""
    src, dst = settings.topics.name("transactions"), settings.topics.name("enriched")
    ensure_topics(settings.kafka, settings.topics, [src, dst])
    producer = Producer(producer_config(settings.kafka))
    for i in range(n):
        producer.produce(src, key=b"%d" % i, value=b"%d" % i)
    assert producer.flush(30) == 0
    return src, dst


def _marked(dst: str, msgs: list[Message]) -> list[Output]:
    """What the loops below output for ``msgs``: each value with a ``!``, to ``dst``."""
    return [Output(dst, m.key(), m.value() + b"!") for m in msgs]


def _outputs(settings: Settings, dst: str) -> list[int]:
    """The committed outputs of :func:`_marked`, as sorted ints."""
    return sorted(int(v[:-1]) for _, v, _ in read_topic(settings, dst) if v)


L = TypeVar("L", bound=TransactionalBatchLoop)


def _loop(
    cls: type[L],
    settings: Settings,
    src: str,
    handler: Callable[[list[Message]], list[Output]],
    **options: Any,
) -> L:
    """A loop of ``cls`` in group ``loop`` over ``src``, running ``handler``."""
    return cls(
        settings,
        group_id=settings.topics.group("loop"),
        input_topics=[src],
        handler=handler,
        stage="test",
        **options,
    )


def test_fatal_producer_error_gets_new_clients_and_loses_nothing(unique_topics: Settings) -> None:
    settings = unique_topics
    n = 300
    src, dst = _input(settings, n)

    loop = _loop(_Loop, settings, src, lambda msgs: _marked(dst, msgs), max_batch=50, max_wait_ms=5)
    loop.failed = []
    stats = loop.run(StopFlag(), max_idle_s=5.0)

    assert loop.failed == [True]
    assert stats.restarts == 1
    # Each exactly once, the failed batch's included.
    assert _outputs(settings, dst) == list(range(n))


class _OffsetsFailOnce:
    """A producer whose first ``send_offsets_to_transaction`` fails with an abortable
    (non-fatal) error: the batch's transaction must be aborted and the batch read again."""

    def __init__(self, real: Producer, failed: list[bool]) -> None:
        self._real = real
        self._failed = failed

    def send_offsets_to_transaction(self, *args: Any) -> None:
        if not self._failed:
            self._failed.append(True)
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "injected: offsets timed out"))
        self._real.send_offsets_to_transaction(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _OffsetsLoop(TransactionalBatchLoop):
    failed: list[bool]

    def _open(self) -> None:
        super()._open()
        self._producer = _OffsetsFailOnce(self._producer, self.failed)  # type: ignore[arg-type,assignment]


def _overlap(settings: Settings, on: bool) -> Settings:
    return settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"overlap_commit": on})}
    )


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "serial"])
def test_backpressure_and_failed_offsets_rewind_the_batch_exactly_once(
    unique_topics: Settings, overlap: bool
) -> None:
    """The handler's RetryBatch (a dependency down) and a failed offsets call, with the
    transaction's offsets sent while the handler runs or after it: each batch is read
    again and every input yields its output exactly once."""
    settings = _overlap(unique_topics, overlap)
    n = 400
    src, dst = _input(settings, n)
    calls = {"n": 0}

    def handler(msgs: list[Message]) -> list[Output]:
        calls["n"] += 1
        if calls["n"] in (2, 3, 7):
            raise RetryBatch("injected: dependency down", retry_after_s=0.05)
        return _marked(dst, msgs)

    loop = _loop(_OffsetsLoop, settings, src, handler, max_batch=40, max_wait_ms=5)
    loop.failed = []
    stats = loop.run(StopFlag(), max_idle_s=5.0)

    assert loop.failed == [True]
    assert stats.errors.count("injected: dependency down") == 3
    assert stats.aborted == 1  # the failed offsets call; backpressure is no failure
    assert stats.restarts == 0
    assert stats.messages == n
    assert _outputs(settings, dst) == list(range(n))


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "serial"])
def test_each_commit_step_is_timed_once_per_transaction(
    unique_topics: Settings, overlap: bool
) -> None:
    """Every committed transaction reports the loop's wait for its offsets, for its outputs'
    acknowledgement and for EndTxn (rtpipe_commit_phase_seconds), once each and in that
    order; a batch handed back by its handler is not a commit and reports nothing."""
    settings = _overlap(unique_topics, overlap)
    n = 120
    src, dst = _input(settings, n)
    phases: list[tuple[str, float]] = []
    calls = {"n": 0}

    def handler(msgs: list[Message]) -> list[Output]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RetryBatch("injected: dependency down", retry_after_s=0.05)
        return _marked(dst, msgs)

    loop = _loop(
        TransactionalBatchLoop,
        settings,
        src,
        handler,
        max_batch=20,
        max_wait_ms=5,
        on_commit_phase=lambda phase, seconds: phases.append((phase, seconds)),
    )
    stats = loop.run(StopFlag(), max_idle_s=5.0)

    assert stats.messages == n
    assert _outputs(settings, dst) == list(range(n))
    assert stats.batches >= n // 20
    assert [p for p, _ in phases] == ["offsets", "flush", "end_txn"] * stats.batches
    assert all(seconds >= 0 for _, seconds in phases)


@pytest.mark.parametrize("where", ["handler", "outputs"])
def test_a_batch_whose_handler_or_outputs_fail_is_not_committed(
    unique_topics: Settings, where: str
) -> None:
    """A defect ends the loop mid-transaction (the batch's offsets already sent): nothing of
    that batch is committed on the way out, and the next loop outputs every input once."""
    settings = _overlap(unique_topics, True)
    n = 200
    src, dst = _input(settings, n)
    calls = {"n": 0}

    def broken(msgs: list[Message]) -> list[Output]:
        calls["n"] += 1
        if calls["n"] == 3:
            if where == "handler":
                raise ValueError("injected defect")
            # An output the producer refuses (a value that is not bytes) after good ones.
            return [*_marked(dst, msgs[:-1]), Output(dst, None, 12345)]  # type: ignore[arg-type]
        return _marked(dst, msgs)

    first = _loop(TransactionalBatchLoop, settings, src, broken, max_batch=20, max_wait_ms=5)
    with pytest.raises((ValueError, TypeError)):
        first.run(StopFlag(), max_idle_s=5.0)
    assert first.stats.messages == 40  # the two batches before the defect

    again = _loop(
        TransactionalBatchLoop,
        settings,
        src,
        lambda msgs: _marked(dst, msgs),
        max_batch=20,
        max_wait_ms=5,
    )
    again.run(StopFlag(), max_idle_s=5.0)
    assert _outputs(settings, dst) == list(range(n))


def test_a_stalled_partition_is_detected_counted_and_re_read(unique_topics: Settings) -> None:
    # A partition paused and never resumed (what quixstreams' backpressure left behind in
    # issue #15, here injected): lag and no progress. The loop counts it, re-reads it from
    # the committed offset, and every input still yields its output exactly once.
    settings = unique_topics.model_copy(update={"stall_timeout_s": 1.5})
    n = 400
    src, dst = _input(settings, n)
    stalls: list[tuple[str, int, int]] = []
    paused: list[int] = []

    def handler(msgs: list[Message]) -> list[Output]:
        if not paused:
            # The bug: after this batch, the partition is never fetched again.
            part = msgs[0].partition()
            paused.append(part)
            loop._consumer.pause([TopicPartition(src, part)])  # type: ignore[union-attr]
        return _marked(dst, msgs)

    loop = _loop(
        TransactionalBatchLoop,
        settings,
        src,
        handler,
        max_batch=20,
        max_wait_ms=0,
        lag_interval_s=0.5,
        on_stall=lambda topic, part, offset: stalls.append((topic, part, offset)),
    )
    stats = loop.run(StopFlag(), max_idle_s=6.0)

    assert stats.restarts == 0
    assert [(t, p) for t, p, _ in stalls] == [(src, paused[0])]
    assert _outputs(settings, dst) == list(range(n))


def test_a_loop_that_stops_turning_is_reported_by_its_process_watchdog(
    unique_topics: Settings,
) -> None:
    # In a stage process the report restarts the process (stages/shared/watchdog.py); here
    # it is recorded. A loop that turns (batches, idle polls) never trips it; one blocked
    # for longer than the timeout (here in its handler; in the chaos runs inside librdkafka)
    # trips it once, naming the loop.
    settings = unique_topics
    n = 200
    src, dst = _input(settings, n)
    reports: list[tuple[str, float, float]] = []
    blocked_at: list[float] = []

    def on_stuck(what: str, stop: StopFlag) -> Callable[[float], None]:
        return lambda idle_s: reports.append((what, idle_s, time.monotonic()))

    def handler(msgs: list[Message]) -> list[Output]:
        if len(handled) == 3:
            blocked_at.append(time.monotonic())
            time.sleep(4.0)
        handled.append(len(msgs))
        return _marked(dst, msgs)

    handled: list[int] = []
    watch_loops_in_this_process(1.0, on_stuck)
    try:
        loop = _loop(TransactionalBatchLoop, settings, src, handler, max_batch=20, max_wait_ms=0)
        stats = loop.run(StopFlag(), max_idle_s=4.0)
    finally:
        watch_loops_in_this_process(None)

    assert stats.restarts == 0
    assert len(reports) == 1, reports
    what, idle_s, at = reports[0]
    assert what == "test" and idle_s >= 1.0
    assert blocked_at and blocked_at[0] < at < blocked_at[0] + 4.0
    # Off again: a new loop has no watchdog.
    assert watch_loop("test", StopFlag()) is None
    assert _outputs(settings, dst) == list(range(n))
