"""Feast's Spark offline store (pyspark, local mode) against the file store: same training sets.

One feature repo copy (own registry, own Parquet folders) holds a small simulated history
(backfilled like ``rtpipe backfill``) and, under ids the simulator never uses, hand-written
rows for the point-in-time edge cases. Every training set is built twice, with
``offline_store="file"`` and ``"spark"``, and compared exactly, column by column. No Kafka or
Redis: the offline store is Parquet and Spark runs inside the test process (its JVM started
once per module, stopped at the end).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from feast import FeatureStore

from stages.ops.harness.sandbox import isolated_settings
from stages.shared.feast_store import apply_repo, open_feature_store
from stages.shared.offline import write_offline
from stages.shared.schemas import (
    BEHAVIOUR_FEATURES,
    BEHAVIOUR_VIEW,
    CUSTOMER_FEATURES,
    CUSTOMER_VIEW,
    TERMINAL_FEATURES,
    TERMINAL_VIEW,
)
from stages.shared.settings import Settings
from tests.support import make_test_settings
from training.dataset import (
    build_datasets,
    offline_snapshot,
    point_in_time_features,
    stored_features,
)
from training.features import backfill_offline_store
from training.simulate import SimulatorConfig, simulate
from training.spark_join import DuplicateFeatureRowsError, spark_store

pytestmark = [
    pytest.mark.integration,
    # Feast flags its Spark store and source as alpha on every call; known and accepted here.
    pytest.mark.filterwarnings("ignore:The spark .* experimental feature:RuntimeWarning"),
]

SIM = SimulatorConfig(n_customers=30, n_terminals=60, nb_days=16, seed=11)
# Edge-case rows live far from the simulated period (2018) under ids above the simulator's.
T0 = datetime(2025, 6, 1, tzinfo=UTC)
DAY = timedelta(days=1)
TTL = timedelta(days=31)  # feature_views.AGGREGATE_TTL, every view
C1, C2, C3, C4, C5 = 90_001, 90_002, 90_003, 90_004, 90_005
K1, K2, K3 = 90_001, 90_002, 90_003
VIEW_FEATURES = {
    CUSTOMER_VIEW: ("customer_id", CUSTOMER_FEATURES),
    TERMINAL_VIEW: ("terminal_id", TERMINAL_FEATURES),
    BEHAVIOUR_VIEW: ("customer_id", BEHAVIOUR_FEATURES),
}


def view_rows(view: str, rows: list[tuple[int, datetime, datetime, int]]) -> pd.DataFrame:
    """Offline rows of ``view`` from ``(key, event time, created time, base)``: feature ``i``
    of a row is ``base + i`` (counts) or ``base + i + 0.5`` (rates, means)."""
    key, names = VIEW_FEATURES[view]
    data: dict[str, object] = {key: np.array([r[0] for r in rows], dtype=np.int64)}
    bases = np.array([r[3] for r in rows], dtype=np.int64)
    for i, name in enumerate(names):
        data[name] = bases + i if "nb_" in name else bases + i + 0.5
    data["event_timestamp"] = pd.to_datetime([r[1] for r in rows], utc=True)
    data["created_timestamp"] = pd.to_datetime([r[2] for r in rows], utc=True)
    return pd.DataFrame(data)


def expected_values(view: str, base: float) -> dict[str, float]:
    """The features a row of ``view`` with ``base`` holds (NaN base: no row joined)."""
    _, names = VIEW_FEATURES[view]
    return {n: base + i + (0 if "nb_" in n else 0.5) for i, n in enumerate(names)}


def write_edge_rows(settings: Settings) -> None:
    """Feature rows whose joins exercise exact-time matches, TTL bounds and ties."""
    write_offline(
        settings,
        CUSTOMER_VIEW,
        view_rows(
            CUSTOMER_VIEW,
            [
                (C1, T0, T0, 10),
                (C1, T0 + DAY, T0 + DAY, 20),
                (C3, T0, T0, 40),
                # Same event time, created an hour apart: the later-created row wins.
                (C4, T0, T0, 50),
                (C4, T0, T0 + timedelta(hours=1), 60),
                # Same event and created time: no order defined (test_full_tie...).
                (C5, T0, T0, 80),
                (C5, T0, T0, 90),
            ],
        ),
    )
    write_offline(
        settings,
        TERMINAL_VIEW,
        view_rows(
            TERMINAL_VIEW,
            [
                (K1, T0, T0, 70),
                # After the entity row that uses K2: the key has history, none usable yet.
                (K2, T0 + 2 * DAY, T0 + 2 * DAY, 75),
                (K3, T0 + 20 * DAY, T0 + 20 * DAY, 77),
            ],
        ),
    )
    write_offline(settings, BEHAVIOUR_VIEW, view_rows(BEHAVIOUR_VIEW, [(C1, T0, T0, 30)]))


NAN = float("nan")


def bases(customer: float, terminal: float, behaviour: float) -> dict[str, float]:
    """The base of the row each view must join (NaN: none)."""
    return {CUSTOMER_VIEW: customer, TERMINAL_VIEW: terminal, BEHAVIOUR_VIEW: behaviour}


# (transaction id, customer, terminal, time) and the bases of the rows joined.
EDGE_ROWS: list[tuple[int, int, int, datetime, dict[str, float]]] = [
    # A feature row exactly at the event time is joined (<=), not the one before it.
    (1, C1, K1, T0 + DAY, bases(20, 70, 30)),
    (2, C1, K1, T0 + DAY - timedelta(seconds=1), bases(10, 70, 30)),
    # Its terminal's only row is in the future (the customer's rows are valid).
    (3, C1, K2, T0 + DAY + timedelta(seconds=1), bases(20, NAN, 30)),
    # A customer without any feature row.
    (4, C2, K1, T0 + DAY, bases(NAN, 70, NAN)),
    # Exactly one TTL after the rows: still valid (t - ttl <= event_timestamp)...
    (5, C3, K1, T0 + TTL, bases(40, 70, NAN)),
    # ... one second later they have expired (the terminal's row is recent).
    (6, C3, K3, T0 + TTL + timedelta(seconds=1), bases(NAN, 77, NAN)),
    # Two rows at one event time: the one created later.
    (7, C4, K1, T0 + DAY, bases(60, 70, NAN)),
    # Same customer and time as 1 (an entity-row tie): sent in a call of its own.
    (8, C1, K1, T0 + DAY, bases(20, 70, 30)),
]


def window_of(rows: list[tuple[int, int, int, datetime, dict[str, float]]]) -> pd.DataFrame:
    """A transactions frame (the columns ``point_in_time_features`` reads) of edge rows."""
    return pd.DataFrame(
        {
            "transaction_id": np.array([r[0] for r in rows], dtype=np.int64),
            "customer_id": np.array([r[1] for r in rows], dtype=np.int64),
            "terminal_id": np.array([r[2] for r in rows], dtype=np.int64),
            "tx_datetime": pd.to_datetime([r[3] for r in rows], utc=True),
        }
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, pd.DataFrame]]:
    """A repo copy with a simulated history and the edge rows; Spark stopped afterwards."""
    settings = isolated_settings(make_test_settings(), tmp_path_factory.mktemp("spark"))
    apply_repo(settings)
    tx = simulate(SIM, progress=False)
    backfill_offline_store(settings, tx)
    write_edge_rows(settings)
    yield settings, tx
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    if session is not None:
        session.stop()


@pytest.fixture(scope="module")
def stores(repo: tuple[Settings, pd.DataFrame]) -> dict[str, FeatureStore]:
    settings, _ = repo
    return {kind: open_feature_store(settings, kind) for kind in ("file", "spark")}


@pytest.mark.parametrize("service", ["fraud_model_v1", "fraud_model_v2"])
def test_training_sets_are_identical(
    repo: tuple[Settings, pd.DataFrame], stores: dict[str, FeatureStore], service: str
) -> None:
    _, tx = repo
    # A window whose 30-day history reaches back before the first simulated day (partial
    # TTL-bounded history) and ends on the last one.
    windows: list[tuple[pd.Timestamp | str, int]] = [("2018-04-11", 5)]
    file_sets = build_datasets(stores["file"], tx, windows, service, progress=False)
    spark_sets = build_datasets(stores["spark"], tx, windows, service, progress=False)
    for a, b in zip(file_sets, spark_sets, strict=True):
        assert len(a) > 60 and (a.start, a.end) == (b.start, b.end)
        assert list(b.X.columns) == list(a.X.columns)
        pd.testing.assert_frame_equal(b.X, a.X, check_exact=True)
        pd.testing.assert_series_equal(b.y, a.y, check_exact=True)
        pd.testing.assert_frame_equal(b.ids, a.ids, check_exact=True)
        # Not a comparison of two empty or constant answers.
        assert a.X.notna().all().all() and a.X["customer_nb_tx_30d"].nunique() > 5


def test_point_in_time_edge_cases_agree_and_are_right(stores: dict[str, FeatureStore]) -> None:
    window = window_of(EDGE_ROWS)
    service = "fraud_model_v2"
    got = {
        kind: point_in_time_features(store, window, service, progress=False, allow_missing=True)
        for kind, store in stores.items()
    }
    pd.testing.assert_frame_equal(got["spark"], got["file"], check_exact=True)
    expected = pd.DataFrame(
        [
            {k: v for view, base in bases.items() for k, v in expected_values(view, base).items()}
            for *_, bases in EDGE_ROWS
        ]
    )[list(stored_features(service))]
    pd.testing.assert_frame_equal(got["spark"], expected, check_exact=True)


def test_raw_feast_frames_differ_only_as_documented(stores: dict[str, FeatureStore]) -> None:
    """What each store's ``get_historical_features`` returns before ``training.dataset``.

    Conversions: Spark keeps the entity order and returns naive UTC times (session time zone
    UTC), the file store sorts by time and returns tz-aware UTC; a count column is int64, or
    float64 with NaN where a row has none (so Spark, keeping rows 3 and 6, has more float64).
    The file store loses entity rows whose key has rows but none within the TTL (3 and 6 here;
    training.dataset joins those again view by view).
    """
    rows = [r for r in EDGE_ROWS if r[0] != 8]  # tie-free on (customer, time), as sent
    entity_df = window_of(rows).rename(columns={"tx_datetime": "event_timestamp"})
    service = stores["file"].get_feature_service("fraud_model_v2")
    ts = entity_df["event_timestamp"]
    # As training.dataset calls it: on the rows of the entities' time range only.
    with offline_snapshot(stores["file"], ts.min(), ts.max()) as snapshot:
        file_job = snapshot.get_historical_features(entity_df=entity_df.copy(), features=service)
        file_df = file_job.to_df().sort_values("transaction_id", ignore_index=True)
    with spark_store(stores["spark"]) as spark:
        spark_df = spark.get_historical_features(entity_df=entity_df.copy(), features=service)
        spark_df = spark_df.to_df().sort_values("transaction_id", ignore_index=True)
    assert spark_df["transaction_id"].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert file_df["transaction_id"].tolist() == [1, 2, 4, 5, 7]
    assert list(spark_df.columns) == list(file_df.columns)
    assert spark_df["event_timestamp"].dt.tz is None
    spark_df["event_timestamp"] = spark_df["event_timestamp"].dt.tz_localize("UTC")
    # Both: a count (Int64 in the view) is int64 unless some row has no value (then float64,
    # NaN), every other feature float64.
    for frame in (file_df, spark_df):
        for name in stored_features("fraud_model_v2"):
            integer = "nb_" in name and bool(frame[name].notna().all())
            assert frame[name].dtype == (np.int64 if integer else np.float64), name
    kept = spark_df.loc[spark_df["transaction_id"].isin(file_df["transaction_id"])]
    pd.testing.assert_frame_equal(
        kept.reset_index(drop=True), file_df, check_exact=True, check_dtype=False
    )


def test_full_tie_is_an_error_on_spark(stores: dict[str, FeatureStore]) -> None:
    """Two rows of one key with equal event and created time: Feast defines no winner. The file
    store keeps one of them; Spark joins both, which the dataset build refuses."""
    window = window_of([(9, C5, K1, T0 + DAY, {})])
    file_row = point_in_time_features(stores["file"], window, "fraud_model_v1", progress=False)
    assert file_row["customer_nb_tx_1d"].iloc[0] in (80, 90)
    with pytest.raises(DuplicateFeatureRowsError, match="transaction ids \\[9\\]"):
        point_in_time_features(stores["spark"], window, "fraud_model_v1", progress=False)
