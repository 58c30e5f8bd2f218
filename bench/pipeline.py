"""Goals 4 and 5: the whole pipeline (three stage processes) in events/s against a bare
confluent-kafka consume-produce passthrough, and event-to-decision latency at fixed offered
rates, with where the time goes (per-stage timestamps on every decision).
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
from confluent_kafka import Consumer, KafkaError, Producer

from stages.ops.demo import start_stages, stop_stages
from stages.ops.replay import ReplayPlan, replay
from stages.shared.kafka import consumer_config, ensure_topics, producer_config
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
# The fixed low rate of the latency phases (events/s).
LOW_RATE = 200.0
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
    replayed: those that become known inside each window)."""
    times = tx.loc[tx["tx_datetime"] >= start, "tx_datetime"].sort_values().reset_index(drop=True)
    out = []
    lo = 0
    begin = start
    for c in counts:
        hi = min(lo + c, len(times) - 1)
        end = times.iloc[hi]
        out.append(ReplayPlan(begin, end, label_lookback_days=LABEL_DELAY_DAYS))
        begin, lo = end, hi
    return out


def ids_in(tx: pd.DataFrame, plan: ReplayPlan) -> list[int]:
    sel = (tx["tx_datetime"] >= plan.start) & (tx["tx_datetime"] < plan.end)
    return tx.loc[sel, "transaction_id"].tolist()


def passthrough(settings: Settings, n: int) -> float:
    """Events/s of a bare consume-produce loop over ``n`` pre-filled transaction-sized
    messages (same client configs as the stages, no transactions, no processing)."""
    src, dst = settings.topics.name("transactions"), settings.topics.name("enriched")
    ensure_topics(settings.kafka, settings.topics, [src, dst])
    producer = Producer(producer_config(settings.kafka, **{"linger.ms": 20}))
    for i in range(n):
        value = b'{"transaction_id":%d,"customer_id":%d,"terminal_id":%d,"amount":%s}' % (
            i,
            i % 3000,
            i % 6000,
            b"57.16",
        )
        while True:
            try:
                producer.produce(src, key=b"%d" % (i % 3000), value=value)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(60)
    consumer = Consumer(consumer_config(settings.kafka, settings.topics.group("passthrough")))
    consumer.subscribe([src])
    done = 0
    started: float | None = None
    idle = time.monotonic()
    try:
        while done < n and time.monotonic() - idle < 20:
            msgs = consumer.consume(1_000, 0.1)
            if not msgs:
                continue
            idle = time.monotonic()
            if started is None:
                started = time.perf_counter()
            for m in msgs:
                if m.error() is not None:
                    if m.error().code() != KafkaError._PARTITION_EOF:
                        logger.warning("passthrough: %s", m.error())
                    continue
                while True:
                    try:
                        producer.produce(dst, key=m.key(), value=m.value())
                        break
                    except BufferError:
                        producer.poll(0.05)
                done += 1
            producer.poll(0)
        producer.flush(60)
    finally:
        consumer.close()
    return done / (time.perf_counter() - started) if started else float("nan")


@dataclass(frozen=True)
class Phase:
    name: str
    offered_eps: float | None  # None: as fast as the replay can produce
    stats: dict[str, float]


@dataclass(frozen=True)
class PipelineResults:
    max_eps: float
    passthrough_eps: float
    phases: list[Phase]


def run(settings: Settings, tx: pd.DataFrame, start: pd.Timestamp, quick: bool) -> PipelineResults:
    """Three stage processes; a warm-up, a max-speed replay, then fixed-rate replays."""
    ensure_topics(settings.kafka, settings.topics)
    n_max = 3_000 if quick else 10_000
    latency_s = 4.0 if quick else 10.0
    counts = [300, n_max]
    windows = plans(tx, start, [*counts, int(1_000 * latency_s)])
    collector = DecisionCollector(settings)
    procs = start_stages(settings)
    phases: list[Phase] = []
    try:

        def run_phase(name: str, plan: ReplayPlan, rate: float | None) -> Phase:
            ids = ids_in(tx, plan)
            result = replay(settings, tx, plan, rate=rate)
            collector.wait_for(ids, timeout_s=180)
            dead = [sp.name for sp in procs if sp.proc.poll() is not None]
            if dead:
                raise RuntimeError(f"stage(s) died during the bench: {dead}; see {procs[0].log}")
            stats = collector.stats_of(ids)
            stats["replay_eps"] = result.transactions / result.seconds if result.seconds else 0
            logger.info("pipeline phase %s: %s", name, stats)
            return Phase(name, rate, stats)

        run_phase("warm-up", windows[0], None)
        top = run_phase("max speed", windows[1], None)
        phases.append(top)
        phases.append(run_phase("1,000 events/s", windows[2], 1_000.0))
        # Well below saturation: the latency the commits themselves add.
        (low_plan,) = plans(tx, windows[2].end, [int(LOW_RATE * latency_s)])
        phases.append(run_phase(f"{LOW_RATE:,.0f} events/s", low_plan, LOW_RATE))
        last_end = low_plan.end
        half = 0.5 * top.stats.get("eps", 0.0)
        if half > 0:
            (half_plan,) = plans(tx, last_end, [int(half * latency_s)])
            phases.append(run_phase("50% of max", half_plan, half))
    finally:
        codes = stop_stages(procs)
        collector.close()
        logger.info("stages stopped: %s", codes)
    trials = []
    for t in range(1 if quick else 3):
        prefix = f"{settings.topics.prefix}pass{t}."
        topics = settings.topics.model_copy(update={"prefix": prefix})
        trials.append(passthrough(settings.model_copy(update={"topics": topics}), n_max))
    pass_eps = float(np.median(trials))
    return PipelineResults(top.stats.get("eps", float("nan")), pass_eps, phases)
