"""Batch feature definitions: hand-made cases with known answers and a slow reference check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stages.shared.schemas import (
    CUSTOMER_FEATURES,
    MODEL_FEATURES,
    TERMINAL_FEATURES,
    is_night,
    is_weekend,
)
from training.features import compute_features, customer_feature_rows, terminal_feature_rows

T0 = pd.Timestamp("2018-08-01 12:00:00", tz="UTC")  # a Wednesday
DAY = pd.Timedelta(days=1)
SEC = pd.Timedelta(seconds=1)


def frame(rows: list[tuple[int, int, pd.Timestamp, float, int]]) -> pd.DataFrame:
    """(customer, terminal, time, amount, is_fraud) rows; ids follow the list order."""
    df = pd.DataFrame(
        rows, columns=["customer_id", "terminal_id", "tx_datetime", "amount", "is_fraud"]
    )
    df.insert(0, "transaction_id", np.arange(len(df), dtype=np.int64))
    df["tx_datetime"] = pd.to_datetime(df["tx_datetime"], utc=True)
    return df


def row(features: pd.DataFrame, tid: int) -> pd.Series:
    return features.set_index("transaction_id").loc[tid]


def test_output_columns_and_order() -> None:
    f = compute_features(frame([(1, 1, T0, 10.0, 0)]))
    assert list(f.columns) == [
        "transaction_id",
        "customer_id",
        "terminal_id",
        "tx_datetime",
        *MODEL_FEATURES,
    ]


def test_customer_window_edges_current_included_n_days_ago_excluded() -> None:
    tx = frame(
        [
            (1, 9, T0 - 30 * DAY, 1000.0, 0),  # exactly 30 days before: outside every window
            (1, 9, T0 - 30 * DAY + SEC, 300.0, 0),  # inside 30d only
            (1, 9, T0 - 7 * DAY, 500.0, 0),  # exactly 7 days: in 30d, not in 7d
            (1, 9, T0 - 7 * DAY + SEC, 70.0, 0),  # in 7d and 30d
            (1, 9, T0 - DAY, 900.0, 0),  # exactly 1 day: in 7d, not 1d
            (1, 9, T0 - DAY + SEC, 20.0, 0),  # in 1d
            (1, 9, T0, 10.0, 0),  # current
            (2, 9, T0, 5000.0, 0),  # other customer never counts
            (1, 9, T0 + SEC, 1.0, 0),  # future never counts
        ]
    )
    r = row(compute_features(tx), 6)
    assert r["customer_nb_tx_1d"] == 2
    assert r["customer_avg_amount_1d"] == pytest.approx(15.0)
    assert r["customer_nb_tx_7d"] == 4
    assert r["customer_avg_amount_7d"] == pytest.approx((70 + 900 + 20 + 10) / 4)
    assert r["customer_nb_tx_30d"] == 6
    assert r["customer_avg_amount_30d"] == pytest.approx((300 + 500 + 70 + 900 + 20 + 10) / 6)
    # A first transaction sees only itself.
    first = row(compute_features(tx), 0)
    assert first["customer_nb_tx_1d"] == first["customer_nb_tx_30d"] == 1
    assert first["customer_avg_amount_30d"] == pytest.approx(1000.0)


def test_customer_ties_counted_in_transaction_order() -> None:
    tx = frame([(1, 1, T0, 10.0, 0), (1, 2, T0, 30.0, 0)])
    f = compute_features(tx)
    assert row(f, 0)["customer_nb_tx_1d"] == 1
    assert row(f, 1)["customer_nb_tx_1d"] == 2
    assert row(f, 1)["customer_avg_amount_1d"] == pytest.approx(20.0)
    # Offline rows: one per (customer, timestamp), the later transaction's state.
    rows = customer_feature_rows(f)
    assert len(rows) == 1
    assert rows.iloc[0]["customer_nb_tx_1d"] == 2


def test_terminal_risk_label_delay_and_windows() -> None:
    tx = frame(
        [
            (1, 5, T0 - 37 * DAY, 1.0, 1),  # exactly 37 days: outside the 30d window
            (2, 5, T0 - 37 * DAY + SEC, 1.0, 1),  # in 30d window
            (3, 5, T0 - 14 * DAY, 1.0, 0),  # exactly 14 days: in 30d, not 7d
            (4, 5, T0 - 14 * DAY + SEC, 1.0, 1),  # in 7d and 30d
            (5, 5, T0 - 8 * DAY, 1.0, 0),  # exactly 8 days: in 7d, not 1d
            (6, 5, T0 - 7 * DAY - SEC, 1.0, 1),  # in 1d
            (7, 5, T0 - 7 * DAY, 1.0, 0),  # exactly 7 days: label known, in 1d
            (8, 5, T0 - 7 * DAY + SEC, 1.0, 1),  # label not yet known
            (9, 5, T0 - 6 * DAY, 1.0, 1),  # 6 days old: label not known
            (10, 6, T0 - 10 * DAY, 1.0, 1),  # other terminal
            (11, 5, T0, 1.0, 1),  # current
        ]
    )
    r = row(compute_features(tx), 10)
    assert r["terminal_nb_tx_1d"] == 2
    assert r["terminal_risk_1d"] == pytest.approx(0.5)
    assert r["terminal_nb_tx_7d"] == 4
    assert r["terminal_risk_7d"] == pytest.approx(2 / 4)
    assert r["terminal_nb_tx_30d"] == 6
    assert r["terminal_risk_30d"] == pytest.approx(3 / 6)


def test_label_from_six_days_ago_does_not_count_and_empty_window_is_zero() -> None:
    tx = frame([(1, 3, T0 - 6 * DAY, 1.0, 1), (2, 3, T0, 1.0, 0)])
    r = row(compute_features(tx), 1)
    for name in TERMINAL_FEATURES:
        assert r[name] == 0, name


def test_request_features_match_shared_helpers() -> None:
    times = [
        pd.Timestamp("2018-08-04 06:59:59", tz="UTC"),  # Saturday, night
        pd.Timestamp("2018-08-05 07:00:00", tz="UTC"),  # Sunday, day
        pd.Timestamp("2018-08-06 00:00:00", tz="UTC"),  # Monday, night
        pd.Timestamp("2018-08-03 23:59:59", tz="UTC"),  # Friday, day
    ]
    f = compute_features(frame([(1, 1, t, 12.34, 0) for t in times]))
    assert f["is_weekend"].tolist() == [1, 1, 0, 0]
    assert f["is_night"].tolist() == [1, 0, 1, 0]
    for t, w, n in zip(times, f["is_weekend"], f["is_night"], strict=True):
        ms = int(t.value // 1_000_000)
        assert (is_weekend(ms), is_night(ms)) == (w, n)
    assert f["amount"].tolist() == [12.34] * 4


def test_input_order_does_not_matter() -> None:
    rng = np.random.default_rng(1)
    tx = random_frame(rng, 300)
    f = compute_features(tx).set_index("transaction_id").sort_index()
    shuffled = tx.sample(frac=1.0, random_state=3)
    g = compute_features(shuffled)
    assert g["transaction_id"].tolist() == shuffled["transaction_id"].tolist()
    pd.testing.assert_frame_equal(g.set_index("transaction_id").sort_index(), f)


def test_offline_rows_layout() -> None:
    f = compute_features(random_frame(np.random.default_rng(2), 200))
    c, t = customer_feature_rows(f), terminal_feature_rows(f)
    assert list(c.columns) == [
        "customer_id",
        "event_timestamp",
        "created_timestamp",
        *CUSTOMER_FEATURES,
    ]
    assert list(t.columns) == [
        "terminal_id",
        "event_timestamp",
        "created_timestamp",
        *TERMINAL_FEATURES,
    ]
    assert str(c["event_timestamp"].dtype) == "datetime64[ns, UTC]"
    assert c["customer_id"].dtype == np.int64 and c["customer_nb_tx_1d"].dtype == np.int64
    assert not c.duplicated(["customer_id", "event_timestamp"]).any()
    assert (c["event_timestamp"] == c["created_timestamp"]).all()


# --- randomized comparison with an obviously-correct per-row implementation ------------------


def random_frame(rng: np.random.Generator, n: int) -> pd.DataFrame:
    # Few entities, a 60-day span, times on whole hours so that ties and exact window edges
    # (n days, 7 days, 7 + n days) happen often.
    hours = np.sort(rng.integers(0, 60 * 24, size=n))
    df = pd.DataFrame(
        {
            "transaction_id": np.arange(n, dtype=np.int64),
            "customer_id": rng.integers(0, 4, size=n),
            "terminal_id": rng.integers(0, 3, size=n),
            "tx_datetime": T0 + pd.to_timedelta(hours, unit="h"),
            "amount": np.round(rng.uniform(0, 200, size=n), 2),
            "is_fraud": (rng.random(n) < 0.3).astype(np.int8),
        }
    )
    return df


def reference_features(tx: pd.DataFrame) -> pd.DataFrame:
    out = []
    recs = tx.to_dict("records")
    for cur in recs:
        t = cur["tx_datetime"]
        r: dict[str, float] = {"transaction_id": cur["transaction_id"]}
        for n in (1, 7, 30):
            win = [
                o["amount"]
                for o in recs
                if o["customer_id"] == cur["customer_id"]
                and t - n * DAY < o["tx_datetime"] <= t
                and (o["tx_datetime"] < t or o["transaction_id"] <= cur["transaction_id"])
            ]
            r[f"customer_nb_tx_{n}d"] = len(win)
            r[f"customer_avg_amount_{n}d"] = sum(win) / len(win)
            labels = [
                o["is_fraud"]
                for o in recs
                if o["terminal_id"] == cur["terminal_id"]
                and t - (7 + n) * DAY < o["tx_datetime"] <= t - 7 * DAY
            ]
            r[f"terminal_nb_tx_{n}d"] = len(labels)
            r[f"terminal_risk_{n}d"] = sum(labels) / len(labels) if labels else 0.0
        out.append(r)
    return pd.DataFrame(out).set_index("transaction_id")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_slow_reference(seed: int) -> None:
    tx = random_frame(np.random.default_rng(seed), 400)
    got = compute_features(tx).set_index("transaction_id")
    want = reference_features(tx)
    # The generator must actually exercise ties and window edges.
    assert tx.duplicated(["customer_id", "tx_datetime"]).any()
    for name in (*CUSTOMER_FEATURES, *TERMINAL_FEATURES):
        np.testing.assert_allclose(
            got[name].to_numpy(), want[name].to_numpy(), rtol=1e-9, err_msg=name
        )
    assert (got["terminal_nb_tx_7d"] > 0).any() and (got["terminal_risk_30d"] > 0).any()


def test_backfill_replace_keeps_one_history_per_view(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pyarrow.parquet as pq

    from stages.ops.harness.sandbox import isolated_settings
    from stages.shared.settings import Settings
    from training.features import backfill_offline_store
    from training.simulate import SimulatorConfig, simulate

    # A copy of the feature repo: the offline store lives in the repo's data folder.
    settings = isolated_settings(Settings(home=tmp_path), tmp_path)
    assert settings.offline_dir.resolve().is_relative_to(tmp_path.resolve())
    tx = simulate(
        SimulatorConfig(n_customers=20, n_terminals=40, nb_days=5, seed=3), progress=False
    )

    def rows() -> dict[str, tuple[int, int]]:
        out = {}
        for view_dir in sorted(p for p in settings.offline_dir.iterdir() if p.is_dir()):
            parts = sorted(view_dir.rglob("*.parquet"))
            out[view_dir.name] = (len(parts), sum(pq.read_metadata(p).num_rows for p in parts))
        return out

    backfill_offline_store(settings, tx)
    once = rows()
    assert set(once) == {"customer_spending", "terminal_risk", "customer_behaviour"}
    assert all(parts == 1 and n > 0 for parts, n in once.values())
    backfill_offline_store(settings, tx)  # appends: every row twice
    assert rows() == {v: (2, 2 * n) for v, (_, n) in once.items()}
    backfill_offline_store(settings, tx, replace=True)  # one history again, every view
    assert rows() == once
