"""The benchmark's own world: its stack (ports and home apart from a demo or the tests), a
simulated data set and a small model (its Feast project: ``stages.ops.harness.sandbox``).

Nothing here is imported by the stages; nothing happens at import time.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stages.ops.harness import sandbox
from stages.shared.schemas import MODEL_FEATURES
from stages.shared.settings import Settings, TopicSettings, on_port_base

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
# Ports of the bench stack: BASE+92 Kafka, +93 controller, +379 Redis, +1..+5 stage metrics.
# Below Linux's ephemeral range (32768-60999): a port there can be taken by any outgoing
# connection, and a stage that cannot bind its metrics port dies (seen at 35002).
PORT_BASE = 27000


def bench_settings(base: Settings, port_base: int = PORT_BASE) -> Settings:
    """``base`` moved onto the bench stack's own ports and home (``.rtpipe/bench``), with
    this checkout's feature repo (the bench's Feast project is a copy of it)."""
    return on_port_base(base, port_base).model_copy(
        update={"home": REPO / ".rtpipe" / "bench", "feature_repo": REPO / "feature_repo"}
    )


def with_prefix(settings: Settings, name: str) -> Settings:
    """Settings whose topics and consumer groups are unique to one measurement."""
    prefix = f"b{uuid.uuid4().hex[:8]}.{name}."
    return settings.model_copy(update={"topics": TopicSettings(prefix=prefix)})


@contextmanager
def bench_stack(settings: Settings) -> Iterator[list[str]]:
    """Kafka and Redis of the bench stack; stops only what this call started."""
    from infra import stack

    started = stack.up(settings, components=("kafka", "redis"))
    try:
        yield started
    finally:
        if started:
            stack.down(settings, only=started)


@dataclass(frozen=True)
class Dataset:
    tx: pd.DataFrame
    # Event-time day boundaries usable for replays (labels need 7 days of history).
    first_day: pd.Timestamp


def simulate_data(quick: bool) -> Dataset:
    """A small simulated data set (a few thousand transactions per day)."""
    from training.simulate import SimulatorConfig, simulate

    cfg = SimulatorConfig(
        n_customers=1_500 if quick else 3_000,
        n_terminals=3_000 if quick else 6_000,
        nb_days=28 if quick else 42,
        seed=11,
    )
    tx = simulate(cfg, progress=False)
    return Dataset(tx=tx, first_day=cfg.start)


def register_model(settings: Settings, tx: pd.DataFrame, num_trees: int = 100) -> str:
    """Train a LightGBM of production shape (the model's feature list, ``num_trees`` trees of
    31 leaves) on random features and register and promote it. Quality is irrelevant: the
    benchmark only needs a real, verified registry version costing what a real model costs.
    """
    rng = np.random.default_rng(0)
    n = min(len(tx), 20_000)
    x = rng.random((n, len(MODEL_FEATURES)))
    y = (x[:, 0] + 0.3 * rng.random(n) > 0.9).astype(np.float64)
    return sandbox.register_model(settings, x, y, num_leaves=31, num_trees=num_trees)
