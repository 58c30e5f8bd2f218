"""The transactional micro-batch loop of the prediction, routing, evaluation stages and of
the enrichment stage's labels process: consume a batch, produce its outputs and commit its
input offsets in one Kafka transaction; recover from aborts, fencing and broker restarts by
re-reading from the committed offsets.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from stages.shared.errors import RtpipeError
from stages.shared.kafka import (
    TRANSACTIONAL_LINGER_MS,
    TRANSACTIONAL_RETRY_BACKOFF,
    Output,
    StopFlag,
    consumer_config,
    producer_config,
    static_member_config,
)
from stages.shared.metrics import Assignment
from stages.shared.settings import Settings
from stages.shared.stall import StallWatch
from stages.shared.txn import (
    CONSUMER_CLOSE_TIMEOUT_S,
    close_consumer,
    is_fatal,
    replacement_error,
    txn_failure_action,
)
from stages.shared.watchdog import LoopWatchdog, watch_loop

logger = logging.getLogger(__name__)

# A stage's transactions are open only while it produces and commits one batch (well under
# a second). A stage killed mid-transaction leaves it open until this timeout, and until the
# broker aborts it, read_committed readers of its output partitions and the offset fetch of
# its successor wait: librdkafka's 60 s default turned each crash into a minute-long stall.
BATCH_TRANSACTION_TIMEOUT_MS = 10_000
# How long the batch loop waits for a first message before it checks its stop flag again.
IDLE_POLL_S = 0.1
# The longest the timed flush before a commit waits (the commit waits for the rest).
FLUSH_BEFORE_COMMIT_S = 5.0


class RetryBatch(RtpipeError):
    """Raised by a batch handler when a dependency is down: the batch is rewound and
    retried after ``retry_after_s`` (backpressure) instead of being dropped or misrouted."""

    def __init__(self, reason: str, retry_after_s: float = 1.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


BatchHandler = Callable[[list[Message]], list[Output]]


@dataclass
class LoopStats:
    batches: int = 0
    messages: int = 0
    outputs: int = 0
    aborted: int = 0
    last_batch_size: int = 0
    rebalances: int = 0
    # Times the loop replaced its clients after a fatal error.
    restarts: int = 0
    errors: list[str] = field(default_factory=list)


class TransactionalBatchLoop:
    """Consume micro-batches, produce their outputs and commit the input offsets in one
    Kafka transaction, so each input yields its outputs exactly once for read_committed
    readers, including across crashes and rebalances.

    Batches form naturally: the loop waits for a first message, then takes whatever else has
    already been fetched, waiting at most ``max_wait_ms`` more for the batch to reach
    ``max_batch``. A lone event is not held for a fixed window, and under load batches grow
    by themselves while the previous one is being processed and committed.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        group_id: str,
        input_topics: Sequence[str],
        handler: BatchHandler,
        max_batch: int,
        max_wait_ms: int,
        stage: str,
        on_batch_done: Callable[[int, float], None] | None = None,
        on_rebalance: Callable[[str, list[TopicPartition]], None] | None = None,
        on_lag: Callable[[str, int, int, int], None] | None = None,
        lag_interval_s: float = 5.0,
        on_idle: Callable[[], None] | None = None,
        commit_interval_ms: int = 0,
        on_stall: Callable[[str, int, int], None] | None = None,
        assignment: Assignment | None = None,
        on_commit_phase: Callable[[str, float], None] | None = None,
    ) -> None:
        self._settings = settings
        self._group_id = group_id
        self._input_topics = list(input_topics)
        self._handler = handler
        self._max_batch = max_batch
        self._max_wait_s = max_wait_ms / 1000.0
        self._stage = stage
        self._on_batch_done = on_batch_done
        # Told how long each commit step was waited for (stages/shared/metrics.COMMIT_PHASES).
        self._on_commit_phase = on_commit_phase
        self._on_rebalance = on_rebalance
        self._on_lag = on_lag
        self._lag_interval_s = lag_interval_s
        # Called (outside any transaction) whenever a poll brings no input, so periodic work
        # such as loading a newly promoted model happens while the stage is idle too.
        self._on_idle = on_idle
        self._next_lag = 0.0
        # Partitions with lag that do not move (stages/shared/stall.py); checked with the lag.
        self._stalls = StallWatch(settings.stall_timeout_s)
        self._on_stall = on_stall
        # The partitions held, for readiness (rtpipe_assigned_partitions).
        self._assignment = assignment
        # 0: one transaction per batch. Otherwise batches share a transaction until it is
        # this old (or the input is drained, or partitions are revoked): for a handler whose
        # effect that matters happens before the commit (the labels process writes Redis),
        # fewer transactions cost the broker less and put no commit in front of the next
        # batch.
        self._commit_interval_s = commit_interval_ms / 1000.0
        # One transaction per batch: its offsets are known as soon as the batch is read, so
        # they go to the coordinators on this worker while the handler runs (KafkaSettings.
        # overlap_commit); the commit then waits only for EndTxn.
        self._overlap = settings.kafka.overlap_commit and commit_interval_ms == 0
        self._offsets_worker: ThreadPoolExecutor | None = None
        self._txn_msgs: list[Message] = []
        self._txn_outputs = 0
        self._txn_started = 0.0
        self.stats = LoopStats()
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._stop: StopFlag | None = None
        self._watchdog: LoopWatchdog | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def _open(self) -> None:
        kafka = self._settings.kafka
        extra: dict[str, Any] = {"max.partition.fetch.bytes": 4 * 1024 * 1024}
        instance = self._settings.instance_name(self._group_id)
        if instance:
            extra.update(static_member_config(instance))
        self._consumer = Consumer(consumer_config(kafka, self._group_id, **extra))
        txn_id = instance or (
            f"{self._group_id}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        self._producer = Producer(
            producer_config(
                kafka,
                **{
                    "transactional.id": txn_id,
                    "transaction.timeout.ms": BATCH_TRANSACTION_TIMEOUT_MS,
                    "linger.ms": TRANSACTIONAL_LINGER_MS,
                    **TRANSACTIONAL_RETRY_BACKOFF,
                },
            )
        )
        self._producer.init_transactions(30)
        self._consumer.subscribe(
            self._input_topics,
            on_assign=self._assigned,
            on_revoke=self._revoked,
            on_lost=self._lost,
        )

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if consumer is not self._consumer:  # a discarded consumer, closing
            return
        self.stats.rebalances += 1
        if self._assignment is not None:
            self._assignment.assigned(partitions)
        self._rebalanced("assign", partitions)

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # With one transaction per batch none is open here: every batch is committed or
        # aborted before the next consume(), the only place this callback runs. A shared
        # transaction is committed now, while this member still owns the partitions.
        if consumer is not self._consumer:  # a discarded consumer, closing
            return
        self._commit_open()
        if self._assignment is not None:
            self._assignment.revoked(partitions)
        self._rebalanced("revoke", partitions)

    def _rebalanced(self, kind: str, partitions: list[TopicPartition]) -> None:
        done = "assigned" if kind == "assign" else "revoked"
        logger.info("%s %s %s", self._stage, done, [(p.topic, p.partition) for p in partitions])
        if self._on_rebalance:
            self._on_rebalance(kind, partitions)

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member owns them already: what is open must not commit.
        if consumer is not self._consumer:  # a discarded consumer, closing
            return
        if self._txn_msgs and self._producer is not None:
            logger.warning("%s partitions lost; aborting the open transaction", self._stage)
            msgs, self._txn_msgs = self._txn_msgs, []
            try:
                self._producer.abort_transaction(30)
            except KafkaException as exc:
                logger.warning("%s abort after lost partitions: %s", self._stage, exc)
            self._rewind(msgs)
        self._revoked(consumer, partitions)

    def close(self) -> None:
        try:
            self._commit_open()
        except KafkaException as exc:
            # Aborted by the broker; the next owner re-reads from the committed offsets.
            logger.warning("%s final commit failed: %s", self._stage, exc)
        if self._consumer is not None:
            # Still ours while it closes: its revoke callback commits what is open.
            close_consumer(self._consumer, self._stage, CONSUMER_CLOSE_TIMEOUT_S)
            self._consumer = None
            if self._assignment is not None:
                self._assignment.clear()
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None
        if self._offsets_worker is not None:
            self._offsets_worker.shutdown(wait=False)
            self._offsets_worker = None

    # -- the loop ----------------------------------------------------------------------------
    def run(self, stop: StopFlag, max_idle_s: float | None = None) -> LoopStats:
        """Run until ``stop`` is set (or ``max_idle_s`` passes with no input, for tests).

        A fatal client error (the broker timed our transaction out while it was down, or
        fenced us after a rebalance) leaves the producer unusable: the loop closes both
        clients and opens new ones, which resume from the group's committed offsets (the
        unfinished batch is processed again; its transaction was never committed).
        """
        self._stop = stop
        self._watchdog = watch_loop(self._stage, stop)
        idle_since = time.monotonic()
        backoff_s = 1.0
        try:
            # Inside the try: clients that fail to open are closed, and the watchdog stopped.
            self._open()
            while not stop.is_set():
                self._beat()
                try:
                    self._report_lag()
                    msgs = [m for m in self._next_batch() if self._usable(m)]
                    if not msgs:
                        self._commit_open()
                        if self._on_idle is not None:
                            self._on_idle()
                        if max_idle_s is not None and time.monotonic() - idle_since > max_idle_s:
                            break
                        continue
                    idle_since = time.monotonic()
                    self._process(msgs)
                    backoff_s = 1.0
                except KafkaException as exc:
                    if not is_fatal(exc):
                        raise
                    self.stats.restarts += 1
                    logger.error(
                        "%s fatal Kafka error (%s); new clients in %.0fs",
                        self._stage,
                        exc.args[0],
                        backoff_s,
                    )
                    self._discard()
                    backoff_s = self._reopen(stop, backoff_s)
        finally:
            self.close()
            if self._watchdog is not None:
                self._watchdog.stop()
        return self.stats

    def _beat(self) -> None:
        """The loop turns (or a call that may block returned): its watchdog, if this
        process has one, stays quiet (stages/shared/watchdog.py)."""
        if self._watchdog is not None:
            self._watchdog.beat()

    def _reopen(self, stop: StopFlag, backoff_s: float) -> float:
        """New clients after ``backoff_s``, retrying (with growing backoff) while the broker
        cannot give the producer its transactional id yet. Returns the next backoff."""
        while not stop.wait(backoff_s):
            self._beat()
            backoff_s = min(backoff_s * 2, 30.0)
            try:
                self._open()
                return backoff_s
            except KafkaException as exc:
                logger.warning("%s clients not ready (%s); retrying", self._stage, exc.args[0])
                self._discard()
        return backoff_s

    def _discard(self) -> None:
        """Drop both clients after a fatal error (nothing left to flush or commit). A
        transaction the broker still holds open is aborted by its timeout
        (``BATCH_TRANSACTION_TIMEOUT_MS``), until when read_committed readers of its partitions
        wait."""
        consumer, self._consumer = self._consumer, None
        self._producer = None
        self._txn_msgs, self._txn_outputs = [], 0
        if self._assignment is not None:
            self._assignment.clear()
        if consumer is not None:
            close_consumer(consumer, self._stage, CONSUMER_CLOSE_TIMEOUT_S)

    def _next_batch(self) -> list[Message]:
        assert self._consumer is not None
        first = self._consumer.poll(IDLE_POLL_S)
        if first is None:
            return []
        if self._max_batch == 1:
            return [first]
        # consume() returns when it has this many messages or when the wait is over.
        return [first, *self._consumer.consume(self._max_batch - 1, self._max_wait_s)]

    def _report_lag(self) -> None:
        """Lag per assigned partition: high watermark minus our position. (librdkafka's
        own ``consumer_lag`` stays unknown when offsets are committed through producer
        transactions.)"""
        if self._consumer is None:
            return
        now = time.monotonic()
        if now < self._next_lag:
            return
        self._next_lag = now + self._lag_interval_s
        assigned = self._consumer.assignment()
        if not assigned:
            return
        stalled = []
        for tp in self._consumer.position(assigned):
            # The high watermark the last fetch response carried: asking the broker instead
            # (one round trip per partition) held up the batches behind it, the stages' p99.
            try:
                _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if tp.offset >= 0 and high >= 0 and self._on_lag is not None:
                self._on_lag(tp.topic, tp.partition, max(0, high - tp.offset), tp.offset)
            if self._stalls.observe((tp.topic, tp.partition), tp.offset, high):
                stalled.append(tp)
        if stalled:
            self._recover_stalled(stalled)

    def _recover_stalled(self, stalled: list[TopicPartition]) -> None:
        """Re-read stalled partitions from their committed offsets (resumed, if something
        paused them): what was not committed is processed again, exactly once."""
        assert self._consumer is not None
        self._commit_open()
        for tp in stalled:
            logger.error(
                "%s partition %s[%d]@%d stalled: lag and no progress for %.0fs; re-reading "
                "from its committed offset",
                self._stage,
                tp.topic,
                tp.partition,
                tp.offset,
                self._stalls.timeout_s,
            )
            if self._on_stall is not None:
                self._on_stall(tp.topic, tp.partition, tp.offset)
        parts = [TopicPartition(tp.topic, tp.partition) for tp in stalled]
        self._consumer.resume(parts)
        for tp in self._consumer.committed(parts, timeout=10):
            offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            self._consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        self._stalls.forget([(tp.topic, tp.partition) for tp in stalled])

    def _usable(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if err.code() == KafkaError._PARTITION_EOF:
            return False
        if err.fatal() or err.code() == KafkaError._FATAL:
            raise KafkaException(err)
        logger.warning("%s consumer error: %s", self._stage, err)
        return False

    def _process(self, msgs: list[Message]) -> None:
        if self._overlap:
            self._process_overlapped(msgs)
            return
        assert self._consumer is not None and self._producer is not None
        started = time.perf_counter()
        try:
            outputs = self._handler(msgs)
        except RetryBatch as exc:
            self._back_off(exc, msgs)
            return
        producer = self._producer
        try:
            if not self._txn_msgs:
                producer.begin_transaction()
                self._txn_started = time.monotonic()
            self._txn_msgs.extend(msgs)
            self._txn_outputs += len(outputs)
            for out in outputs:
                self._produce(out)
            if time.monotonic() - self._txn_started >= self._commit_interval_s:
                self._commit_txn()
        except KafkaException as exc:
            pending, self._txn_msgs, self._txn_outputs = self._txn_msgs, [], 0
            self._recover(exc, pending)
            return
        if self._on_batch_done:
            self._on_batch_done(len(msgs), time.perf_counter() - started)

    def _process_overlapped(self, msgs: list[Message]) -> None:
        """One batch in one transaction, its offsets sent while the handler runs.

        The transaction is begun and the offsets are handed to the worker before the
        handler is called; the outputs are produced into the same transaction, and the
        commit waits for the offsets first. Every path that ends the transaction early (the
        handler's backpressure, a failed call) waits for the worker before it aborts: two
        transactional calls at once conflict.
        """
        assert self._consumer is not None and self._producer is not None
        started = time.perf_counter()
        producer = self._producer
        try:
            producer.begin_transaction()
        except KafkaException as exc:
            self._recover(exc, msgs)
            return
        self._txn_started = time.monotonic()
        self._txn_msgs, self._txn_outputs = list(msgs), 0
        sent = self._send_offsets_async(msgs)
        try:
            outputs = self._handler(msgs)
        except RetryBatch as exc:
            self._txn_msgs = []
            self._end_early(sent, msgs)
            self._back_off(exc, msgs, rewound=True)
            return
        except BaseException:
            self._abandon(sent)
            raise
        try:
            self._txn_outputs = len(outputs)
            for out in outputs:
                self._produce(out)
            self._beat()
            began = time.perf_counter()
            sent.result()
            self._timed("offsets", began)
            self._beat()
            self._flush_outputs()
            began = time.perf_counter()
            self._complete("commit")
            self._timed("end_txn", began)
            self._count_committed()
        except KafkaException as exc:
            self._await(sent)
            pending, self._txn_msgs, self._txn_outputs = self._txn_msgs, [], 0
            self._recover(exc, pending)
            return
        except BaseException:
            self._abandon(sent)
            raise
        if self._on_batch_done:
            self._on_batch_done(len(msgs), time.perf_counter() - started)

    def _send_offsets_async(self, msgs: list[Message]) -> Future[None]:
        """``send_offsets_to_transaction`` for ``msgs`` on the worker thread (librdkafka
        releases the GIL while it waits for the coordinators)."""
        assert self._consumer is not None and self._producer is not None
        if self._offsets_worker is None:
            self._offsets_worker = ThreadPoolExecutor(1, f"{self._stage}-offsets")
        return self._offsets_worker.submit(
            self._producer.send_offsets_to_transaction,
            self._next_offsets(msgs),
            self._consumer.consumer_group_metadata(),
            30,
        )

    def _await(self, sent: Future[None]) -> KafkaException | None:
        """Wait for the worker's call; its Kafka error, if any (the caller is already
        ending the transaction because of another failure)."""
        try:
            sent.result()
        except KafkaException as exc:
            return exc
        finally:
            self._beat()
        return None

    def _abandon(self, sent: Future[None]) -> None:
        """A defect (or an interrupt) stops the stage mid-transaction. Nothing of the batch
        may be committed on the way out (``close()`` commits an open transaction: here, the
        batch's offsets without all of its outputs), so the transaction is aborted."""
        self._txn_msgs, self._txn_outputs = [], 0
        self._await(sent)
        if self._producer is not None:
            try:
                self._producer.abort_transaction(10)
            except KafkaException as exc:
                # The broker aborts it by its timeout; the next owner starts from the
                # committed offsets either way.
                logger.warning("%s abort after a failed batch: %s", self._stage, exc)

    def _end_early(self, sent: Future[None], msgs: list[Message]) -> None:
        """Abort the batch's transaction once the worker is done, and rewind the batch."""
        exc = self._await(sent)
        if exc is not None and is_fatal(exc):
            raise exc
        # Not counted in stats.aborted (failed transactions): nothing failed.
        self._complete("abort")
        self._rewind(msgs)

    def _back_off(self, exc: RetryBatch, msgs: list[Message], *, rewound: bool = False) -> None:
        """The handler's dependency is down: rewind the batch and pause before retrying."""
        logger.warning(
            "%s backpressure (%s): pausing %.1fs and retrying %d messages",
            self._stage,
            exc.reason,
            exc.retry_after_s,
            len(msgs),
        )
        self.stats.errors.append(exc.reason)
        self._stalls.dependency_down()
        if not rewound:
            self._rewind(msgs)
        time.sleep(exc.retry_after_s)

    def _commit_txn(self) -> None:
        """Commit the open transaction with the offsets after its batches."""
        assert self._consumer is not None and self._producer is not None
        msgs = self._txn_msgs
        self._beat()
        began = time.perf_counter()
        self._producer.send_offsets_to_transaction(
            self._next_offsets(msgs), self._consumer.consumer_group_metadata(), 30
        )
        self._timed("offsets", began)
        self._flush_outputs()
        began = time.perf_counter()
        self._complete("commit")
        self._timed("end_txn", began)
        self._count_committed()

    def _flush_outputs(self) -> None:
        """Wait for the open transaction's outputs to be acknowledged before it commits
        (``commit_transaction`` flushes them first anyway; here that wait is timed on its
        own). What is still unacknowledged after the timeout the commit waits for."""
        assert self._producer is not None
        began = time.perf_counter()
        self._producer.flush(FLUSH_BEFORE_COMMIT_S)
        self._timed("flush", began)
        self._beat()

    def _timed(self, phase: str, began: float) -> None:
        if self._on_commit_phase is not None:
            self._on_commit_phase(phase, time.perf_counter() - began)

    def _count_committed(self) -> None:
        """The open transaction committed: count it and forget its batches."""
        msgs = self._txn_msgs
        self.stats.batches += 1
        self.stats.messages += len(msgs)
        self.stats.outputs += self._txn_outputs
        self.stats.last_batch_size = len(msgs)
        self._txn_msgs, self._txn_outputs = [], 0

    def _commit_open(self) -> None:
        """Commit a transaction left open by :attr:`_commit_interval_s`, if any; a failure
        aborts it and rewinds its batches (a fatal one is raised)."""
        if not self._txn_msgs or self._producer is None:
            return
        try:
            self._commit_txn()
        except KafkaException as exc:
            pending, self._txn_msgs, self._txn_outputs = self._txn_msgs, [], 0
            self._recover(exc, pending)

    def _produce(self, out: Output) -> None:
        assert self._producer is not None
        while True:
            try:
                kwargs: dict[str, Any] = {"key": out.key, "value": out.value}
                if out.headers:
                    kwargs["headers"] = out.headers
                if out.timestamp_ms:
                    kwargs["timestamp"] = out.timestamp_ms
                self._producer.produce(out.topic, **kwargs)
                return
            except BufferError:
                self._producer.poll(0.05)

    @staticmethod
    def _next_offsets(msgs: list[Message]) -> list[TopicPartition]:
        last: dict[tuple[str, int], int] = {}
        for m in msgs:
            key = (m.topic(), m.partition())
            last[key] = max(last.get(key, -1), m.offset())
        return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]

    def _recover(self, exc: KafkaException, msgs: list[Message]) -> None:
        """Abort the transaction and rewind to the last committed offsets, so the batch is
        processed again; fatal errors (e.g. fenced by a newer instance) end the stage."""
        assert self._consumer is not None and self._producer is not None
        err = exc.args[0]
        self.stats.aborted += 1
        self.stats.errors.append(str(err))
        if is_fatal(exc):
            # The loop replaces both clients (see run()).
            raise exc
        logger.warning(
            "%s transaction aborted (%s); rewinding %d messages", self._stage, err, len(msgs)
        )
        # With the broker down the abort times out too: librdkafka says retry the call to
        # resume it, which is what keeps the stage alive through a broker restart. An abort
        # that cannot complete (a commit still current: _CONFLICT; the broker gone for
        # longer than TXN_RECOVERY_S; a stop request) replaces the clients instead.
        self._complete("abort")
        self._rewind(msgs)

    def _complete(self, call: Literal["commit", "abort"]) -> None:
        """``commit_transaction`` or ``abort_transaction`` until it is done, resumed while
        :func:`txn_failure_action` says so (a retriable commit goes on in the background,
        and any other call conflicts with it until it is resumed and done). Otherwise a
        commit's error is raised as it is (the caller aborts) and an abort's as a
        replacement error (the loop replaces its clients)."""
        assert self._producer is not None
        op = (
            self._producer.commit_transaction
            if call == "commit"
            else self._producer.abort_transaction
        )
        started = time.monotonic()
        while True:
            self._beat()
            try:
                op(10)
                return
            except KafkaException as exc:
                err = exc.args[0]
                action = txn_failure_action(err, call, time.monotonic() - started, self._stopping())
                if action == "resume":
                    logger.warning("%s %s not done yet (%s); resuming it", self._stage, call, err)
                    # An error returned at once must not spin.
                    time.sleep(0.1 if call == "commit" else 0.5)
                    continue
                if call == "commit":
                    raise
                logger.error("%s abort failed: %s", self._stage, err)
                raise replacement_error("abort failed", err) from exc

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def _rewind(self, msgs: list[Message]) -> None:
        """Seek every partition of the batch back to its first message in the batch."""
        assert self._consumer is not None
        first: dict[tuple[str, int], int] = {}
        for m in msgs:
            key = (m.topic(), m.partition())
            first[key] = min(first.get(key, m.offset()), m.offset())
        for (topic, partition), offset in first.items():
            try:
                self._consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:
                # The partition was revoked meanwhile: its new owner starts from the
                # committed offset, which is at or before this batch.
                logger.info("%s seek %s[%d] skipped: %s", self._stage, topic, partition, exc)
