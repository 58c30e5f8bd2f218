"""Training and test frames built as an analyst would: a Feast point-in-time join.

The entity frame is one row per transaction of a date range (``customer_id``, ``terminal_id``,
``event_timestamp`` = the transaction time). ``FeatureStore.get_historical_features`` joins, for
each row, the latest feature row of each view at or before that time (within the view's TTL);
the request features (amount, is_weekend, is_night) come from the transaction itself, exactly as
the prediction stage computes them online.

**Offline store.** Feast's file store by default; ``RTPIPE_FEAST__OFFLINE_STORE=spark`` runs
the same joins on Feast's Spark store (:mod:`training.spark_join`), with the same answer (tested
row for row in tests/integration/test_spark_offline_store.py).

**Speed.** Feast 0.67's file (Dask) offline store merges every entity row with the *whole*
history of its key before it applies the TTL, so a join over a few days of a six-month store
pays for six months. Each Feast call therefore runs against a *time-restricted snapshot* of the
offline store (:func:`offline_snapshot`): the same registry (same views, same feature service),
over a temporary copy of only the feature rows that can matter, those with an event time in
``[first entity time - view TTL, last entity time]``. The answer is the same by construction (a
point-in-time join with a TTL never reads a row outside that range); on the reference split
(7 + 7 days of a 183-day store) it cuts the join's CPU time about threefold.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from stages.shared.errors import RtpipeError
from stages.shared.schemas import (
    REQUEST_FEATURES,
    service_features,
)
from training.features import event_ms, is_night_ms, is_weekend_ms
from training.spark_join import check_one_row_per_entity_row, spark_store, uses_spark

if TYPE_CHECKING:
    from feast import FeatureService, FeatureStore

logger = logging.getLogger(__name__)

# Entity rows per Feast call: bounds the memory of the Dask merge (about 3 GB at 50k rows).
DEFAULT_CHUNK_ROWS = 50_000
ID_COLUMNS = ("transaction_id", "customer_id", "terminal_id", "tx_datetime")


def stored_features(feature_service: str) -> tuple[str, ...]:
    """The features of a service that come from Feast (all but the request features), in the
    model's column order.

    Raises:
        stages.shared.schemas.UnknownFeatureServiceError: an unknown service name.
    """
    return tuple(f for f in service_features(feature_service) if f not in REQUEST_FEATURES)


class MissingFeaturesError(RtpipeError, RuntimeError):
    """The point-in-time join found no feature row for some transactions."""

    def __init__(self, feature: str, n_missing: int, n_rows: int) -> None:
        super().__init__(
            f"{n_missing} of {n_rows} rows have no value for {feature}: "
            "is the offline store backfilled for this period?"
        )
        self.feature = feature
        self.n_missing = n_missing
        self.n_rows = n_rows


@dataclass(frozen=True, slots=True)
class Dataset:
    """Model inputs, labels and identifiers of one time window, aligned row by row.

    ``X`` has the feature service's model columns (``service_features``) in that order
    (float64); ``y`` the labels (int8);
    ``ids`` the ``transaction_id``, ``customer_id``, ``terminal_id``, ``tx_datetime``. Rows are
    sorted by transaction id (time order).
    """

    X: pd.DataFrame
    y: pd.Series
    ids: pd.DataFrame
    start: pd.Timestamp
    end: pd.Timestamp

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, keep: np.ndarray) -> Dataset:
        """The rows where ``keep`` (boolean, row-aligned) is True; same time bounds."""
        keep = np.asarray(keep, dtype=bool)
        return Dataset(
            X=self.X.loc[keep].reset_index(drop=True),
            y=self.y.loc[keep].reset_index(drop=True),
            ids=self.ids.loc[keep].reset_index(drop=True),
            start=self.start,
            end=self.end,
        )

    def slice_time(self, start: pd.Timestamp, end: pd.Timestamp) -> Dataset:
        """The rows with ``start <= tx_datetime < end``."""
        keep = ((self.ids["tx_datetime"] >= start) & (self.ids["tx_datetime"] < end)).to_numpy()
        return Dataset(
            X=self.X.loc[keep].reset_index(drop=True),
            y=self.y.loc[keep].reset_index(drop=True),
            ids=self.ids.loc[keep].reset_index(drop=True),
            start=start,
            end=end,
        )


def concat_datasets(parts: Sequence[Dataset]) -> Dataset:
    """Consecutive windows as one: rows in the given order, from the first start to the last end.

    Raises:
        ValueError: if ``parts`` is empty or the windows are not contiguous and in time order.
    """
    if not parts:
        raise ValueError("nothing to concatenate")
    for a, b in itertools.pairwise(parts):
        if a.end != b.start:
            raise ValueError(f"windows not contiguous: one ends {a.end}, the next starts {b.start}")
    return Dataset(
        X=pd.concat([p.X for p in parts], ignore_index=True),
        y=pd.concat([p.y for p in parts], ignore_index=True),
        ids=pd.concat([p.ids for p in parts], ignore_index=True),
        start=parts[0].start,
        end=parts[-1].end,
    )


def utc_day(day: str | pd.Timestamp) -> pd.Timestamp:
    """Midnight UTC of a date (naive dates are taken as UTC)."""
    ts = pd.Timestamp(day)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.floor("D")


def select_window(tx: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    """Transactions with ``start <= tx_datetime < end``, in transaction-id order."""
    keep = (tx["tx_datetime"] >= start) & (tx["tx_datetime"] < end)
    return tx.loc[keep].sort_values("transaction_id", kind="stable").reset_index(drop=True)


def request_features(tx: pd.DataFrame) -> pd.DataFrame:
    """The features computed from the event itself (REQUEST_FEATURES), one row per transaction."""
    ms = event_ms(tx["tx_datetime"])
    return pd.DataFrame(
        {
            "amount": tx["amount"].to_numpy(np.float64),
            "is_weekend": is_weekend_ms(ms),
            "is_night": is_night_ms(ms),
        },
        index=tx.index,
    )


def _tie_free_batches(entity_df: pd.DataFrame) -> list[pd.DataFrame]:
    """Split entity rows so that no batch repeats a (customer, time) or (terminal, time) pair.

    Feast's file offline store de-duplicates entity rows on the join keys seen so far plus the
    timestamp, so two transactions of one card in the same second would come back as one row.
    Such ties are rare: the first batch holds nearly everything, later ones a handful of rows.
    """
    batches = []
    rest = entity_df
    while len(rest):
        first = ~rest.duplicated(["customer_id", "event_timestamp"]) & ~rest.duplicated(
            ["terminal_id", "event_timestamp"]
        )
        batches.append(rest.loc[first])
        rest = rest.loc[~first]
    return batches


SNAPSHOT_PART = "part-snapshot.parquet"


def _snapshot_sources(store: FeatureStore) -> dict[str, tuple[Path, str, pd.Timedelta]] | None:
    """Per relative source path: (resolved folder, timestamp field, longest TTL of its views).

    None when some view is not backed by a relative-path Parquet FileSource (nothing to narrow
    then: the caller joins against the store as it is).
    """
    from feast.infra.offline_stores.file_source import FileSource

    out: dict[str, tuple[Path, str, pd.Timedelta]] = {}
    for fv in store.list_feature_views():
        src = fv.batch_source
        if not isinstance(src, FileSource) or Path(src.path).is_absolute() or "://" in src.path:
            return None
        if not fv.ttl:
            return None  # no TTL: every older row may matter
        folder = Path(FileSource.get_uri_for_file_path(store.config.repo_path, src.path))
        ttl = pd.Timedelta(fv.ttl)
        prev = out.get(src.path)
        out[src.path] = (folder, src.timestamp_field, max(ttl, prev[2]) if prev else ttl)
    return out


@contextmanager
def offline_snapshot(
    store: FeatureStore, start: pd.Timestamp, end: pd.Timestamp
) -> Iterator[FeatureStore]:
    """The store restricted to the feature rows a point-in-time join over ``[start, end]`` reads.

    A temporary repo folder gets, for each view's Parquet source, the rows with event time in
    ``[start - TTL, end]`` (one part file, same schema) and a copy of the registry; the store
    opened there has the same project, views and feature services. Falls back to ``store``
    itself when a source is not a relative-path Parquet folder or a view has no TTL.

    Args:
        store: the feature store (its registry and offline folders are only read).
        start: earliest entity timestamp of the join (tz-aware).
        end: latest entity timestamp of the join (inclusive).
    """
    from feast import FeatureStore

    sources = _snapshot_sources(store)
    if sources is None:
        logger.info("offline store not narrowable (non-file source or no TTL): full join")
        yield store
        return
    repo_path = Path(str(store.config.repo_path))
    tmp = Path(tempfile.mkdtemp(prefix="rtpipe-pit-"))
    try:
        for rel, (folder, ts_field, ttl) in sources.items():
            dataset = pds.dataset(folder, format="parquet")
            ts_type = dataset.schema.field(ts_field).type
            lo = pa.scalar((start - ttl).to_pydatetime(), ts_type)
            hi = pa.scalar(end.to_pydatetime(), ts_type)
            field = pds.field(ts_field)
            table = dataset.to_table(filter=(field >= lo) & (field <= hi))
            (tmp / rel).mkdir(parents=True)
            pq.write_table(table, tmp / rel / SNAPSHOT_PART)
        registry = Path(store.config.registry.path)
        if not registry.is_absolute():
            (tmp / registry).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo_path / registry, tmp / registry)
        config = store.config.model_copy(deep=True)
        config.repo_path = tmp
        yield FeatureStore(repo_path=str(tmp), config=config)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _time_chunks(batch: pd.DataFrame, chunk_rows: int) -> list[pd.DataFrame]:
    """Equal consecutive slices of at most ``chunk_rows`` rows, in time order (narrow snapshots)."""
    ordered = batch.sort_values("event_timestamp", kind="stable")
    n = -(-len(ordered) // max(1, chunk_rows))
    bounds = np.linspace(0, len(ordered), n + 1).round().astype(int)
    return [ordered.iloc[lo:hi] for lo, hi in itertools.pairwise(bounds)]


def _file_store_join(
    snapshot: FeatureStore, call: pd.DataFrame, service: FeatureService
) -> pd.DataFrame:
    """One Feast call on the file store, with the entity rows it loses joined view by view.

    Feast 0.67's file (Dask) store drops an entity row altogether when its key has rows in a
    view but none within ``[t - ttl, t]``: the TTL filter runs after the merge, and nothing
    keeps the unmatched row (a key with *no* rows survives with nulls). The documented
    semantics, which the Spark store follows, are a left join: the row stays, that view's
    features are null and the other views' features are filled. Lost rows are therefore joined
    again one view at a time, where a loss means exactly "null for this view".
    """
    out = snapshot.get_historical_features(entity_df=call.copy(), features=service).to_df()
    lost = call.loc[~call["transaction_id"].isin(out["transaction_id"])]
    if lost.empty:
        return out
    logger.info("file store dropped %d rows with only expired feature rows: per view", len(lost))
    patched = lost.set_index("transaction_id", drop=False)
    for projection in service.feature_view_projections:
        refs = [f"{projection.name_to_use()}:{f.name}" for f in projection.features]
        one = snapshot.get_historical_features(entity_df=lost.copy(), features=refs).to_df()
        names = [f.name for f in projection.features]
        patched[names] = one.set_index("transaction_id")[names].reindex(patched.index)
    return pd.concat([out, patched.reset_index(drop=True)], ignore_index=True)


def point_in_time_features(
    store: FeatureStore,
    window: pd.DataFrame,
    feature_service: str,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: bool = True,
    allow_missing: bool = False,
) -> pd.DataFrame:
    """Stored features of each transaction by a Feast point-in-time join, in ``window`` order.

    Feast's file (Dask) offline store merges every entity row with the history of its key
    before filtering on time, so cost and memory grow with rows x history: the entity frame is
    sent in time-ordered chunks of ``chunk_rows``, each against an :func:`offline_snapshot`
    holding only the feature rows of its time range. With the Spark offline store selected
    (``RTPIPE_FEAST__OFFLINE_STORE=spark``) the same calls go to Feast's Spark store over the
    same Parquet folders (:mod:`training.spark_join`), which filters on time itself.

    With ``allow_missing``, transactions without a stored row get NaN instead of an error
    (the skew check counts them).

    Raises:
        MissingFeaturesError: if some transaction has no stored feature row.
    """
    service = store.get_feature_service(feature_service)
    entity_df = pd.DataFrame(
        {
            "transaction_id": window["transaction_id"].to_numpy(np.int64),
            "customer_id": window["customer_id"].to_numpy(np.int64),
            "terminal_id": window["terminal_id"].to_numpy(np.int64),
            "event_timestamp": window["tx_datetime"].dt.tz_convert("UTC"),
        }
    )
    t0 = time.perf_counter()
    calls: list[pd.DataFrame] = []
    for batch in _tie_free_batches(entity_df):
        calls.extend(_time_chunks(batch, chunk_rows))
    parts = []
    spark = uses_spark(store)
    with spark_store(store) if spark else nullcontext(store) as base:
        for call in tqdm(calls, desc="point-in-time join", unit="call", disable=not progress):
            if spark:
                # Spark filters each source on the call's time range itself (pushed down to
                # the Parquet scan): no snapshot needed.
                job = base.get_historical_features(entity_df=call, features=service)
                parts.append(job.to_df())
                continue
            ts = call["event_timestamp"]
            with offline_snapshot(base, ts.min(), ts.max()) as snapshot:
                parts.append(_file_store_join(snapshot, call, service))
    joined = pd.concat(parts, ignore_index=True)
    if spark:
        check_one_row_per_entity_row(joined)
    logger.info(
        "point-in-time join of %d rows in %.1f s (%s offline store)",
        len(joined),
        time.perf_counter() - t0,
        "spark" if spark else "file",
    )
    joined = joined.set_index("transaction_id").reindex(window["transaction_id"].to_numpy())
    out = pd.DataFrame(index=window.index)
    for name in stored_features(feature_service):
        if name not in joined.columns:
            raise KeyError(f"feature service {feature_service} did not return {name}")
        col = pd.to_numeric(joined[name], errors="raise").astype("float64").to_numpy()
        n_missing = int(np.isnan(col).sum())
        if n_missing and not allow_missing:
            raise MissingFeaturesError(name, n_missing, len(col))
        out[name] = col
    return out


def build_datasets(
    store: FeatureStore,
    tx: pd.DataFrame,
    windows: Sequence[tuple[pd.Timestamp | str, int]],
    feature_service: str,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: bool = True,
) -> list[Dataset]:
    """Datasets of several ``(start day, number of days)`` windows by point-in-time joins.

    Args:
        store: an open feature store whose offline store holds the feature history.
        tx: the transactions (at least ids, ``tx_datetime``, ``amount``, ``is_fraud``).
        windows: ``(first day, days)`` pairs; days are UTC calendar days.
        feature_service: name of the feature service the model uses.
        chunk_rows: entity rows per Feast call.
        progress: show a progress bar over the chunks.

    Returns:
        One aligned ``Dataset`` per window, in the given order.

    Raises:
        MissingFeaturesError: if some transaction has no stored feature row.
        ValueError: if a window holds no transaction.
    """
    spans = []
    frames = []
    for start, days in windows:
        begin = utc_day(start)
        end = begin + pd.Timedelta(days=days)
        window = select_window(tx, begin, end)
        if window.empty:
            raise ValueError(f"no transactions in [{begin}, {end})")
        spans.append((begin, end))
        frames.append(window)
    union = pd.concat(frames, ignore_index=True)
    # One join per window: a snapshot spanning two windows would also hold the gap between them.
    stored = pd.concat(
        [
            point_in_time_features(store, window, feature_service, chunk_rows, progress)
            for window in frames
        ],
        ignore_index=True,
    )
    X_all = pd.concat([request_features(union), stored], axis=1)[
        list(service_features(feature_service))
    ]
    X_all = X_all.astype("float64")
    out = []
    offset = 0
    for (begin, end), window in zip(spans, frames, strict=True):
        rows = slice(offset, offset + len(window))
        offset += len(window)
        out.append(
            Dataset(
                X=X_all.iloc[rows].reset_index(drop=True),
                y=window["is_fraud"].astype("int8").reset_index(drop=True),
                ids=window[list(ID_COLUMNS)].reset_index(drop=True),
                start=begin,
                end=end,
            )
        )
    return out


def build_dataset(
    store: FeatureStore,
    tx: pd.DataFrame,
    start: pd.Timestamp | str,
    days: int,
    feature_service: str,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: bool = True,
) -> Dataset:
    """Point-in-time features for every transaction of ``[start, start + days)``.

    See :func:`build_datasets`, of which this is the one-window case.
    """
    return build_datasets(store, tx, [(start, days)], feature_service, chunk_rows, progress)[0]
