"""Behavioural tests of the trained fraud model: directions it must respect, inputs it must
ignore, inputs it must survive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import orjson
import pandas as pd
import pytest

from stages.prediction.logic import assemble_matrix, decode_enriched, request_features
from stages.shared.schemas import CUSTOMER_FEATURES, MODEL_FEATURES, TERMINAL_FEATURES
from training.evaluate import average_precision, roc_auc

if TYPE_CHECKING:
    from tests.model.conftest import TrainedModel

RISK = ("terminal_risk_1d", "terminal_risk_7d", "terminal_risk_30d")
STORED = (*CUSTOMER_FEATURES, *TERMINAL_FEATURES)


def _matrix(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[list(MODEL_FEATURES)].astype("float64")


def test_model_is_useful_at_all(trained: TrainedModel) -> None:
    # Guards the other tests against a degenerate (e.g. constant) model passing them trivially.
    s = trained.score(_matrix(trained.test))
    y = trained.test["is_fraud"].to_numpy()
    assert roc_auc(y, s) > 0.8
    assert average_precision(y, s) > 5 * y.mean()


@pytest.mark.parametrize("feature", ["terminal_risk_1d", "terminal_risk_7d", "all"])
def test_more_recent_terminal_risk_raises_scores_on_average(
    trained: TrainedModel, feature: str
) -> None:
    # The served model is not monotone-constrained (the constraint costs about 0.09 validation
    # AP on the reference data, see the training report): it promises the direction on average
    # for the recent windows and for all three together, not row by row. terminal_risk_30d
    # alone is deliberately not here: with the recent windows unchanged, a higher 30-day rate
    # is a terminal whose compromise (28 days at most) is over, and the model learnt that.
    X = _matrix(trained.test)
    before = trained.score(X)
    cols = list(RISK) if feature == "all" else [feature]
    for delta in (0.1, 0.3, 1.0):
        raised = X.copy()
        raised[cols] = np.minimum(raised[cols] + delta, 1.0)
        after = trained.score(raised)
        assert after.mean() > before.mean(), f"+{delta} on {cols} lowered the mean score"
    # ... and all of them together matter: maxing them raises most scores.
    maxed = X.copy()
    maxed[list(RISK)] = 1.0
    assert (trained.score(maxed) > before + 1e-6).mean() > 0.5


def test_recent_terminal_fraud_weighs_more_than_stale(trained: TrainedModel) -> None:
    X = _matrix(trained.test[trained.test["amount"] < 200])
    recent, stale = X.copy(), X.copy()
    recent[list(RISK)] = 0.5
    stale[["terminal_risk_1d", "terminal_risk_7d"]] = 0.0
    stale["terminal_risk_30d"] = 0.5
    gap = trained.score(recent) - trained.score(stale)
    assert float(np.median(gap)) > 0.05 and (gap > 0).mean() > 0.9


def test_a_known_compromised_terminal_outranks_a_clean_one(trained: TrainedModel) -> None:
    # Scenario 2: every transaction of a compromised terminal is fraud; once its frauds are
    # known (7-day delay), its transactions must score above the same ones on a clean terminal.
    X = _matrix(trained.test[trained.test["amount"] < 200])
    clean, compromised = X.copy(), X.copy()
    clean[list(RISK)] = 0.0
    compromised[list(RISK)] = 0.5
    gap = trained.score(compromised) - trained.score(clean)
    assert float(np.median(gap)) > 0.05
    assert (gap > 0).mean() > 0.95


def test_ids_are_not_model_inputs(trained: TrainedModel) -> None:
    assert trained.features == list(MODEL_FEATURES)
    for name in ("transaction_id", "customer_id", "terminal_id"):
        assert name not in trained.features


def _enriched(rows: pd.DataFrame, customer: np.ndarray, terminal: np.ndarray) -> list[bytes]:
    ms = rows["tx_datetime"].astype("datetime64[ms, UTC]").astype("int64").to_numpy()
    return [
        orjson.dumps(
            {
                "transaction_id": int(t),
                "customer_id": int(c),
                "terminal_id": int(k),
                "amount": float(a),
                "event_ms": int(e),
            }
        )
        for t, c, k, a, e in zip(
            rows["transaction_id"], customer, terminal, rows["amount"], ms, strict=True
        )
    ]


def test_scores_do_not_depend_on_id_values(trained: TrainedModel) -> None:
    rows = trained.test.sample(500, random_state=0).reset_index(drop=True)
    online = rows[list(STORED)].to_numpy(np.float64)
    rng = np.random.default_rng(0)
    scored = []
    for customer, terminal in (
        (rows["customer_id"].to_numpy(), rows["terminal_id"].to_numpy()),
        (rng.permutation(rows["customer_id"].to_numpy()), rng.integers(0, 2**40, len(rows))),
        (np.full(len(rows), 123_456_789), np.zeros(len(rows), dtype=np.int64)),
    ):
        batch, bad = decode_enriched(_enriched(rows, customer, terminal))
        assert not bad and np.array_equal(batch.customer_id, customer)
        request = request_features(batch.amount, batch.event_ms)
        matrix = assemble_matrix(trained.features, request, online, list(STORED))
        scored.append(trained.score(matrix))
    # Same features through the prediction path: bit-identical scores whatever the ids.
    assert np.array_equal(scored[0], scored[1])
    assert np.array_equal(scored[0], scored[2])
    # The prediction path rebuilt the training matrix exactly (request features included).
    assert np.array_equal(scored[0], trained.score(_matrix(rows)))


def test_much_larger_amount_than_usual_does_not_lower_scores_on_average(
    trained: TrainedModel,
) -> None:
    legit = trained.test[trained.test["is_fraud"] == 0]
    X = _matrix(legit)
    before = trained.score(X)
    for factor in (3.0, 5.0):
        inflated = X.copy()
        inflated["amount"] = factor * X["customer_avg_amount_30d"]
        after = trained.score(inflated)
        assert after.mean() >= before.mean(), f"x{factor} amounts lowered the mean score"
    # Scenario 3 (x5 amounts) is a fraud pattern the model should react to, not just tolerate.
    assert after.mean() > 2 * before.mean()


@pytest.mark.parametrize("column", [*MODEL_FEATURES, "all"])
def test_missing_features_give_finite_scores(trained: TrainedModel, column: str) -> None:
    X = _matrix(trained.test.head(300))
    if column == "all":
        X[:] = np.nan
    else:
        X[column] = np.nan
    s = trained.score(X)
    assert s.shape == (300,)
    assert np.isfinite(s).all() and ((s >= 0) & (s <= 1)).all()


def test_missing_online_features_through_the_prediction_path(trained: TrainedModel) -> None:
    rows = trained.test.head(50).reset_index(drop=True)
    online = np.full((len(rows), len(STORED)), np.nan)  # e.g. a view missing in Redis
    batch, _ = decode_enriched(
        _enriched(rows, rows["customer_id"].to_numpy(), rows["terminal_id"].to_numpy())
    )
    matrix = assemble_matrix(
        trained.features, request_features(batch.amount, batch.event_ms), online, list(STORED)
    )
    s = trained.score(matrix)
    assert np.isfinite(s).all()
