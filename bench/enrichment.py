"""Goal 6: enrichment events/s with all windows (the real stage) against the same
quixstreams application without windows (``bench.enrich_nowindow``), each as its own process
draining the same number of pre-filled transactions on fresh topics.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import orjson
import pandas as pd
from confluent_kafka import Consumer

from bench.report import median
from stages.ops.demo import clear_online_store, start_stages, stop_stages
from stages.ops.replay import ReplayPlan, replay
from stages.shared.kafka import ensure_topics
from stages.shared.settings import Settings, settings_to_env

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnrichmentResults:
    windows_eps: float
    no_windows_eps: float
    events: int
    trials: int


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


def _start_nowindow(settings: Settings) -> subprocess.Popen[bytes]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("RTPIPE_")}
    resolved = settings.model_copy(
        update={"home": settings.home.resolve(), "feature_repo": settings.feature_repo.resolve()}
    )
    env.update(settings_to_env(resolved))
    log = settings.run_dir / "stages" / f"{settings.topics.prefix}nowindow.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.enrich_nowindow"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(
    settings: Settings, tx: pd.DataFrame, start: pd.Timestamp, quick: bool
) -> EnrichmentResults:
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
                proc = _start_nowindow(s)
                try:
                    without.append(_drain_rate(s, result.transactions))
                finally:
                    _stop(proc)
            logger.info(
                "enrichment %s: %.0f events/s",
                variant,
                (with_w if variant == "windows" else without)[-1],
            )
    return EnrichmentResults(median(with_w), median(without), n, trials)
