"""``rtpipe backtest`` on a small simulated data set and a tiny registry model: its scores are
the model's on the batch features, and its metrics are training/evaluate.py's on those
scores. Needs no stack: the backtest reads the data set and the registry only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.ops.backtest import backtest
from stages.ops.harness.sandbox import register_tiny_model
from stages.shared.schemas import service_features
from stages.shared.settings import PredictionSettings, RoutingSettings, Settings
from training import registry
from training.evaluate import evaluate
from training.features import compute_features
from training.simulate import SimulatorConfig, simulate


@pytest.fixture(scope="module")
def small_tx() -> pd.DataFrame:
    return simulate(
        SimulatorConfig(n_customers=150, n_terminals=300, nb_days=60, seed=11), progress=False
    )


@pytest.mark.parametrize("service", ["fraud_model_v1", "fraud_model_v2"])
def test_backtest_matches_direct_evaluation(
    small_tx: pd.DataFrame, tmp_path: Path, service: str
) -> None:
    settings = Settings(
        home=tmp_path,
        # Small micro-batches, so the window is scored in many batches like the stage does.
        prediction=PredictionSettings(max_batch=97),
        routing=RoutingSettings(action_threshold=0.5, review_threshold=0.2),
    )
    version = register_tiny_model(settings, small_tx, feature_service=service)
    report = backtest(settings, "2018-05-15", 7, transactions=small_tx, k=10)

    start = pd.Timestamp("2018-05-15", tz="UTC")
    end = start + pd.Timedelta(days=7)
    # Direct: features over the whole data set, the booster on its service's columns.
    features = service_features(service)
    feats = compute_features(small_tx, features)
    rows = feats[(feats["tx_datetime"] >= start) & (feats["tx_datetime"] < end)]
    rows = rows.sort_values("transaction_id")
    booster = registry.load_current(settings.registry_dir, "fraud").booster
    scores = np.asarray(booster.predict(rows[list(features)].to_numpy(np.float64)))
    assert report.model_version == version
    assert len(report.scored) == len(rows) > 500
    assert report.scored["transaction_id"].tolist() == rows["transaction_id"].tolist()
    np.testing.assert_allclose(report.scored["score"].to_numpy(), scores, rtol=0, atol=1e-12)

    # Without a training window in the metadata: 7 days ending one label delay before start.
    train_start, train_end = start - pd.Timedelta(days=14), start - pd.Timedelta(days=7)
    assert report.train_window == (train_start, train_end)
    scored = rows[["transaction_id", "customer_id", "tx_datetime"]].assign(
        is_fraud=small_tx.set_index("transaction_id")
        .loc[rows["transaction_id"], "is_fraud"]
        .to_numpy(),
        score=scores,
    )
    history = small_tx[(small_tx["tx_datetime"] >= train_start) & (small_tx["tx_datetime"] < end)]
    direct = evaluate(scored, history, train_start, train_end, k=10)
    assert report.metrics.roc_auc == pytest.approx(direct.roc_auc, abs=1e-12)
    assert report.metrics.average_precision == pytest.approx(direct.average_precision, abs=1e-12)
    assert report.metrics.card_precision_at_k == pytest.approx(direct.card_precision_at_k)
    assert report.metrics.n_transactions == direct.n_transactions
    assert report.metrics.n_removed_known_compromised == direct.n_removed_known_compromised
    assert 0.5 < report.metrics.roc_auc <= 1.0

    # Decisions follow the routing thresholds on the same scores.
    expected = {
        "action": int((scores >= 0.5).sum()),
        "review": int(((scores >= 0.2) & (scores < 0.5)).sum()),
        "approved": int((scores < 0.2).sum()),
    }
    assert {k: report.decisions.get(k, 0) for k in expected} == expected
    assert report.online.n == len(rows)
    assert report.score_psi is None  # the tiny model has no training reference
    assert report.summary()["model_version"] == version


def test_backtest_needs_a_model(small_tx: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(registry.RegistryError):
        backtest(Settings(home=tmp_path), "2018-05-15", 1, transactions=small_tx)
