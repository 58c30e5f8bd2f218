"""Event-to-decision latency as a downstream consumer sees it: a read_committed reader of
the decision topics on its own thread stamps each decision with the time it became readable,
and the per-stage timestamps every decision carries say where the time went. Used by the
demo's live-rate phase and by the bench.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import orjson
import pandas as pd
from confluent_kafka import Consumer

from stages.ops.replay import ReplayPlan
from stages.shared.schemas import LABEL_DELAY_DAYS
from stages.shared.settings import Settings

logger = logging.getLogger(__name__)

# Per-stage hops between the timestamps every decision carries, and the time the decision
# became visible to a read_committed reader (after the routing stage's commit).
HOPS = (
    ("ingest -> enriched", "ingest_ms", "enriched_ms"),
    ("enriched -> predicted", "enriched_ms", "predicted_ms"),
    ("predicted -> routed", "predicted_ms", "routed_ms"),
    ("routed -> visible", "routed_ms", "visible_ms"),
    ("ingest -> visible (total)", "ingest_ms", "visible_ms"),
)
TOTAL = "ingest -> visible (total)"
_COLS = {"ingest_ms": 0, "enriched_ms": 1, "predicted_ms": 2, "routed_ms": 3, "visible_ms": 4}


@dataclass
class Decisions:
    """Stage timestamps of decided transactions, by transaction id."""

    ts: dict[int, tuple[int, int, int, int, int]] = field(default_factory=dict)

    def of(self, ids: Iterable[int]) -> np.ndarray:
        """``(n, 5)`` int64: ingest, enriched, predicted, routed, visible ms of the decided
        ``ids``."""
        rows = [self.ts[i] for i in ids if i in self.ts]
        return np.asarray(rows, dtype=np.int64).reshape(-1, len(_COLS))


def decision_stats(ts: np.ndarray) -> dict[str, float]:
    """Events/s from the first ingest to the last visible decision, and latency percentiles
    (ms) of each hop of ``ts`` (rows of ingest, enriched, predicted, routed, visible ms)."""
    out: dict[str, float] = {"events": float(len(ts))}
    if not len(ts):
        return out
    span_s = (ts[:, _COLS["visible_ms"]].max() - ts[:, 0].min()) / 1000.0
    out["eps"] = len(ts) / span_s if span_s > 0 else float("nan")
    for name, a, b in HOPS:
        lat = ts[:, _COLS[b]] - ts[:, _COLS[a]]
        p50, p99 = np.percentile(lat, [50, 99])
        out[f"{name} p50"] = float(p50)
        out[f"{name} p99"] = float(p99)
    return out


class DecisionCollector:
    """Reads the decision topics (read_committed) from the beginning on its own thread, and
    stamps each decision with the wall-clock time it became readable: the event-to-decision
    latency a downstream consumer sees, all commits included."""

    def __init__(self, settings: Settings) -> None:
        self._consumer = Consumer(
            {
                **settings.kafka.client_config(),
                "group.id": f"bench-collector-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": settings.kafka.fetch_wait_max_ms,
            }
        )
        self._consumer.subscribe(list(settings.topics.decision_topics()))
        self.decisions = Decisions()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decision-collector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        consumer = self._consumer
        while not self._stop.is_set():
            # poll() returns as soon as one decision is readable; consume(n, 0) then takes
            # the rest already fetched (a consume with a timeout would wait it out in full).
            first = consumer.poll(0.1)
            if first is None:
                continue
            now = int(time.time() * 1000)
            rows = {}
            for msg in (first, *consumer.consume(10_000, 0)):
                if msg.error() is not None:
                    continue
                obj = orjson.loads(msg.value())
                ts = obj.get("ts") or {}
                rows[int(obj["transaction_id"])] = (
                    int(ts.get("ingest_ms", 0)),
                    int(ts.get("enriched_ms", 0)),
                    int(ts.get("predicted_ms", 0)),
                    int(ts.get("routed_ms", 0)),
                    now,
                )
            with self._lock:
                self.decisions.ts.update(rows)

    def stats_of(self, ids: Iterable[int]) -> dict[str, float]:
        with self._lock:
            return decision_stats(self.decisions.of(ids))

    def first_visible_ms(self, ids: Iterable[int]) -> float:
        """When the first of ``ids`` became visible here (epoch ms); NaN if none did."""
        with self._lock:
            ts = self.decisions.of(ids)
        return float(ts[:, _COLS["visible_ms"]].min()) if len(ts) else float("nan")

    def wait_for(self, ids: list[int], timeout_s: float) -> bool:
        """Wait until every id is decided; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                missing = sum(1 for i in ids if i not in self.decisions.ts)
            if not missing:
                return True
            time.sleep(0.2)
        logger.warning("%d of %d transactions undecided after %.0fs", missing, len(ids), timeout_s)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


def plans(tx: pd.DataFrame, start: pd.Timestamp, counts: list[int]) -> list[ReplayPlan]:
    """Consecutive replay windows from ``start`` holding ``counts`` transactions each (labels
    replayed: those that become known inside each window).

    Raises:
        ValueError: if the data set ends before the last window is full (a phase replaying
            fewer transactions than asked would measure something else, or nothing).
    """
    times = tx.loc[tx["tx_datetime"] >= start, "tx_datetime"].sort_values().reset_index(drop=True)
    if sum(counts) > len(times) - 1:
        raise ValueError(
            f"{sum(counts):,} transactions asked for from {start}, the data set holds "
            f"{max(len(times) - 1, 0):,}: simulate more days"
        )
    out = []
    lo = 0
    begin = start
    for c in counts:
        hi = lo + c  # within the data: checked above
        end = times.iloc[hi]
        out.append(ReplayPlan(begin, end, label_lookback_days=LABEL_DELAY_DAYS))
        begin, lo = end, hi
    return out
