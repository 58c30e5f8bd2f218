"""A small model trained once per session by the training code, for behavioural tests.

The model is fitted by ``training.train.fit`` (the production default parameters, early stopping
on the last training days) on features computed from their batch
definitions (``training.features.compute_features``, which the Feast offline store is
backfilled from), over a small simulated data set. No Feast, Kafka or Redis is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from stages.shared.schemas import MODEL_FEATURES
from training.dataset import Dataset
from training.features import compute_features
from training.simulate import SimulatorConfig, simulate
from training.train import fit

SMALL = SimulatorConfig(n_customers=1_000, n_terminals=2_000, nb_days=90, seed=7)
TRAIN_FIRST_DAY = 45
TRAIN_DAYS = 21
TEST_DAYS = 7


@dataclass(frozen=True)
class TrainedModel:
    booster: lgb.Booster
    test: pd.DataFrame  # compute_features rows of the test days, with is_fraud
    features: list[str]

    def score(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        return np.asarray(self.booster.predict(np.asarray(X, dtype=np.float64)))


def _dataset(feats: pd.DataFrame, start: pd.Timestamp, days: int) -> Dataset:
    end = start + pd.Timedelta(days=days)
    rows = feats[(feats["tx_datetime"] >= start) & (feats["tx_datetime"] < end)]
    rows = rows.sort_values("transaction_id").reset_index(drop=True)
    return Dataset(
        X=rows[list(MODEL_FEATURES)].astype("float64"),
        y=rows["is_fraud"].astype("int8"),
        ids=rows[["transaction_id", "customer_id", "terminal_id", "tx_datetime"]],
        start=start,
        end=end,
    )


@pytest.fixture(scope="session")
def trained() -> TrainedModel:
    tx = simulate(SMALL, progress=False)
    feats = compute_features(tx).assign(is_fraud=tx["is_fraud"].to_numpy())
    start = SMALL.start + pd.Timedelta(days=TRAIN_FIRST_DAY)
    train = _dataset(feats, start, TRAIN_DAYS)
    booster, _ = fit(train, validation_days=3, params={"learning_rate": 0.1}, progress=False)
    test_start = start + pd.Timedelta(days=TRAIN_DAYS + 7)
    test = feats[
        (feats["tx_datetime"] >= test_start)
        & (feats["tx_datetime"] < test_start + pd.Timedelta(days=TEST_DAYS))
    ].reset_index(drop=True)
    return TrainedModel(booster=booster, test=test, features=list(booster.feature_name()))
