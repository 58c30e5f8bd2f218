"""Goal 6: enrichment events/s with all windows (the real stage) against the same
quixstreams application without windows (``bench.enrich_nowindow``), each as its own process
draining the same number of pre-filled transactions on fresh topics.
"""

from __future__ import annotations

import logging
import time
import uuid

import orjson
import pandas as pd
from confluent_kafka import Consumer

from bench.results import Versus, median
from stages.ops.harness.processes import start_process, start_stages, stop_stages
from stages.ops.harness.sandbox import clear_online_store
from stages.ops.replay import ReplayPlan, replay
from stages.shared.kafka import ensure_topics
from stages.shared.settings import Settings

logger = logging.getLogger(__name__)


def _drain_rate(settings: Settings, expected: int, timeout_s: float = 180.0) -> float:
    """Events/s of the enriched topic: outputs over the span of their ``enriched_ms``."""
    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": f"bench-enriched-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([settings.topics.name("enriched")])
    stamps: list[int] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(stamps) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(10_000, 0.5):
                if msg.error() is None:
                    stamps.append(int(orjson.loads(msg.value())["ts"]["enriched_ms"]))
    finally:
        consumer.close()
    if len(stamps) < expected:
        logger.warning("enrichment bench: %d of %d outputs", len(stamps), expected)
    span = (max(stamps) - min(stamps)) / 1000.0 if stamps else 0.0
    return len(stamps) / span if span > 0 else float("nan")


def run(settings: Settings, tx: pd.DataFrame, start: pd.Timestamp, quick: bool) -> Versus:
    n = 3_000 if quick else 10_000
    trials = 1 if quick else 2
    times = tx.loc[tx["tx_datetime"] >= start, "tx_datetime"].sort_values()
    end = times.iloc[min(n, len(times) - 1)]
    # Transactions only (no labels): both variants consume exactly the same input.
    plan = ReplayPlan(start, end, label_lookback_days=0)
    with_w, without = [], []
    for t in range(trials):
        for variant in ("windows", "no windows"):
            prefix = f"{settings.topics.prefix}e{t}{'w' if variant == 'windows' else 'n'}."
            s = settings.model_copy(
                update={"topics": settings.topics.model_copy(update={"prefix": prefix})}
            )
            ensure_topics(s.kafka, s.topics)
            clear_online_store(s)
            result = replay(s, tx, plan)
            if variant == "windows":
                procs = start_stages(s, ("enrichment",))
                try:
                    with_w.append(_drain_rate(s, result.transactions))
                finally:
                    stop_stages(procs)
            else:
                proc = start_process(s, "nowindow", ("bench.enrich_nowindow",))
                try:
                    without.append(_drain_rate(s, result.transactions))
                finally:
                    stop_stages([proc])
            logger.info(
                "enrichment %s: %.0f events/s",
                variant,
                (with_w if variant == "windows" else without)[-1],
            )
    return Versus(median(with_w), median(without), n, n, trials)
