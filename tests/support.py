"""Helpers shared by integration tests: a small data set and a quickly trained model."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from stages.shared.schemas import MODEL_FEATURES
from stages.shared.settings import Settings
from training import registry
from training.features import compute_features

REPO = Path(__file__).resolve().parent.parent


def register_tiny_model(
    settings: Settings,
    tx: pd.DataFrame,
    *,
    promote: bool = True,
    num_trees: int = 20,
    seed: int = 0,
) -> str:
    """Train a small LightGBM on batch features of ``tx`` and register it.

    Model quality is irrelevant here; the model only has to be a real, loadable, verified
    registry version with the production feature list.
    """
    feats = compute_features(tx)
    y = tx.set_index("transaction_id").loc[feats["transaction_id"], "is_fraud"].to_numpy()
    booster = lgb.train(
        {"objective": "binary", "num_leaves": 8, "verbose": -1, "seed": seed},
        lgb.Dataset(
            feats[list(MODEL_FEATURES)].to_numpy(np.float64),
            label=y,
            feature_name=list(MODEL_FEATURES),
        ),
        num_boost_round=num_trees,
    )
    mv = registry.register(
        settings.registry_dir,
        settings.prediction.model_name,
        booster.model_to_string(),
        {"features": list(MODEL_FEATURES), "feature_service": settings.prediction.feature_service},
    )
    if promote:
        registry.promote(settings.registry_dir, settings.prediction.model_name, mv.version)
    return mv.version


def isolated_settings(base: Settings, tmp: Path) -> Settings:
    """Own feature repo copy, registry, state and Feast project: nothing shared with other
    tests or a demo running on the same stack."""
    repo = tmp / "feature_repo"
    repo.mkdir()
    for f in REPO.joinpath("feature_repo").iterdir():
        if f.is_file():
            shutil.copy(f, repo / f.name)
    return base.model_copy(
        update={
            "home": tmp / "home",
            "feature_repo": repo,
            "feast_project": f"p{uuid.uuid4().hex[:8]}",
        }
    )
