"""Stall detection: an assigned partition with lag that makes no progress.

A consumer can go quiet on a partition without any error (a paused partition never resumed,
a fetch position past data it never processed): its lag stays, its committed offset stays,
and nothing fails. Each stage feeds this watch with every assigned partition's position and
high watermark; a partition that has lag and has not moved for ``timeout_s`` while the
stage's dependencies were up is *stalled*. The stage counts it
(``rtpipe_partition_stalled_total``), logs ``topic[partition]@offset`` and recovers (re-reads
from its committed offset, which exactly-once makes safe). The alert rule
``RtpipePartitionStalled`` classifies the same from outside, the way Burrow does: lag above
zero and no committed progress for minutes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

TopicPartitionKey = tuple[str, int]


@dataclass
class _Seen:
    position: int
    since: float
    stalled: bool = False


@dataclass
class StallWatch:
    """Tracks progress per partition.

    Args:
        timeout_s: how long a partition may have lag without moving before it is stalled.
        clock: monotonic seconds (injected by tests).
    """

    timeout_s: float
    clock: Callable[[], float] = time.monotonic
    _seen: dict[TopicPartitionKey, _Seen] = field(default_factory=dict)
    _blocked_until: float = 0.0

    def dependency_down(self) -> None:
        """A dependency (Redis, the label index) was unavailable just now: no partition
        counts as stalled until it has been up for a whole timeout."""
        self._blocked_until = self.clock() + self.timeout_s

    def observe(self, tp: TopicPartitionKey, position: int, high: int) -> bool:
        """Record one partition's position and high watermark.

        Returns:
            True when the partition has just become stalled (once per stall).
        """
        now = self.clock()
        seen = self._seen.get(tp)
        moved = seen is None or position != seen.position
        if moved or high <= position or position < 0 or now < self._blocked_until:
            self._seen[tp] = _Seen(position, now)
            return False
        assert seen is not None
        if not seen.stalled and now - seen.since >= self.timeout_s:
            seen.stalled = True
            return True
        return False

    def stalled(self) -> list[TopicPartitionKey]:
        """The partitions stalled now."""
        return [tp for tp, s in self._seen.items() if s.stalled]

    def forget(self, tps: list[TopicPartitionKey] | None = None) -> None:
        """Stop tracking ``tps`` (revoked, or re-read after recovery); all when None."""
        if tps is None:
            self._seen.clear()
            return
        for tp in tps:
            self._seen.pop(tp, None)
