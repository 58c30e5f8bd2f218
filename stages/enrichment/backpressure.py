"""Riding out a sink outage without quixstreams' backpressure (pause, seek, resume).

What goes wrong in quixstreams 3.28.1
-------------------------------------
A sink that raises ``SinkBackpressureError`` from ``write()`` makes the checkpoint
(``checkpointing/checkpoint.py``, ``Checkpoint.commit``) abort the Kafka transaction and call
``InternalConsumer.trigger_backpressure(offsets_to_seek=checkpoint._starting_tp_offsets)``
(``internal_consumer/consumer.py``). That pauses *every* assigned data partition, **clears
its time-alignment buffer**, and seeks back only the partitions that had at least one
message *processed* in the aborted checkpoint.

When the application time-aligns its inputs (``sdf.concat()`` of two topics, joins),
``poll_row(buffered=True)`` fetches up to 10,000 messages per ``consume()`` into that buffer,
and librdkafka's position moves past all of them at once. The buffer hands messages out
partition group by partition group, lowest partition number first, so at a checkpoint
boundary the other partitions usually hold fetched but unprocessed messages. Those
partitions are not in ``offsets_to_seek``: their buffers are dropped, their positions stay
after the dropped messages, and after the resume the consumer never fetches them again.

* No new data on such a partition: its committed offset stays where it was for good (lag
  that never drains, no error, no log line). This is the stall of the Redis-outage chaos
  run (``transactions`` partitions 1-3, ``labels`` 43-62 behind).
* New data: it is processed and committed past the dropped messages. They are lost,
  silently, exactly-once or not.

Without time alignment (one input topic per dataframe, ``poll_row(buffered=False)``) every
message returned by ``poll()`` is processed before the checkpoint, so the seek covers every
partition that moved and backpressure is safe.

The workaround
--------------
:class:`RetryingBatchingSink` never lets ``SinkBackpressureError`` reach quixstreams: its
``flush()`` retries the failing batch itself, with backoff, inside one bounded budget.
During the outage the checkpoint simply takes longer (the consumer does not poll; the
Kafka transaction stays open). If the budget runs out it raises :class:`SinkUnavailableError`,
which quixstreams treats as fatal: the transaction is aborted, no offsets are committed and
``app.run()`` raises, so a supervisor (the stage's ``run_customer_app``) restarts the application
from the committed offsets with a fresh buffer. Nothing is skipped either way.

Choose ``retry_budget_s`` below

* the producer's ``transaction.timeout.ms`` minus the commit interval and a margin (the
  broker aborts a transaction open longer than that, fencing the producer; the enrichment
  apps use 30 s, hence the 20 s default);
* quixstreams' revoke flush timeout (0.2 x ``max.poll.interval.ms``, 60 s by default): on a
  rebalance it runs ``flush()`` in a thread and abandons it after that long, and an
  abandoned flush that is still retrying would clear the next checkpoint's batches when it
  ends.

A SIGTERM during an outage waits for the final flush, so up to ``retry_budget_s``.
``write()`` may be called several times for the same batch, so it must be idempotent (the
online writer is).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from quixstreams.sinks.base import BatchingSink, SinkBackpressureError, SinkBatch

from stages.shared.errors import RtpipeError

logger = logging.getLogger(__name__)

__all__ = ["RetryingBatchingSink", "SinkUnavailableError"]


class SinkUnavailableError(RtpipeError, RuntimeError):
    """The destination stayed unavailable for the whole retry budget of one flush.

    Deliberately *not* a ``SinkBackpressureError``: quixstreams fails the checkpoint (no
    offsets committed, transaction aborted) and ``Application.run()`` raises it, so the
    application is restarted from its committed offsets instead of being paused."""


class RetryingBatchingSink(BatchingSink):
    """A ``BatchingSink`` whose ``write()`` signals a transient outage by raising
    ``SinkBackpressureError`` (as quixstreams documents), but whose ``flush()`` handles it
    by retrying the batch in place instead of handing it to quixstreams' pause/seek/resume
    path, which drops fetched messages when inputs are time-aligned (module docstring).

    Subclasses implement ``write(batch)`` as usual (idempotent; raise
    ``SinkBackpressureError`` for "try again later", anything else for a real failure).

    :param retry_budget_s: the longest one ``flush()`` (all of its batches) keeps retrying
        before it raises :class:`SinkUnavailableError`.
    :param first_delay_s: the delay before the first retry, doubled on each retry ...
    :param max_delay_s: ... up to this. ``SinkBackpressureError.retry_after`` is not used:
        it is quixstreams' pause length, usually far longer than a useful retry interval.
    :param overlap: ``flush()`` hands the checkpoint's batches to a worker thread and
        returns; :meth:`wait_flushed` waits for them (and raises what the write raised).
        The application must call it before the checkpoint's Kafka commit
        (``NaturalBatchingApplication.overlap_sink_flushes``): the write then runs while the
        checkpoint produces its changelogs and flushes the producer.
    """

    def __init__(
        self,
        retry_budget_s: float = 20.0,
        first_delay_s: float = 0.1,
        max_delay_s: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        overlap: bool = False,
    ) -> None:
        super().__init__()
        if retry_budget_s <= 0 or first_delay_s <= 0 or max_delay_s < first_delay_s:
            raise ValueError("retry_budget_s, first_delay_s > 0 and max_delay_s >= first_delay_s")
        self._retry_budget_s = retry_budget_s
        self._first_delay_s = first_delay_s
        self._max_delay_s = max_delay_s
        self._clock = clock
        self._sleep = sleep
        # Retries since the destination was last reachable (over flushes): logged once per
        # outage, and when it ends.
        self.retries = 0
        self.total_retries = 0
        self._outage_since: float | None = None
        self._overlap = overlap
        self._worker: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def flush(self) -> None:
        if self._overlap:
            # A write still running from a checkpoint that never reached its commit goes
            # first (one writer at a time, in checkpoint order).
            self.wait_flushed()
            batches = list(self._batches.values())
            self._batches.clear()
            if batches:
                if self._worker is None:
                    self._worker = ThreadPoolExecutor(1, f"{self}-flush")
                self._pending = self._worker.submit(self._write_all, batches)
            return
        try:
            self._write_all(list(self._batches.values()))
        finally:
            # As BatchingSink.flush: a failed checkpoint re-reads and re-adds its records.
            self._batches.clear()

    def wait_flushed(self) -> None:
        """Wait for the batches an overlapped ``flush()`` handed over; raise what their
        write raised (:class:`SinkUnavailableError` past the retry budget). Immediate when
        nothing is pending."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write_all(self, batches: list[SinkBatch]) -> None:
        deadline = self._clock() + self._retry_budget_s
        for batch in batches:
            self._write_retrying(batch, deadline)

    def _write_retrying(self, batch: SinkBatch, deadline: float) -> None:
        delay = self._first_delay_s
        while True:
            try:
                self.write(batch)
            except SinkBackpressureError as exc:
                now = self._clock()
                if self._outage_since is None:
                    self._outage_since = now
                    logger.warning(
                        "%s: destination unavailable (%s); retrying for up to %.0fs",
                        self,
                        exc.__cause__ or exc,
                        deadline - now,
                    )
                if now >= deadline:
                    raise SinkUnavailableError(
                        f"{self}: destination unavailable for {self._retry_budget_s:.1f}s "
                        f"({batch.topic}[{batch.partition}], {batch.size} records)"
                    ) from exc
                self.retries += 1
                self.total_retries += 1
                self._sleep(min(delay, max(deadline - now, 0.0)))
                delay = min(delay * 2, self._max_delay_s)
                continue
            if self._outage_since is not None:
                logger.warning(
                    "%s: destination available again after %.1fs (%d retries)",
                    self,
                    self._clock() - self._outage_since,
                    self.retries,
                )
                self._outage_since = None
                self.retries = 0
            return
