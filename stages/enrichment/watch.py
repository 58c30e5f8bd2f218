"""What the enrichment stage watches while its customer app runs: the app's input
partitions (lag, position, stalls: :class:`PartitionWatch`); its loop is watched by a
:class:`~stages.shared.watchdog.LoopWatchdog`. Kept out of ``app.py`` (the topology and the
Feast sink) and free of quixstreams imports."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException

from stages.shared.errors import RtpipeError
from stages.shared.metrics import Metrics
from stages.shared.stall import StallWatch

logger = logging.getLogger(__name__)

STAGE = "enrichment"


class PartitionStalledError(RtpipeError, RuntimeError):
    """An input partition had lag and made no progress for the stall timeout."""

    def __init__(self, where: list[str], timeout_s: float) -> None:
        super().__init__(f"stalled for {timeout_s:.0f}s: {', '.join(where)}")
        self.where = where


class PartitionWatch:
    """Every ``interval_s``: lag and position of the app's input partitions into the
    stage's gauges, and the stall watch (``stages/shared/stall.py``). A stalled partition
    is counted, logged and raises :class:`PartitionStalledError`: the stage restarts the
    app, which resumes from its committed offsets (exactly-once: nothing lost or doubled).
    """

    def __init__(
        self,
        topics: set[str],
        metrics: Metrics,
        timeout_s: float,
        retries: Callable[[], int],
        interval_s: float = 5.0,
    ) -> None:
        self._topics = topics
        self._metrics = metrics
        self._stalls = StallWatch(timeout_s)
        self._retries = retries
        self._seen_retries = retries()
        self._interval_s = interval_s
        self._next = 0.0

    def check(self, consumer: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._interval_s
        retries = self._retries()
        if retries != self._seen_retries:  # Redis was down since the last check
            self._seen_retries = retries
            self._stalls.dependency_down()
        assigned = [tp for tp in consumer.assignment() if tp.topic in self._topics]
        if not assigned:
            return
        stalled = []
        for tp in consumer.position(assigned):
            try:
                _, high = consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            labels = (STAGE, tp.topic, str(tp.partition))
            if tp.offset >= 0 and high >= 0:
                self._metrics.consumer_lag.labels(*labels).set(max(0, high - tp.offset))
                self._metrics.consumer_position.labels(*labels).set(tp.offset)
            if self._stalls.observe((tp.topic, tp.partition), tp.offset, high):
                self._metrics.partition_stalled.labels(*labels).inc()
                stalled.append(f"{tp.topic}[{tp.partition}]@{tp.offset}")
        if stalled:
            logger.error(
                "enrichment partitions stalled (lag, no progress for %.0fs): %s; restarting "
                "from the committed offsets",
                self._stalls.timeout_s,
                ", ".join(stalled),
            )
            raise PartitionStalledError(stalled, self._stalls.timeout_s)
