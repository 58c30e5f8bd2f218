"""Behavioural tests of a v2 model (feature service ``fraud_model_v2``): what the behaviour
features promise. The model is fitted like the v1 one (``tests/model/conftest.py``), by
``training.train.fit`` on the batch definitions of the same small data set, with v2's
columns.
"""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from stages.shared.schemas import MODEL_FEATURES_V2, service_features
from tests.model.conftest import SMALL, TEST_DAYS, TRAIN_DAYS, TRAIN_FIRST_DAY
from training.dataset import Dataset
from training.evaluate import average_precision
from training.features import compute_features
from training.simulate import simulate
from training.train import fit


@pytest.fixture(scope="module")
def v2() -> tuple[lgb.Booster, pd.DataFrame]:
    """The v2 model and the test days' v2 features (with is_fraud)."""
    tx = simulate(SMALL, progress=False)
    feats = compute_features(tx, MODEL_FEATURES_V2).assign(is_fraud=tx["is_fraud"].to_numpy())
    start = SMALL.start + pd.Timedelta(days=TRAIN_FIRST_DAY)
    end = start + pd.Timedelta(days=TRAIN_DAYS)
    rows = feats[(feats["tx_datetime"] >= start) & (feats["tx_datetime"] < end)]
    rows = rows.sort_values("transaction_id").reset_index(drop=True)
    train = Dataset(
        X=rows[list(MODEL_FEATURES_V2)].astype("float64"),
        y=rows["is_fraud"].astype("int8"),
        ids=rows[["transaction_id", "customer_id", "terminal_id", "tx_datetime"]],
        start=start,
        end=end,
    )
    booster, _ = fit(train, validation_days=3, params={"learning_rate": 0.1}, progress=False)
    test_start = end + pd.Timedelta(days=7)
    test_end = test_start + pd.Timedelta(days=TEST_DAYS)
    test = feats[(feats["tx_datetime"] >= test_start) & (feats["tx_datetime"] < test_end)]
    return booster, test.reset_index(drop=True)


def score(booster: lgb.Booster, frame: pd.DataFrame) -> np.ndarray:
    return np.asarray(booster.predict(frame[list(MODEL_FEATURES_V2)].to_numpy(np.float64)))


def test_the_model_takes_the_v2_columns_and_is_useful(v2: tuple[lgb.Booster, pd.DataFrame]) -> None:
    booster, test = v2
    assert booster.feature_name() == list(service_features("fraud_model_v2"))
    y = test["is_fraud"].to_numpy()
    assert average_precision(y, score(booster, test)) > 5 * y.mean()


def test_an_amount_far_above_the_customers_means_raises_scores(
    v2: tuple[lgb.Booster, pd.DataFrame],
) -> None:
    # Scenario 3 of the simulator: a compromised card's amounts multiplied by 5. Below the
    # 220 of scenario 1, the amount alone says little; relative to the customer's own
    # means and median it is the signal the behaviour features exist for. The counterfactual keeps
    # every feature consistent: the windows' means include the inflated amount.
    booster, test = v2
    legit = test[(test["is_fraud"] == 0) & (test["amount"] * 5 < 220)].copy()
    assert len(legit) > 500
    inflated = legit.copy()
    inflated["amount"] = legit["amount"] * 5
    for n in (1, 7, 30):
        mean = legit[f"customer_avg_amount_{n}d"]
        nb = legit[f"customer_nb_tx_{n}d"]
        inflated[f"customer_avg_amount_{n}d"] = mean + 4 * legit["amount"] / nb
    for n in (7, 30):
        mean = inflated[f"customer_avg_amount_{n}d"]
        ratio = np.where(mean > 0, inflated["amount"] / mean.where(mean > 0, 1.0), 1.0)
        inflated[f"customer_amount_ratio_{n}d"] = ratio
    # The 30-day median moves by at most one rank when one of its ~60 amounts changes: kept
    # as it was, so the amount's ratio to it is five times larger and the week's largest
    # amount is at least the inflated one.
    median_ratio = 5 * legit["customer_amount_median_ratio_30d"]
    inflated["customer_amount_median_ratio_30d"] = median_ratio
    inflated["customer_max_amount_median_ratio_7d"] = np.maximum(
        legit["customer_max_amount_median_ratio_7d"], median_ratio
    )
    before, after = score(booster, legit), score(booster, inflated)
    assert after.mean() > 2 * before.mean()
    assert (after > before).mean() > 0.5
