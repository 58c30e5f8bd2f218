"""The Feast repo against real Redis: apply (Python and CLI), point-in-time history, materialize.

Each test works on its own copy of ``feature_repo/`` (own registry, own Parquet folders) and its
own Feast project, so Redis keys (suffixed by the project) never collide across tests.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stages.ops.harness.sandbox import clear_online_store, isolated_settings
from stages.shared.feast_store import apply_repo, materialize, open_feature_store
from stages.shared.offline import OfflineSchemaError, read_offline, write_offline
from stages.shared.online.reader import OnlineFeatureReader
from stages.shared.schemas import (
    BEHAVIOUR_FEATURES,
    BEHAVIOUR_VIEW,
    CUSTOMER_FEATURES,
    CUSTOMER_VIEW,
    REQUEST_FEATURES,
    SERVICE_FEATURES,
    TERMINAL_FEATURES,
    TERMINAL_VIEW,
    service_features,
)
from stages.shared.settings import Settings
from training.features import backfill_offline_store
from training.skew import check_skew

pytestmark = pytest.mark.integration

T0 = datetime(2025, 6, 1, tzinfo=UTC)


@pytest.fixture
def feast_settings(stack_settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """Settings on a private repo copy and a unique Feast project."""
    settings = isolated_settings(stack_settings, tmp_path)
    yield settings
    clear_online_store(settings)


def customer_rows(ids: list[int], ts: list[datetime], base: float, **extra: object) -> pd.DataFrame:
    n = len(ids)
    data: dict[str, object] = {"customer_id": np.array(ids, dtype=np.int64)}
    for i, name in enumerate(CUSTOMER_FEATURES):
        if "nb_tx" in name:
            data[name] = np.arange(n, dtype=np.int64) + int(base) + i
        else:
            data[name] = np.arange(n, dtype=np.float64) + base + i / 10
    data["event_timestamp"] = pd.to_datetime(ts, utc=True)
    data["created_timestamp"] = pd.to_datetime(ts, utc=True)
    data.update(extra)
    return pd.DataFrame(data)


def test_apply_repo_registers_entities_views_and_service(feast_settings: Settings) -> None:
    apply_repo(feast_settings)
    store = open_feature_store(feast_settings)
    assert store.project == feast_settings.feast_project
    entities = {e.name: e.join_key for e in store.list_entities()}
    assert entities == {"customer": "customer_id", "terminal": "terminal_id"}
    views = {fv.name: fv for fv in store.list_feature_views()}
    assert set(views) == {CUSTOMER_VIEW, TERMINAL_VIEW, BEHAVIOUR_VIEW}
    assert tuple(f.name for f in views[CUSTOMER_VIEW].features) == CUSTOMER_FEATURES
    assert tuple(f.name for f in views[TERMINAL_VIEW].features) == TERMINAL_FEATURES
    assert tuple(f.name for f in views[BEHAVIOUR_VIEW].features) == BEHAVIOUR_FEATURES
    dtypes = {f.name: str(f.dtype) for fv in views.values() for f in fv.features}
    # Counts (nb_tx, nb_terminals) are Int64, everything else Float64.
    assert all(dtypes[n] == ("Int64" if "nb_" in n else "Float64") for n in dtypes)
    assert views[BEHAVIOUR_VIEW].ttl == timedelta(days=31)
    behaviour_push = views[BEHAVIOUR_VIEW].stream_source
    assert behaviour_push is not None and behaviour_push.name == "customer_behaviour_push"
    assert views[CUSTOMER_VIEW].ttl == timedelta(days=31)
    push = views[CUSTOMER_VIEW].stream_source
    assert push is not None and push.name == "customer_spending_push"
    service = store.get_feature_service("fraud_model_v1")
    assert [p.name for p in service.feature_view_projections] == [CUSTOMER_VIEW, TERMINAL_VIEW]
    v2 = store.get_feature_service("fraud_model_v2")
    assert [p.name for p in v2.feature_view_projections] == [
        CUSTOMER_VIEW,
        TERMINAL_VIEW,
        BEHAVIOUR_VIEW,
    ]
    # Each service serves exactly the model inputs (after the request features) that
    # stages.shared.schemas orders the model's columns by.
    for name, model_features in SERVICE_FEATURES.items():
        projections = store.get_feature_service(name).feature_view_projections
        served = tuple(f.name for p in projections for f in p.features)
        assert (*REQUEST_FEATURES, *served) == model_features, name
    # The registry lives in the repo copy, not in the working directory.
    assert (feast_settings.feature_repo / "data" / "registry.db").is_file()
    # Applying again is a no-op, not an error.
    apply_repo(feast_settings)
    assert {fv.name for fv in open_feature_store(feast_settings).list_feature_views()} == set(views)


def test_feast_cli_apply_from_the_repo_folder(stack_settings: Settings, tmp_path: Path) -> None:
    settings = isolated_settings(stack_settings, tmp_path)
    repo = settings.feature_repo
    config = yaml.safe_load((repo / "feature_store.yaml").read_text())
    config["project"] = settings.feast_project
    config["online_store"]["connection_string"] = stack_settings.redis.feast_connection_string()
    (repo / "feature_store.yaml").write_text(yaml.safe_dump(config))
    feast = Path(sys.executable).with_name("feast")
    proc = subprocess.run(
        [str(feast), "apply"], cwd=repo, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    store = open_feature_store(settings)
    assert {fv.name for fv in store.list_feature_views()} == {
        CUSTOMER_VIEW,
        TERMINAL_VIEW,
        BEHAVIOUR_VIEW,
    }
    assert store.get_feature_service("fraud_model_v1").name == "fraud_model_v1"
    assert store.get_feature_service("fraud_model_v2").name == "fraud_model_v2"


def test_historical_features_point_in_time_across_part_files(feast_settings: Settings) -> None:
    apply_repo(feast_settings)
    # Two part files: history of customer 1 split across them, out of order on purpose.
    p1 = write_offline(
        feast_settings,
        CUSTOMER_VIEW,
        customer_rows([1, 2], [T0 + timedelta(hours=2), T0], base=100.0),
    )
    # Not the same event time on purpose: with several Dask partitions Feast 0.67 does not
    # reliably break event-time ties by created_timestamp (its second sort is not stable).
    late = customer_rows([1, 1], [T0, T0 - timedelta(days=40)], base=300.0)
    late["created_timestamp"] = pd.to_datetime([T0 + timedelta(minutes=5)] * 2, utc=True)
    first = customer_rows([1], [T0 - timedelta(minutes=1)], base=200.0)
    p2 = write_offline(feast_settings, CUSTOMER_VIEW, pd.concat([first, late], ignore_index=True))
    assert p1.parent == p2.parent and p1 != p2
    assert len(read_offline(feast_settings, CUSTOMER_VIEW)) == 5

    entity_df = pd.DataFrame(
        {
            "customer_id": np.array([1, 1, 1, 2], dtype=np.int64),
            "event_timestamp": pd.to_datetime(
                [
                    T0 - timedelta(days=39),  # only the 40-day-old row is at or before this
                    T0 + timedelta(hours=1),  # the T0 row (base 300), not the T0-1min one
                    T0 + timedelta(hours=3),  # the T0+2h row, from the other part file
                    T0 + timedelta(days=1),  # customer 2's only row
                ],
                utc=True,
            ),
        }
    )
    store = open_feature_store(feast_settings)
    out = (
        store.get_historical_features(
            entity_df=entity_df, features=[f"{CUSTOMER_VIEW}:customer_avg_amount_1d"]
        )
        .to_df()
        .sort_values(["customer_id", "event_timestamp"])
        .reset_index(drop=True)
    )
    # base 300 rows: T0 -> 300.1, T0-40d -> 301.1; part 1: customer 1 -> 100.1, 2 -> 101.1.
    assert out["customer_avg_amount_1d"].tolist() == pytest.approx([301.1, 300.1, 100.1, 101.1])


def test_feast_dask_store_limitations_with_part_files(feast_settings: Settings) -> None:
    """Pins two Feast 0.67 file-store behaviours that callers must work around.

    If either assertion starts failing, Feast changed and the workaround can go.
    """
    apply_repo(feast_settings)
    write_offline(feast_settings, CUSTOMER_VIEW, customer_rows([1], [T0], base=1.0))
    write_offline(feast_settings, CUSTOMER_VIEW, customer_rows([2], [T0], base=2.0))
    store = open_feature_store(feast_settings)
    features = [f"{CUSTOMER_VIEW}:customer_avg_amount_1d"]

    def entity_df(ids: list[int], ts: list[datetime]) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "customer_id": np.array(ids, dtype=np.int64),
                "event_timestamp": pd.to_datetime(ts, utc=True),
            }
        )

    # 1. Entity rows with no row inside [ts - ttl, ts] are dropped, not returned as nulls.
    early = entity_df([1, 2], [T0 + timedelta(hours=1), T0 - timedelta(hours=1)])
    out = store.get_historical_features(entity_df=early, features=features).to_df()
    assert out["customer_id"].tolist() == [1]
    # 2. An entity with no offline rows at all, over several part files, crashes Dask.
    unknown = entity_df([1, 3], [T0 + timedelta(hours=1)] * 2)
    with pytest.raises(NotImplementedError, match="Divisions calculation failed"):
        store.get_historical_features(entity_df=unknown, features=features).to_df()


def test_write_offline_validates_against_the_view(feast_settings: Settings) -> None:
    good = customer_rows([1], [T0], base=1.0)
    with pytest.raises(OfflineSchemaError, match="unexpected"):
        write_offline(feast_settings, CUSTOMER_VIEW, good.assign(extra=1))
    with pytest.raises(OfflineSchemaError, match="missing"):
        write_offline(feast_settings, CUSTOMER_VIEW, good.drop(columns=["customer_nb_tx_1d"]))
    with pytest.raises(OfflineSchemaError, match="timezone-aware"):
        naive = good.assign(event_timestamp=good["event_timestamp"].dt.tz_localize(None))
        write_offline(feast_settings, CUSTOMER_VIEW, naive)
    with pytest.raises(OfflineSchemaError, match="integer"):
        write_offline(feast_settings, CUSTOMER_VIEW, good.assign(customer_nb_tx_1d=1.5))
    with pytest.raises(OfflineSchemaError, match="no such feature view"):
        write_offline(feast_settings, "nope", good)
    # Nothing half-written is left behind by the failures above.
    folder = feast_settings.offline_dir / CUSTOMER_VIEW
    assert not folder.exists() or not any(folder.iterdir())
    # Other time zones are converted to UTC; columns may come in any order.
    paris = good.assign(event_timestamp=good["event_timestamp"].dt.tz_convert("Europe/Paris")).iloc[
        :, ::-1
    ]
    path = write_offline(feast_settings, CUSTOMER_VIEW, paris)
    back = read_offline(feast_settings, CUSTOMER_VIEW)
    assert path.name.startswith("part-") and path.suffix == ".parquet"
    assert back["event_timestamp"].iloc[0] == pd.Timestamp(T0)
    assert str(back["event_timestamp"].dt.tz) == "UTC"
    assert back["customer_nb_tx_1d"].dtype == np.int64


def test_materialize_loads_latest_rows_into_redis(feast_settings: Settings) -> None:
    apply_repo(feast_settings)
    write_offline(feast_settings, CUSTOMER_VIEW, customer_rows([1, 2], [T0, T0], base=10.0))
    write_offline(
        feast_settings,
        CUSTOMER_VIEW,
        customer_rows([1], [T0 + timedelta(hours=1)], base=50.0),
    )
    materialize(feast_settings, T0 - timedelta(days=1), T0 + timedelta(days=1))

    store = open_feature_store(feast_settings)
    resp = store.get_online_features(
        features=[f"{CUSTOMER_VIEW}:{f}" for f in CUSTOMER_FEATURES],
        entity_rows=[{"customer_id": 1}, {"customer_id": 2}, {"customer_id": 3}],
    ).to_dict()
    assert resp["customer_avg_amount_1d"] == pytest.approx([50.1, 11.1, None])
    assert resp["customer_nb_tx_7d"] == [52, 13, None]

    reader = OnlineFeatureReader(feast_settings.redis.client(), store, "fraud_model_v1")
    batch = reader.read({"customer_id": np.array([1, 2, 3]), "terminal_id": np.array([1, 1, 1])})
    col = reader.feature_names.index("customer_avg_amount_1d")
    np.testing.assert_allclose(batch.values[:, col], [50.1, 11.1, np.nan])
    t0_ms = int(T0.timestamp() * 1000)
    np.testing.assert_array_equal(batch.event_ts_ms[CUSTOMER_VIEW], [t0_ms + 3_600_000, t0_ms, 0])
    assert not batch.found[TERMINAL_VIEW].any()


def test_backfilled_v2_history_joins_to_the_batch_definitions(
    feast_settings: Settings, small_tx: pd.DataFrame
) -> None:
    """``backfill_offline_store`` writes all three views; the training path's point-in-time
    join of fraud_model_v2 returns the batch definitions (the offline half of check-skew)."""
    apply_repo(feast_settings)
    paths = backfill_offline_store(feast_settings, small_tx)
    assert set(paths) == {CUSTOMER_VIEW, TERMINAL_VIEW, BEHAVIOUR_VIEW}
    day = small_tx["tx_datetime"] >= pd.Timestamp("2018-05-10", tz="UTC")
    day &= small_tx["tx_datetime"] < pd.Timestamp("2018-05-11", tz="UTC")
    ids = small_tx.loc[day, "transaction_id"]
    assert len(ids) > 100
    report = check_skew(
        feast_settings, small_tx, None, ids, feature_service="fraud_model_v2", progress=False
    )
    assert report.offline is not None and report.missing_offline == 0
    assert list(report.offline.index) == list(service_features("fraud_model_v2"))
    assert report.ok, str(report)
