"""Issue #12's scale-out numbers: the pipeline on the cluster stack (three KRaft brokers with
replication factor 3 and ``min.insync.replicas`` 2, a Redis Cluster of three masters with a
replica each) with one and with two processes per stage, beside the single-node stack, in
one run: events/s at max speed and event-to-decision p50 / p99 at a fixed rate.

On two cores the cluster's three JVMs and six redis-servers share the CPU with the stages,
so more processes per stage cannot add capacity here; what the numbers show is the price of
replication and of a second process per group on the same cores.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd

from bench.env import REPO, register_model, with_prefix
from bench.pipeline import replay_phase
from stages.ops.harness.processes import start_stages, stop_stages
from stages.ops.harness.sandbox import feast_project
from stages.ops.latency import DecisionCollector, plans
from stages.ops.replay import replay_producer
from stages.shared.kafka import ensure_topics
from stages.shared.settings import Settings, on_cluster, on_port_base

logger = logging.getLogger(__name__)

# The cluster stack's ports: brokers 27292/27392/27492 (controllers +1), Redis 27801-27806
# (cluster buses +100), stage metrics 27201-27205 (+100 per replica). Below Linux's
# ephemeral range, apart from the bench's single-node stack (27000 + ...).
CLUSTER_PORT_BASE = 27200
# The fixed rate of the latency phase: one the cluster stack sustains on two cores (500
# events/s did not: 313 achieved, a queue, in a quick run beside other work).
RATE = 200.0


@dataclass(frozen=True)
class ScaleRun:
    """One layout: its name, processes per stage, and the stats of its two phases."""

    name: str
    replicas: int
    max_stats: dict[str, float]
    rate_stats: dict[str, float]


def cluster_settings(base: Settings) -> Settings:
    """``base`` (the bench's settings) moved onto the bench's cluster stack."""
    settings = on_cluster(
        on_port_base(base, CLUSTER_PORT_BASE),
        kafka_port=CLUSTER_PORT_BASE + 92,
        redis_port=CLUSTER_PORT_BASE + 601,
    )
    return settings.model_copy(
        update={
            "home": REPO / ".rtpipe" / "bench-cluster",
            # Three JVMs on a small machine: a smaller heap each.
            "stack": settings.stack.model_copy(update={"kafka_heap": "512m"}),
        }
    )


@contextmanager
def cluster_stack(settings: Settings) -> Iterator[None]:
    """The cluster stack's Kafka and Redis; stops only what this call started."""
    from infra import stack

    started = stack.up(settings, components=("kafka", "redis"))
    try:
        yield
    finally:
        if started:
            stack.down(settings, only=started)


def measure(
    settings: Settings,
    tx: pd.DataFrame,
    start: pd.Timestamp,
    name: str,
    replicas: int,
    quick: bool,
) -> tuple[ScaleRun, pd.Timestamp]:
    """``replicas`` processes of each stage on fresh topics: a warm-up, ``n`` events at
    max speed, then ``RATE`` events/s, from ``start`` in the data. Returns the run and
    where its data ended."""
    s = with_prefix(settings, f"scale{replicas}")
    ensure_topics(s.kafka, s.topics)
    n_max = 2_000 if quick else 6_000
    latency_s = 4.0 if quick else 10.0
    warm, top, fixed = plans(tx, start, [300, n_max, int(RATE * latency_s)])
    collector = DecisionCollector(s)
    procs = start_stages(s, replicas=replicas)
    producer = replay_producer(s)
    stats: list[dict[str, float]] = []
    try:
        for plan, rate in ((warm, None), (top, None), (fixed, RATE)):
            stats.append(
                replay_phase(s, tx, plan, rate, producer, collector, procs, 240, require_all=True)
            )
            logger.info("scale-out %s, phase %d: %s", name, len(stats), stats[-1])
    finally:
        stop_stages(procs)
        collector.close()
    return ScaleRun(name, replicas, stats[1], stats[2]), fixed.end


def run(
    single: Settings, base: Settings, tx: pd.DataFrame, start: pd.Timestamp, quick: bool
) -> list[ScaleRun]:
    """The single-node stack (``single``: the bench's own, already up) with one process per
    stage, then the cluster stack with one and with two."""
    runs = []
    with feast_project(single, name="scale") as fs:
        register_model(fs, tx)
        run_1, _ = measure(fs, tx, start, "single node", 1, quick)
        runs.append(run_1)
    cs = cluster_settings(base)
    logger.info("bench: starting the cluster stack (Kafka :%d.., Redis :%d..)", *_ports(cs))
    with cluster_stack(cs), feast_project(cs, name="scale") as fs:
        register_model(fs, tx)
        # The same events as the single node first (its own project and topics); the two
        # processes per stage then take the next ones: rows the online store already holds
        # at the same event time would cost the writes less.
        at = start
        for replicas in (1, 2):
            one, at = measure(fs, tx, at, "cluster", replicas, quick)
            runs.append(one)
    return runs


def _ports(settings: Settings) -> tuple[int, int]:
    return settings.stack.kafka_port, settings.stack.redis_port
