"""Simulator: determinism, output contract and the statistics SIMULATOR.md promises.

The default configuration takes about 2-3 s here, so the statistics are checked on it directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.shared.schemas import LABEL_DELAY_DAYS
from training.simulate import (
    COLUMNS,
    SimulatorConfig,
    labels_frame,
    make_population,
    read_dataset,
    simulate,
    write_dataset,
)

SMALL = SimulatorConfig(n_customers=200, n_terminals=400, nb_days=40, seed=7)


@pytest.fixture(scope="module")
def default_run() -> pd.DataFrame:
    return simulate(SimulatorConfig(), progress=False)


def test_deterministic_for_a_seed() -> None:
    a = simulate(SMALL, progress=False)
    b = simulate(SMALL, progress=False)
    pd.testing.assert_frame_equal(a, b)
    c = simulate(
        SimulatorConfig(n_customers=200, n_terminals=400, nb_days=40, seed=8), progress=False
    )
    assert len(a) != len(c) or not a["amount"].equals(c["amount"])


def test_columns_and_dtypes() -> None:
    df = simulate(SMALL, progress=False)
    assert tuple(df.columns) == COLUMNS
    assert str(df["tx_datetime"].dtype) == "datetime64[ns, UTC]"
    for col in ("transaction_id", "customer_id", "terminal_id", "tx_time_seconds", "tx_time_days"):
        assert df[col].dtype == np.int64, col
    assert df["amount"].dtype == np.float64
    assert df["is_fraud"].dtype == np.int8 and df["fraud_scenario"].dtype == np.int8
    # Sorted by time, ids are the rank, datetimes are whole seconds from the start date.
    assert df["transaction_id"].tolist() == list(range(len(df)))
    assert df["tx_time_seconds"].is_monotonic_increasing
    start = pd.Timestamp("2018-04-01", tz="UTC")
    expected = start + pd.to_timedelta(df["tx_time_seconds"], unit="s")
    assert (df["tx_datetime"] == expected).all()
    assert (df["tx_time_days"] == df["tx_time_seconds"] // 86_400).all()
    assert (df["tx_datetime"].dt.microsecond == 0).all()
    # No transaction at exactly midnight (0 < t < 86400).
    assert (df["tx_time_seconds"] % 86_400 != 0).all()


def test_amounts_non_negative_with_cents() -> None:
    df = simulate(SMALL, progress=False)
    assert (df["amount"] >= 0).all()
    cents = df["amount"].to_numpy() * 100
    np.testing.assert_allclose(cents, np.round(cents), atol=1e-6)


def test_labels_consistent_with_scenarios() -> None:
    df = simulate(SMALL, progress=False)
    assert set(df["fraud_scenario"].unique()) <= {0, 1, 2, 3}
    assert ((df["fraud_scenario"] > 0) == (df["is_fraud"] == 1)).all()
    # Scenario 1 is only ever overridden by later scenarios, never missed.
    big = df["amount"] > 220
    assert (df.loc[big & (df["fraud_scenario"] != 3), "is_fraud"] == 1).all()


def test_terminals_strictly_within_radius() -> None:
    cfg = SimulatorConfig(n_customers=300, n_terminals=2_000, nb_days=1, radius=10.0, seed=3)
    pop = make_population(cfg, np.random.default_rng(cfg.seed))
    n = pop.nb_terminals_per_customer
    owner = np.repeat(np.arange(cfg.n_customers), n)
    d = np.hypot(*(pop.terminal_xy[pop.terminal_index] - pop.customer_xy[owner]).T)
    assert (d < cfg.radius).all()
    # Completeness: brute force over all pairs finds exactly the same sets.
    all_d = np.hypot(
        pop.customer_xy[:, None, 0] - pop.terminal_xy[None, :, 0],
        pop.customer_xy[:, None, 1] - pop.terminal_xy[None, :, 1],
    )
    assert (n == (all_d < cfg.radius).sum(axis=1)).all()
    # Transactions only use a customer's own terminals.
    df = simulate(cfg, progress=False)
    allowed = set(zip(owner.tolist(), pop.terminal_index.tolist(), strict=True))
    pairs = set(zip(df["customer_id"].tolist(), df["terminal_id"].tolist(), strict=True))
    assert pairs <= allowed


def test_labels_frame() -> None:
    df = simulate(SMALL, progress=False)
    labels = labels_frame(df)
    assert list(labels.columns) == [
        "transaction_id",
        "terminal_id",
        "customer_id",
        "is_fraud",
        "tx_datetime",
        "known_at",
    ]
    assert len(labels) == len(df)
    assert (labels["known_at"] - labels["tx_datetime"] == pd.Timedelta(days=LABEL_DELAY_DAYS)).all()
    assert labels["known_at"].is_monotonic_increasing


def test_write_and_read_round_trip(tmp_path: Path) -> None:
    df = simulate(SMALL, progress=False)
    path = write_dataset(df, tmp_path / "data")
    assert path.name == "transactions.parquet"
    pd.testing.assert_frame_equal(read_dataset(tmp_path / "data"), df)
    assert not list((tmp_path / "data").glob(".transactions-*"))


def test_default_run_statistics(default_run: pd.DataFrame) -> None:
    df = default_run
    # Expected count: 5000 customers x mean 2 tx/day x 183 days x P(0 < N(43200, 20000) < 86400)
    # = 0.9692, i.e. ~1.774M; the customers' mean rates (U(0,4)) vary the total by ~0.8 % (1 sd).
    assert 1.70e6 < len(df) < 1.85e6
    assert df["tx_time_days"].min() == 0 and df["tx_time_days"].max() == 182
    rate = df["is_fraud"].mean()
    assert 0.0070 < rate < 0.0100, rate
    shares = df.loc[df["is_fraud"] == 1, "fraud_scenario"].value_counts(normalize=True)
    assert shares[1] == pytest.approx(0.07, abs=0.02)
    assert shares[2] == pytest.approx(0.62, abs=0.06)
    assert shares[3] == pytest.approx(0.31, abs=0.05)
    # The first month has fewer frauds while scenarios build up.
    first = df.loc[df["tx_time_days"] < 30, "is_fraud"].mean()
    later = df.loc[df["tx_time_days"] >= 60, "is_fraud"].mean()
    assert first < later
    # About 100 terminals per customer at the defaults (pi * 5^2 * 10000 / 100^2 ~ 78.5 inside
    # the square; fewer near the edges).
    pop = make_population(SimulatorConfig(), np.random.default_rng(0))
    assert 55 < pop.nb_terminals_per_customer.mean() < 85
