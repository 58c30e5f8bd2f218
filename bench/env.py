"""The benchmark's own world: its stack (ports and home apart from a demo or the tests), an
isolated Feast project on a copy of the feature repo, a simulated data set and a small model.

Nothing here is imported by the stages; nothing happens at import time.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import redis

from stages.shared.schemas import MODEL_FEATURES
from stages.shared.settings import Settings, TopicSettings, on_port_base

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
# Ports of the bench stack: BASE+92 Kafka, +93 controller, +379 Redis, +1..+5 stage metrics.
# Below Linux's ephemeral range (32768-60999): a port there can be taken by any outgoing
# connection, and a stage that cannot bind its metrics port dies (seen at 35002).
PORT_BASE = 27000


def bench_settings(base: Settings, port_base: int = PORT_BASE) -> Settings:
    """``base`` moved onto the bench stack's own ports and home (``.rtpipe/bench``)."""
    return on_port_base(base, port_base).model_copy(update={"home": REPO / ".rtpipe" / "bench"})


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


@contextmanager
def feast_project(settings: Settings) -> Iterator[Settings]:
    """A copy of the feature repo in a temp folder under a unique project, applied; the
    project's online rows are deleted at the end."""
    from stages.shared.feast_store import apply_repo

    tmp = Path(tempfile.mkdtemp(prefix="rtpipe-bench-"))
    repo = tmp / "feature_repo"
    repo.mkdir()
    for f in (REPO / "feature_repo").iterdir():
        if f.is_file():
            shutil.copy(f, repo / f.name)
    project = f"bench{uuid.uuid4().hex[:8]}"
    out = settings.model_copy(update={"feature_repo": repo, "feast_project": project})
    try:
        apply_repo(out)
        yield out
    finally:
        try:
            client = out.redis.client()
            keys = list(client.scan_iter(match=b"*" + project.encode(), count=10_000))
            for lo in range(0, len(keys), 10_000):
                client.unlink(*keys[lo : lo + 10_000])
        except redis.RedisError as exc:
            logger.warning("could not clear bench project %s: %s", project, exc)
        shutil.rmtree(tmp, ignore_errors=True)


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
        nb_days=14 if quick else 21,
        seed=11,
    )
    tx = simulate(cfg, progress=False)
    return Dataset(tx=tx, first_day=cfg.start)


def register_model(settings: Settings, tx: pd.DataFrame, num_trees: int = 100) -> str:
    """Train a LightGBM of production shape (the model's feature list, ``num_trees`` trees of
    31 leaves) on random features and register and promote it. Quality is irrelevant: the
    benchmark only needs a real, verified registry version costing what a real model costs.
    """
    from training import registry

    rng = np.random.default_rng(0)
    n = min(len(tx), 20_000)
    x = rng.random((n, len(MODEL_FEATURES)))
    y = (x[:, 0] + 0.3 * rng.random(n) > 0.9).astype(np.float64)
    booster = lgb.train(
        {"objective": "binary", "num_leaves": 31, "verbose": -1, "seed": 0},
        lgb.Dataset(x, label=y, feature_name=list(MODEL_FEATURES)),
        num_boost_round=num_trees,
    )
    mv = registry.register(
        settings.registry_dir,
        settings.prediction.model_name,
        booster.model_to_string(),
        {"features": list(MODEL_FEATURES), "feature_service": settings.prediction.feature_service},
    )
    registry.promote(settings.registry_dir, settings.prediction.model_name, mv.version)
    return mv.version
