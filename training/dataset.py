"""Training and test frames built as an analyst would: a Feast point-in-time join.

The entity frame is one row per transaction of a date range (``customer_id``, ``terminal_id``,
``event_timestamp`` = the transaction time). ``FeatureStore.get_historical_features`` joins, for
each row, the latest feature row of each view at or before that time (within the view's TTL);
the request features (amount, is_weekend, is_night) come from the transaction itself, exactly as
the prediction stage computes them online.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from stages.shared.schemas import CUSTOMER_FEATURES, MODEL_FEATURES, TERMINAL_FEATURES
from training.features import event_ms, is_night_ms, is_weekend_ms

if TYPE_CHECKING:
    from feast import FeatureStore

logger = logging.getLogger(__name__)

# Entity rows per Feast call: bounds the memory of the Dask merge (about 3 GB at 50k rows).
DEFAULT_CHUNK_ROWS = 50_000
ID_COLUMNS = ("transaction_id", "customer_id", "terminal_id", "tx_datetime")
STORED_FEATURES = (*CUSTOMER_FEATURES, *TERMINAL_FEATURES)


class MissingFeaturesError(RuntimeError):
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

    ``X`` has the ``MODEL_FEATURES`` columns in that order (float64); ``y`` the labels (int8);
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


def point_in_time_features(
    store: FeatureStore,
    window: pd.DataFrame,
    feature_service: str,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: bool = True,
) -> pd.DataFrame:
    """Stored features of each transaction by a Feast point-in-time join, in ``window`` order.

    Feast's file (Dask) offline store merges every entity row with the whole history of its key
    before filtering on time, so cost and memory grow with rows x history; the entity frame is
    sent in chunks of ``chunk_rows`` to bound memory (time is about linear either way).

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
    step = max(1, chunk_rows)
    calls: list[pd.DataFrame] = []
    for batch in _tie_free_batches(entity_df):
        calls.extend(batch.iloc[lo : lo + step] for lo in range(0, len(batch), step))
    parts = [
        store.get_historical_features(entity_df=call, features=service).to_df()
        for call in tqdm(calls, desc="point-in-time join", unit="call", disable=not progress)
    ]
    joined = pd.concat(parts, ignore_index=True)
    logger.info("point-in-time join of %d rows in %.1f s", len(joined), time.perf_counter() - t0)
    joined = joined.set_index("transaction_id").reindex(window["transaction_id"].to_numpy())
    out = pd.DataFrame(index=window.index)
    for name in STORED_FEATURES:
        if name not in joined.columns:
            raise KeyError(f"feature service {feature_service} did not return {name}")
        col = pd.to_numeric(joined[name], errors="raise").astype("float64").to_numpy()
        n_missing = int(np.isnan(col).sum())
        if n_missing:
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
    """Datasets of several ``(start day, number of days)`` windows with one point-in-time join.

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
    stored = point_in_time_features(store, union, feature_service, chunk_rows, progress)
    X_all = pd.concat([request_features(union), stored], axis=1)[list(MODEL_FEATURES)]
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
