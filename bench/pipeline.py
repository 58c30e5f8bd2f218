"""Goals 4 and 5: the whole pipeline (three stage processes) in events/s against a bare
confluent-kafka consume-produce passthrough, and event-to-decision latency at fixed offered
rates, with where the time goes (per-stage timestamps on every decision).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from confluent_kafka import Consumer, Message, Producer

from bench.naive import pump
from infra.stack.broker_cpu import BrokerCpu, broker_probe
from stages.ops.commit_waits import pipeline_ports, read_totals, waits_between
from stages.ops.harness.processes import StageProcess, exited, start_stages, stop_stages
from stages.ops.harness.sandbox import clear_online_store
from stages.ops.latency import (
    HOPS,
    TOTAL,
    DecisionCollector,
    Decisions,
    decision_stats,
    plans,
)
from stages.ops.replay import ReplayPlan, replay, replay_producer
from stages.shared.kafka import consumer_config, ensure_topics, producer_config
from stages.shared.settings import Settings

logger = logging.getLogger(__name__)

# One phase of a set of fresh processes: label, events, rate (None: max speed).
PhaseStep = tuple[str, int, float | None]
# The fixed low rate of the latency phases (events/s).
LOW_RATE = 200.0
# The enrichment checkpoint's longest interval, side by side on fresh processes: the old
# default and the current one (EnrichmentSettings.commit_interval_s).
CHECKPOINT_INTERVALS_S = (0.05, 0.2)
# Events of the main sequence's max-speed phase (full run): long enough to be sustained
# (10,000 drained in 2.5-4 s, much of it while batches were still growing).
MAX_SPEED_EVENTS = 30_000
# Passes of the broker warm-up, at most (quick run, full run): each max speed, 1,000 and
# LOW_RATE events/s. It ends after a pass whose JIT threads used under WARMUP_JIT_CORES. On
# this machine they used 0.3-0.5 cores of the two for the first 2-4 minutes of load and
# under 0.1 after that.
WARMUP_PASSES = {True: 1, False: 5}
WARMUP_JIT_CORES = 0.1
# Stats keys of the commit waits: f"{WAIT_PREFIX}{stage} {phase} share", "... ms" and
# "... commits".
WAIT_PREFIX = "commit wait "
# Re-exported for bench.results and the tests.
__all__ = [
    "HOPS",
    "LOW_RATE",
    "TOTAL",
    "DecisionCollector",
    "Decisions",
    "decision_stats",
    "plans",
]


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

    def forward(m: Message) -> None:
        while True:
            try:
                producer.produce(dst, key=m.key(), value=m.value())
                return
            except BufferError:
                producer.poll(0.05)

    done, seconds = pump(
        consumer, producer, n, 20.0, lambda: consumer.consume(1_000, 0.1), forward, "passthrough"
    )
    return done / seconds if seconds else float("nan")


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
    # The same fixed-rate phases with every commit's round trips after the work in front of
    # them (KafkaSettings.overlap_commit off) and overlapped, run back to back on fresh
    # topics: {overlap: phases}.
    commit_overlap: dict[bool, list[Phase]] = field(default_factory=dict)
    # Seconds from starting the three stage processes (events already waiting) to the first
    # decision a read_committed reader sees, once per set of fresh processes.
    cold_starts_s: list[float] = field(default_factory=list)
    # Per enrichment checkpoint interval (seconds): the max-speed and 1,000 events/s phases
    # of each set of fresh processes run with it, the intervals alternating.
    checkpoint_sets: dict[float, list[list[Phase]]] = field(default_factory=dict)
    # The broker warm-up before the main sequence (infra.stack.broker_cpu): its passes' phases,
    # the first on a broker whose JIT is still compiling.
    warmup: list[Phase] = field(default_factory=list)


def replay_phase(
    settings: Settings,
    tx: pd.DataFrame,
    plan: ReplayPlan,
    rate: float | None,
    producer: Producer,
    collector: DecisionCollector,
    procs: Sequence[StageProcess],
    timeout_s: float = 180.0,
    *,
    require_all: bool = False,
    probe: BrokerCpu | None = None,
) -> dict[str, float]:
    """Replay ``plan`` at ``rate`` (None: max speed) into the running ``procs`` and wait for
    its decisions; their stats, with the replay's own events/s, the share of the time each
    stage's loop waited in each step of its commits and the mean wait per commit
    (``WAIT_PREFIX``; stages/ops/commit_waits.py) and, given ``probe``, the cores the broker
    used meanwhile.

    Raises:
        RuntimeError: a stage process died, or (``require_all``) not every transaction of
            the plan was decided within ``timeout_s``.
    """
    ids = plan.transaction_ids(tx)
    before = probe.sample() if probe is not None else None
    ports = pipeline_ports(settings)
    waited_before, began = read_totals(settings.metrics.host, ports), time.monotonic()
    result = replay(settings, tx, plan, rate=rate, producer=producer)
    decided = collector.wait_for(ids, timeout_s=timeout_s)
    cores = BrokerCpu.cores(before, probe.sample()) if probe and before else {}
    waits = waits_between(
        waited_before,
        read_totals(settings.metrics.host, ports),
        max(time.monotonic() - began, 1e-3),
    )
    dead = exited(procs)
    if dead:
        raise RuntimeError(f"stage(s) died during the bench: {dead}; see {procs[0].log}")
    if require_all and not decided:
        raise RuntimeError(f"not every transaction was decided in {timeout_s:.0f} s")
    stats = collector.stats_of(ids)
    stats["replay_eps"] = result.transactions / result.seconds if result.seconds else 0
    stats.update(cores)
    for (stage, phase), w in waits.items():
        stats[f"{WAIT_PREFIX}{stage} {phase} share"] = w.share
        stats[f"{WAIT_PREFIX}{stage} {phase} ms"] = w.mean_ms
        stats[f"{WAIT_PREFIX}{stage} {phase} commits"] = float(w.commits)
    return stats


class StageSet:
    """Three stage processes on ``s`` with a decision collector and one replay producer,
    running for a ``with`` block (:func:`stage_set`)."""

    def __init__(self, s: Settings, tx: pd.DataFrame, probe: BrokerCpu | None) -> None:
        self._s, self._tx, self._probe = s, tx, probe
        self.collector = DecisionCollector(s)
        self.started_ms = time.time() * 1000
        self.procs = start_stages(s)
        self.producer = replay_producer(s)

    def phase(self, plan: ReplayPlan, rate: float | None) -> dict[str, float]:
        """:func:`replay_phase` of ``plan`` at ``rate`` into these processes."""
        return replay_phase(
            self._s,
            self._tx,
            plan,
            rate,
            self.producer,
            self.collector,
            self.procs,
            probe=self._probe,
        )

    def close(self) -> None:
        stop_stages(self.procs)
        self.collector.close()


@contextmanager
def stage_set(s: Settings, tx: pd.DataFrame, probe: BrokerCpu | None = None) -> Iterator[StageSet]:
    """Fresh stage processes on ``s`` for the block; stopped (and the collector closed) on
    the way out."""
    running = StageSet(s, tx, probe)
    try:
        yield running
    finally:
        running.close()


def broker_warmup(
    settings: Settings,
    tx: pd.DataFrame,
    start: pd.Timestamp,
    quick: bool,
    probe: BrokerCpu | None,
) -> list[Phase]:
    """Load a fresh broker the way the measured phases will before they run: passes of max
    speed, 1,000 and ``LOW_RATE`` events/s through three stage processes on topics of their
    own, from ``start`` in the data (the main sequence replays the same window after it; the
    online store is cleared in between). A production broker has long compiled its hot
    code; one started by the bench has not (infra.stack.broker_cpu). The passes go on until the
    broker's JIT threads used under ``WARMUP_JIT_CORES`` through a whole pass (without a
    probe: all of them), at most ``WARMUP_PASSES[quick]``. Returns the passes' phases."""
    topics = settings.topics.model_copy(update={"prefix": f"{settings.topics.prefix}warm."})
    s = settings.model_copy(update={"topics": topics})
    ensure_topics(s.kafka, s.topics)
    n_max = 3_000 if quick else 10_000
    latency_s = 4.0 if quick else 10.0
    steps: list[PhaseStep] = [
        ("max speed", n_max, None),
        ("1,000 events/s", int(1_000 * latency_s), 1_000.0),
        (f"{LOW_RATE:,.0f} events/s", int(LOW_RATE * latency_s), LOW_RATE),
    ]
    passes = WARMUP_PASSES[quick]
    warm, *windows = plans(tx, start, [300, *(n for _, n, _ in steps * passes)])
    phases: list[Phase] = []
    with stage_set(s, tx, probe) as running:
        running.phase(warm, None)
        for i in range(passes):
            before = probe.sample() if probe is not None else None
            for j, (label, _, rate) in enumerate(steps):
                stats = running.phase(windows[i * len(steps) + j], rate)
                name = f"{label}, pass {i + 1}, broker warm-up"
                logger.info("pipeline phase %s: %s", name, stats)
                phases.append(Phase(name, rate, stats))
            if probe is not None and before is not None:
                jit = BrokerCpu.cores(before, probe.sample()).get("broker jit cores", 0.0)
                logger.info("broker warm-up pass %d: JIT threads %.2f cores", i + 1, jit)
                if jit < WARMUP_JIT_CORES:
                    break
    clear_online_store(settings)
    return phases


def run(settings: Settings, tx: pd.DataFrame, start: pd.Timestamp, quick: bool) -> PipelineResults:
    """The broker warmed up; then three stage processes: a warm-up, a sustained max-speed
    replay, then fixed-rate replays."""
    probe = broker_probe(settings)
    warmup = broker_warmup(settings, tx, start, quick, probe)
    ensure_topics(settings.kafka, settings.topics)
    n_max = 3_000 if quick else MAX_SPEED_EVENTS
    latency_s = 4.0 if quick else 10.0
    counts = [300, n_max]
    windows = plans(tx, start, [*counts, int(1_000 * latency_s)])
    collector = DecisionCollector(settings)
    started_ms = time.time() * 1000
    procs = start_stages(settings)
    # One producer for every phase: ready (metadata, producer id) after the warm-up.
    producer = replay_producer(settings)
    phases: list[Phase] = []
    cold_starts: list[float] = []
    try:

        def run_phase(name: str, plan: ReplayPlan, rate: float | None) -> Phase:
            stats = replay_phase(settings, tx, plan, rate, producer, collector, procs, probe=probe)
            logger.info("pipeline phase %s: %s", name, stats)
            return Phase(name, rate, stats)

        run_phase("warm-up", windows[0], None)
        first = collector.first_visible_ms(windows[0].transaction_ids(tx))
        cold_starts.append((first - started_ms) / 1000.0)
        top = run_phase("max speed", windows[1], None)
        phases.append(top)
        phases.append(run_phase("1,000 events/s", windows[2], 1_000.0))
        (fast_plan,) = plans(tx, windows[2].end, [int(2_000 * latency_s)])
        phases.append(run_phase("2,000 events/s", fast_plan, 2_000.0))
        # Well below saturation: the latency the commits themselves add.
        (low_plan,) = plans(tx, fast_plan.end, [int(LOW_RATE * latency_s)])
        phases.append(run_phase(f"{LOW_RATE:,.0f} events/s", low_plan, LOW_RATE))
        last_end = low_plan.end
        half = 0.5 * top.stats.get("eps", 0.0)
        if half > 0:
            (half_plan,) = plans(tx, last_end, [int(half * latency_s)])
            phases.append(run_phase("50% of max", half_plan, half))
            last_end = half_plan.end
    finally:
        codes = stop_stages(procs)
        collector.close()
        logger.info("stages stopped: %s", codes)
    overlap: dict[bool, list[Phase]] = {}
    for on in (False, True):
        overlap[on], last_end, cold = fixed_rate_set(settings, tx, last_end, quick, overlap=on)
        cold_starts.append(cold)
    checkpoints: dict[float, list[list[Phase]]] = {i: [] for i in CHECKPOINT_INTERVALS_S}
    for _ in range(1 if quick else 2):
        for interval in CHECKPOINT_INTERVALS_S:
            phases_i, last_end = checkpoint_set(settings, tx, last_end, quick, interval)
            checkpoints[interval].append(phases_i)
    trials = []
    for t in range(1 if quick else 3):
        prefix = f"{settings.topics.prefix}pass{t}."
        topics = settings.topics.model_copy(update={"prefix": prefix})
        trials.append(passthrough(settings.model_copy(update={"topics": topics}), n_max))
    pass_eps = float(np.median(trials))
    return PipelineResults(
        top.stats.get("eps", float("nan")),
        pass_eps,
        phases,
        overlap,
        cold_starts,
        checkpoints,
        warmup,
    )


def fresh_set(
    s: Settings, tx: pd.DataFrame, start: pd.Timestamp, tag: str, steps: Sequence[PhaseStep]
) -> tuple[list[Phase], pd.Timestamp, float]:
    """Three fresh stage processes on ``s`` (topics of their own): a 300-event warm-up, then
    each of ``steps`` (label, events, rate; None: max speed) in order.

    Returns:
        The steps' phases, named ``"<label>, <tag>"``; where in the data the next set may
        start; the seconds from starting the processes to the first decision.
    """
    ensure_topics(s.kafka, s.topics)
    warm, *windows = plans(tx, start, [300, *(n for _, n, _ in steps)])
    phases: list[Phase] = []
    with stage_set(s, tx) as running:
        stats = running.phase(warm, None)
        logger.info("pipeline (%s) phase warm-up: %s", tag, stats)
        first_ms = running.collector.first_visible_ms(warm.transaction_ids(tx))
        cold = (first_ms - running.started_ms) / 1000.0
        for (label, _, rate), plan in zip(steps, windows, strict=True):
            stats = running.phase(plan, rate)
            logger.info("pipeline (%s) phase %s: %s", tag, label, stats)
            phases.append(Phase(f"{label}, {tag}", rate, stats))
    return phases, windows[-1].end, cold


def fixed_rate_set(
    settings: Settings, tx: pd.DataFrame, start: pd.Timestamp, quick: bool, *, overlap: bool
) -> tuple[list[Phase], pd.Timestamp, float]:
    """:func:`fresh_set` with ``overlap_commit`` as given: 1,000 and ``LOW_RATE`` events/s.
    Returns the phases, where the next set may start, and the seconds to the first decision."""
    kafka = settings.kafka.model_copy(update={"overlap_commit": overlap})
    name = "overlapped" if overlap else "serial"
    topics = settings.topics.model_copy(update={"prefix": f"{settings.topics.prefix}{name}."})
    s = settings.model_copy(update={"kafka": kafka, "topics": topics})
    latency_s = 4.0 if quick else 10.0
    steps = [
        ("1,000 events/s", int(1_000 * latency_s), 1_000.0),
        (f"{LOW_RATE:,.0f} events/s", int(LOW_RATE * latency_s), LOW_RATE),
    ]
    return fresh_set(s, tx, start, f"{name} commits", steps)


def checkpoint_set(
    settings: Settings, tx: pd.DataFrame, start: pd.Timestamp, quick: bool, interval_s: float
) -> tuple[list[Phase], pd.Timestamp]:
    """:func:`fresh_set` with the enrichment checkpoint at most ``interval_s`` long: max
    speed, then 1,000 events/s. Returns those phases and where the next set may start."""
    enrichment = settings.enrichment.model_copy(update={"commit_interval_s": interval_s})
    ms = f"{interval_s * 1000:.0f}"
    # Each interval runs more than once: every set gets topics of its own.
    prefix = f"{settings.topics.prefix}cp{ms}.{time.time_ns()}."
    topics = settings.topics.model_copy(update={"prefix": prefix})
    s = settings.model_copy(update={"enrichment": enrichment, "topics": topics})
    # Smaller than the main sequence's phases: four of these sets follow it in the data.
    n_max = 3_000 if quick else 10_000
    latency_s = 2.0 if quick else 5.0
    steps = [("max speed", n_max, None), ("1,000 events/s", int(1_000 * latency_s), 1_000.0)]
    phases, end, _ = fresh_set(s, tx, start, f"checkpoint {ms} ms", steps)
    return phases, end
