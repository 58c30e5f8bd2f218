"""RetryingBatchingSink on its own (fake clock): retries in place, bounded, never hands
SinkBackpressureError to quixstreams. The broker-backed behaviour is in
tests/integration/test_sink_backpressure.py."""

from __future__ import annotations

import threading
import time

import pytest
from quixstreams.sinks.base import SinkBackpressureError, SinkBatch

from stages.enrichment.backpressure import RetryingBatchingSink, SinkUnavailableError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Sink(RetryingBatchingSink):
    def __init__(
        self,
        clock: Clock,
        fail_times: int,
        error: Exception | None = None,
        *,
        overlap: bool = False,
        gate: threading.Event | None = None,
    ) -> None:
        super().__init__(
            retry_budget_s=5.0,
            first_delay_s=0.1,
            max_delay_s=1.0,
            clock=clock,
            sleep=clock.sleep,
            overlap=overlap,
        )
        self.fail_times = fail_times
        self.error = error or SinkBackpressureError(retry_after=1.0)
        self.writes: list[tuple[int, list[int]]] = []
        # Set: a write may go on (an overlapped flush's worker waits for it).
        self.gate = gate
        self.threads: set[str] = set()

    def write(self, batch: SinkBatch) -> None:
        self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            assert self.gate.wait(10), "the test never let the write go on"
        if self.fail_times > 0:
            self.fail_times -= 1
            raise self.error
        self.writes.append((batch.partition, [item.value for item in batch]))


def _add(sink: Sink, partition: int, values: list[int]) -> None:
    for offset, v in enumerate(values):
        sink.add(v, None, 0, [], "t", partition, offset)


def test_retries_in_place_with_backoff_then_writes_every_batch_once() -> None:
    clock = Clock()
    sink = Sink(clock, fail_times=6)
    _add(sink, 0, [1, 2])
    _add(sink, 1, [3])
    sink.flush()
    assert sink.writes == [(0, [1, 2]), (1, [3])]
    assert clock.sleeps == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert sink.total_retries == 6 and sink.retries == 0
    sink.flush()  # batches were dropped after the flush
    assert len(sink.writes) == 2


def test_out_of_budget_raises_a_fatal_error_not_backpressure() -> None:
    clock = Clock()
    sink = Sink(clock, fail_times=1_000)
    _add(sink, 0, [1])
    with pytest.raises(SinkUnavailableError) as info:
        sink.flush()
    assert not isinstance(info.value, SinkBackpressureError)
    assert isinstance(info.value.__cause__, SinkBackpressureError)
    assert clock.now == pytest.approx(5.0)  # the budget, not more
    assert sink.writes == []
    sink.flush()  # the failed batch is not kept: quixstreams re-reads it
    assert sink.writes == []


def test_other_errors_are_not_retried() -> None:
    clock = Clock()
    sink = Sink(clock, fail_times=1, error=ValueError("bad row"))
    _add(sink, 0, [1])
    with pytest.raises(ValueError, match="bad row"):
        sink.flush()
    assert clock.sleeps == []


def test_an_overlapped_flush_returns_before_the_write_and_wait_flushed_waits_for_it() -> None:
    gate = threading.Event()
    sink = Sink(Clock(), fail_times=0, overlap=True, gate=gate)
    _add(sink, 0, [1, 2])
    _add(sink, 1, [3])
    sink.flush()  # returns while the write is held at the gate
    assert sink.writes == []
    _add(sink, 0, [4])  # the next checkpoint's rows are not part of the pending write
    gate.set()
    sink.wait_flushed()
    assert sink.writes == [(0, [1, 2]), (1, [3])]
    assert threading.current_thread().name not in sink.threads
    sink.wait_flushed()  # nothing pending: returns at once
    sink.flush()
    sink.wait_flushed()
    assert sink.writes == [(0, [1, 2]), (1, [3]), (0, [4])]


def test_an_overlapped_flush_raises_the_writes_failure_from_wait_flushed() -> None:
    clock = Clock()
    sink = Sink(clock, fail_times=1_000, overlap=True)
    _add(sink, 0, [1])
    sink.flush()
    with pytest.raises(SinkUnavailableError, match=r"t\[0\], 1 records"):
        sink.wait_flushed()
    assert sink.writes == []


def test_a_flush_first_waits_for_the_write_of_a_checkpoint_that_never_committed() -> None:
    gate = threading.Event()
    sink = Sink(Clock(), fail_times=0, overlap=True, gate=gate)
    _add(sink, 0, [1])
    sink.flush()
    _add(sink, 0, [2])
    threading.Timer(0.2, gate.set).start()
    began = time.monotonic()
    sink.flush()  # waits for [1] before it hands [2] over: one write at a time, in order
    assert time.monotonic() - began >= 0.15
    assert sink.writes[:1] == [(0, [1])]
    sink.wait_flushed()
    assert sink.writes == [(0, [1]), (0, [2])]
