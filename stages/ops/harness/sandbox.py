"""A run's sandbox on a shared stack: settings of its own (a copy of the feature repo, a
Feast project, a home, optionally topics), the project's keys cleared from Redis, and a
tiny model in its registry.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import redis

from stages.shared.settings import Settings, TopicSettings

logger = logging.getLogger(__name__)


def isolated_settings(
    base: Settings,
    root: Path,
    *,
    name: str = "p",
    home: Path | None = None,
    own_topics: bool = False,
) -> Settings:
    """``base`` with a feature repo copy in ``root/feature_repo``, a Feast project
    ``NAME<random>`` and a home (``root/home`` unless given): nothing shared with other
    runs on the same stack. ``own_topics``: topics and groups under the prefix
    ``<base prefix>NAME<random>.`` too."""
    repo = root / "feature_repo"
    repo.mkdir(parents=True)
    for f in base.feature_repo.resolve().iterdir():
        if f.is_file():
            shutil.copy(f, repo / f.name)
    tag = f"{name}{uuid.uuid4().hex[:8]}"
    update: dict[str, object] = {
        "home": root / "home" if home is None else home,
        "feature_repo": repo,
        "feast_project": tag,
    }
    if own_topics:
        update["topics"] = TopicSettings(prefix=f"{base.topics.prefix}{tag}.")
    return base.model_copy(update=update)


def clear_online_store(settings: Settings) -> int:
    """Delete this project's keys: its online rows, its label index and its transaction
    claims, so a replay starts from an empty online store (the writer never lets an older
    row replace a newer one left by an earlier run). Returns the keys deleted."""
    client = settings.redis.client()
    deleted = 0
    project = settings.feast_project.encode()
    # Feast's rows end with the project; the label index's and the transaction claims'
    # keys start with it (stages/shared/labels.py, claims.py).
    patterns = (b"*" + project, b"{" + project + b":lbl:*", project + b":lbl:*")
    for pattern in (*patterns, b"{" + project + b":tx}:*"):
        batch = []
        for key in client.scan_iter(match=pattern, count=10_000):
            batch.append(key)
            if len(batch) >= 10_000:
                deleted += int(client.unlink(*batch))  # type: ignore[arg-type]
                batch.clear()
        if batch:
            deleted += int(client.unlink(*batch))  # type: ignore[arg-type]
    return deleted


@contextmanager
def feast_project(settings: Settings, name: str = "p") -> Iterator[Settings]:
    """:func:`isolated_settings` in a temp folder (``settings``' home kept), the repo
    applied; the project's keys and the folder are deleted at the end."""
    from stages.shared.feast_store import apply_repo

    tmp = Path(tempfile.mkdtemp(prefix="rtpipe-sandbox-"))
    out = isolated_settings(settings, tmp, name=name, home=settings.home)
    try:
        apply_repo(out)
        yield out
    finally:
        try:
            clear_online_store(out)
        except redis.RedisError as exc:
            logger.warning("could not clear project %s: %s", out.feast_project, exc)
        shutil.rmtree(tmp, ignore_errors=True)


def provision(settings: Settings, tx: pd.DataFrame) -> str:
    """Make a sandbox ready for the stages: its feature repo applied, a tiny model trained
    on ``tx`` registered and promoted, its topics created. Returns the model version."""
    from stages.shared.feast_store import apply_repo
    from stages.shared.kafka import ensure_topics

    apply_repo(settings)
    version = register_tiny_model(settings, tx)
    ensure_topics(settings.kafka, settings.topics)
    return version


def register_model(
    settings: Settings,
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_leaves: int = 8,
    num_trees: int = 20,
    seed: int = 0,
    promote: bool = True,
    feature_service: str | None = None,
) -> str:
    """Train a LightGBM on ``x`` (columns: the feature service's features, in order; the
    settings' service by default) and ``y``, register it (with that feature list and
    service) and promote it unless told not to. Returns the version."""
    import lightgbm as lgb

    from stages.shared.schemas import service_features
    from training import registry

    service = feature_service or settings.prediction.feature_service
    features = list(service_features(service))
    booster = lgb.train(
        {"objective": "binary", "num_leaves": num_leaves, "verbose": -1, "seed": seed},
        lgb.Dataset(x, label=y, feature_name=features),
        num_boost_round=num_trees,
    )
    name = settings.prediction.model_name
    mv = registry.register(
        settings.registry_dir,
        name,
        booster.model_to_string(),
        {"features": features, "feature_service": service},
    )
    if promote:
        registry.promote(settings.registry_dir, name, mv.version)
    return mv.version


def register_tiny_model(
    settings: Settings,
    tx: pd.DataFrame,
    *,
    promote: bool = True,
    num_trees: int = 20,
    seed: int = 0,
    shuffle_labels: bool = False,
    feature_service: str | None = None,
) -> str:
    """Train a small LightGBM on batch features of ``tx`` and register it (see
    :func:`register_model`; ``feature_service``: the settings' by default).

    Model quality is irrelevant here; the model only has to be a real, loadable, verified
    registry version with the production feature list. ``shuffle_labels``: trained on
    permuted labels, a deliberately useless model.
    """
    from stages.shared.schemas import service_features
    from training.features import compute_features

    features = service_features(feature_service or settings.prediction.feature_service)
    feats = compute_features(tx, features)
    y = tx.set_index("transaction_id").loc[feats["transaction_id"], "is_fraud"].to_numpy()
    if shuffle_labels:
        y = np.random.default_rng(seed).permutation(y)
    return register_model(
        settings,
        feats[list(features)].to_numpy(np.float64),
        y,
        num_trees=num_trees,
        seed=seed,
        promote=promote,
        feature_service=feature_service,
    )
