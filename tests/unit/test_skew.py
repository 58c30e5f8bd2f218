"""The skew check's comparison, the predictions frame, and history_start on hand-made frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stages.shared.schemas import (
    BEHAVIOUR_FEATURES,
    CUSTOMER_FEATURES,
    MODEL_FEATURES,
    MODEL_FEATURES_V2,
    TERMINAL_FEATURES,
    service_features,
)
from stages.shared.settings import Settings
from training.features import compute_features
from training.skew import check_skew, compare_features, predictions_frame


def frame(values: dict[str, list[float]], ids: list[int]) -> pd.DataFrame:
    return pd.DataFrame(values, index=pd.Index(ids, name="transaction_id"))


def test_compare_counts_mismatches_beyond_tolerance_per_feature() -> None:
    batch = frame({"a": [1.0, 2.0, 3.0, 500.0], "b": [0.0, 0.0, 0.0, 0.0]}, [1, 2, 3, 4])
    served = frame(
        {"a": [1.0 + 5e-7, 2.1, 3.0, 500.0 + 1e-4], "b": [0.0, 0.0, 0.0, 2e-6]}, [1, 2, 3, 4]
    )
    out = compare_features(batch, served, ["a", "b"], tolerance=1e-6)
    # a: 5e-7 is within tolerance; 0.1 is not; 1e-4 on 500 is relative 2e-7, within.
    assert out.loc["a", "mismatches"] == 1 and out.loc["a", "compared"] == 4
    assert out.loc["a", "mismatch_rate"] == pytest.approx(0.25)
    assert out.loc["a", "max_abs_diff"] == pytest.approx(0.1)
    assert out.loc["b", "mismatches"] == 1  # 2e-6 absolute on a zero
    assert list(out.index) == ["a", "b"]


def test_compare_treats_one_sided_missing_values_as_mismatches() -> None:
    batch = frame({"a": [1.0, np.nan, np.nan]}, [1, 2, 3])
    served = frame({"a": [np.nan, 2.0, np.nan]}, [1, 2, 3])
    out = compare_features(batch, served, ["a"])
    assert out.loc["a", "mismatches"] == 2
    assert np.isnan(out.loc["a", "max_abs_diff"])


def test_compare_only_rows_on_both_sides_and_missing_columns() -> None:
    batch = frame({"a": [1.0, 2.0], "absent": [0.0, 0.0]}, [1, 2])
    served = frame({"a": [1.0, 9.0]}, [2, 3])
    out = compare_features(batch, served, ["a", "absent"])
    assert out.loc["a", "compared"] == 1 and out.loc["a", "mismatches"] == 1
    assert out.loc["absent", "mismatches"] == 1
    empty = compare_features(batch, served.iloc[:0], ["a"])
    assert empty.loc["a", "compared"] == 0 and np.isnan(empty.loc["a", "mismatch_rate"])


def test_predictions_frame_from_records() -> None:
    records = [
        {
            "transaction_id": 7,
            "score": 0.5,
            "model_version": "v0001",
            "features": {"amount": 10.0, "customer_nb_tx_1d": 1, "terminal_risk_1d": None},
        },
        {"transaction_id": 3, "score": 0.1, "features": {"amount": 5.5}},
        {"transaction_id": 7, "score": 0.6, "features": {"amount": 11.0}},  # re-processed
    ]
    f = predictions_frame(records)
    assert f.index.tolist() == [3, 7] and f.index.name == "transaction_id"
    assert f.loc[7, "amount"] == 11.0 and f.loc[7, "score"] == 0.6  # last record wins
    assert np.isnan(f.loc[7, "terminal_risk_1d"]) and np.isnan(f.loc[3, "customer_nb_tx_1d"])
    assert list(f.columns[:3]) == ["amount", "customer_nb_tx_1d", "terminal_risk_1d"]
    assert f["amount"].dtype == np.float64
    assert predictions_frame([]).empty
    with pytest.raises(ValueError, match="transaction_id"):
        predictions_frame([{"features": {}}])


def transactions() -> pd.DataFrame:
    """Customer 1 buys every 12 h on terminal 9 over 40 days; every 5th one is fraud."""
    n = 80
    ts = pd.Timestamp("2018-04-01", tz="UTC") + pd.to_timedelta(np.arange(n) * 12, unit="h")
    return pd.DataFrame(
        {
            "transaction_id": np.arange(n),
            "customer_id": np.ones(n, dtype=np.int64),
            "terminal_id": np.full(n, 9, dtype=np.int64),
            "tx_datetime": ts,
            "amount": 10.0 + np.arange(n),
            "is_fraud": (np.arange(n) % 5 == 0).astype(np.int64),
        }
    )


def records_from(features: pd.DataFrame) -> list[dict[str, object]]:
    return [
        {
            "transaction_id": int(r["transaction_id"]),
            "features": {n: float(r[n]) for n in MODEL_FEATURES},
        }
        for _, r in features.iterrows()
    ]


def test_check_skew_online_matches_when_served_equals_the_definitions() -> None:
    tx = transactions()
    feats = compute_features(tx)
    ids = tx["transaction_id"].iloc[60:]
    preds = predictions_frame(records_from(feats.iloc[60:]))
    report = check_skew(Settings(), tx, preds, ids, offline=False)
    assert report.offline is None and report.ok
    assert report.online is not None and (report.online["mismatches"] == 0).all()
    assert (report.online["compared"] == 20).all()


def test_check_skew_finds_a_skewed_feature_and_missing_predictions() -> None:
    tx = transactions()
    feats = compute_features(tx).iloc[60:].copy()
    feats.loc[feats.index[:4], "terminal_risk_7d"] += 0.01
    preds = predictions_frame(records_from(feats.iloc[1:]))  # first one never predicted
    report = check_skew(Settings(), tx, preds, [*range(60, 80), 999], offline=False)
    assert report.online is not None and not report.ok
    assert report.online.loc["terminal_risk_7d", "mismatches"] == 3
    assert report.online.drop(index="terminal_risk_7d")["mismatches"].sum() == 0
    assert report.missing_online == 1 and report.unknown_transactions == 1
    assert report.requested == 21
    assert "terminal_risk_7d" in str(report) and report.to_dict()["ok"] is False


def test_history_start_restricts_batch_customer_windows_only() -> None:
    tx = transactions()
    start = pd.Timestamp("2018-04-21", tz="UTC")  # 20 days in: a replay without history
    # What a replay from `start` serves: customer windows over the replay only, terminal
    # windows over the full label history.
    replay = compute_features(tx[tx["tx_datetime"] >= start]).set_index("transaction_id")
    full = compute_features(tx).set_index("transaction_id")
    served = full.loc[replay.index].copy()
    served[list(CUSTOMER_FEATURES)] = replay[list(CUSTOMER_FEATURES)]
    ids = served.index[10:]
    preds = predictions_frame(records_from(served.loc[ids].reset_index()))

    fair = check_skew(Settings(), tx, preds, ids, history_start=start, offline=False)
    assert fair.online is not None and fair.online["mismatches"].sum() == 0
    assert fair.history_start == start.isoformat()
    # Without history_start the 30-day customer windows differ (they miss 20 days)...
    naive = check_skew(Settings(), tx, preds, ids, offline=False)
    assert naive.online is not None
    assert naive.online.loc["customer_nb_tx_30d", "mismatches"] > 0
    # ... and terminal features are compared over all transactions either way.
    for name in TERMINAL_FEATURES:
        assert naive.online.loc[name, "mismatches"] == 0


def v2_records(features: pd.DataFrame, service: str | None) -> list[dict[str, object]]:
    names = service_features(service or "fraud_model_v1")
    return [
        {
            "transaction_id": int(r["transaction_id"]),
            "feature_service": service,
            "features": {n: float(r[n]) for n in names},
        }
        for _, r in features.iterrows()
    ]


def test_check_skew_compares_each_record_on_its_own_feature_service() -> None:
    tx = transactions()
    feats = compute_features(tx, MODEL_FEATURES_V2).iloc[60:].copy()
    feats.loc[feats.index[:2], "customer_secs_since_prev_tx"] += 1.0
    # A promotion from v1 to v2 half-way through the replay.
    records = [*v2_records(feats.iloc[:10], "fraud_model_v1")]
    records += v2_records(feats.iloc[10:], "fraud_model_v2")
    preds = predictions_frame(records)
    assert list(preds.columns[-1:]) == ["feature_service"]
    report = check_skew(Settings(), tx, preds, range(60, 80), offline=False)
    assert report.online is not None
    # v1 features on all 20 records, the v2 ones on the 10 v2 records only; the skewed v2
    # values are in rows a v1 model served, whose records do not carry them: no mismatch.
    assert report.online.loc["amount", "compared"] == 20
    assert report.online.loc["customer_nb_terminals_7d", "compared"] == 10
    assert report.ok
    skewed = feats.copy()
    skewed.loc[skewed.index[15:17], "customer_amount_ratio_30d"] *= 1.01
    preds = predictions_frame(v2_records(skewed, "fraud_model_v2"))
    report = check_skew(Settings(), tx, preds, range(60, 80), offline=False)
    assert report.online is not None and not report.ok
    assert report.online.loc["customer_amount_ratio_30d", "mismatches"] == 2
    assert report.online.loc["customer_secs_since_prev_tx", "mismatches"] == 2
    assert list(report.online.index) == list(MODEL_FEATURES_V2)
    # A v2 record without the v2 features is skewed, not silently compared on v1's.
    preds = predictions_frame(v2_records(feats, None))
    report = check_skew(
        Settings(), tx, preds, range(60, 80), offline=False, feature_service="fraud_model_v2"
    )
    assert report.online is not None
    assert report.online.loc["customer_nb_terminals_1d", "mismatches"] == 20


def test_history_start_restricts_behaviour_features_too() -> None:
    tx = transactions()
    start = pd.Timestamp("2018-04-21", tz="UTC")
    replay = compute_features(tx[tx["tx_datetime"] >= start], MODEL_FEATURES_V2)
    full = compute_features(tx, MODEL_FEATURES_V2).set_index("transaction_id")
    served = full.loc[replay["transaction_id"]].copy()
    replay = replay.set_index("transaction_id")
    served[list(BEHAVIOUR_FEATURES)] = replay[list(BEHAVIOUR_FEATURES)]
    served[list(CUSTOMER_FEATURES)] = replay[list(CUSTOMER_FEATURES)]
    preds = predictions_frame(v2_records(served.reset_index().iloc[:3], "fraud_model_v2"))
    fair = check_skew(Settings(), tx, preds, served.index[:3], history_start=start, offline=False)
    assert fair.online is not None and fair.ok
    # The first replayed transaction has no previous one in the replay: 30 days.
    assert served.iloc[0]["customer_secs_since_prev_tx"] == 30 * 86_400
