"""Batch (reference) computation of the model inputs: the 15 of SIMULATOR.md (feature service
v1) and the customer behaviour features of v2 (defined in ``stages.shared.schemas``).

This is the definition the streaming enrichment stage must agree with (the skew check compares
them). Everything is vectorised: rows are sorted by (entity, time, transaction id) and each window
bound is one ``numpy.searchsorted`` over a combined (entity, time) key; counts and sums come from
cumulative sums.

Time is handled in integer milliseconds since the epoch (the Kafka timestamp resolution).

Windows, for a transaction at time ``t`` by customer ``c`` on terminal ``k``:

* customer spending over ``(t - n days, t]``, current transaction included. **Ties**: two
  transactions of one customer at the same millisecond are counted in transaction-id order, as a
  stream processes them: the earlier one's window does not contain the later one, the later one's
  does contain the earlier one.
* terminal risk over ``(t - (7 + n) days, t - 7 days]``: a label is known exactly 7 days after its
  transaction, so a transaction exactly 7 days before ``t`` counts and one 6 days 23 h before
  does not. Ties do not matter here (the current transaction is never in its own window).

Offline-store rows (:func:`customer_feature_rows`, :func:`terminal_feature_rows`) hold one row per
(entity, timestamp): where an entity has several transactions at the same timestamp, only the
row of the last one (highest transaction id) is kept, so a point-in-time join at that timestamp
deterministically returns the state after all of them. For the earlier transactions of such a
tie, the joined customer features therefore include the later same-timestamp transactions (a
count one higher than :func:`compute_features`); this affects a handful of rows per data set and
is accepted rather than inventing sub-second timestamps.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import pandas as pd
from pandas.api.indexers import BaseIndexer

from stages.shared.offline import write_offline
from stages.shared.schemas import (
    AMOUNT_RATIO_DAYS,
    BEHAVIOUR_FEATURES,
    BEHAVIOUR_VIEW,
    CUSTOMER_FEATURES,
    CUSTOMER_VIEW,
    DAY_MS,
    DISTINCT_TERMINAL_DAYS,
    LABEL_DELAY_DAYS,
    MAX_AMOUNT_DAYS,
    MAX_GAP_S,
    MEDIAN_RATIO_DAYS,
    MODEL_FEATURES,
    MODEL_FEATURES_V2,
    TERMINAL_FEATURES,
    TERMINAL_VIEW,
    WINDOWS_DAYS,
)

if TYPE_CHECKING:
    from stages.shared.settings import Settings

logger = logging.getLogger(__name__)

ID_COLUMNS = ("transaction_id", "customer_id", "terminal_id", "tx_datetime")
REQUIRED_COLUMNS = (*ID_COLUMNS, "amount", "is_fraud")


def event_ms(ts: pd.Series) -> np.ndarray:
    """Milliseconds since the epoch (int64) of a tz-aware UTC datetime series."""
    if not isinstance(ts.dtype, pd.DatetimeTZDtype):
        raise TypeError(f"{ts.name} must be a tz-aware (UTC) datetime column, got {ts.dtype}")
    return ts.dt.tz_convert("UTC").astype("datetime64[ms, UTC]").astype("int64").to_numpy()


def is_weekend_ms(ms: np.ndarray) -> np.ndarray:
    """Vectorised :func:`stages.shared.schemas.is_weekend` (UTC; 1970-01-01 was a Thursday)."""
    return (((ms // DAY_MS + 3) % 7) >= 5).astype(np.int64)


def is_night_ms(ms: np.ndarray) -> np.ndarray:
    """Vectorised :func:`stages.shared.schemas.is_night` (UTC hour <= 6)."""
    return (((ms % DAY_MS) // 3_600_000) <= 6).astype(np.int64)


def _grouped_keys(entity: np.ndarray, ms: np.ndarray, tid: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sort by (entity, time, id); return (order, sorted key) with key = group offset + time.

    Groups are spaced further apart than any window plus the whole time span, so a searchsorted
    on ``key - window`` never crosses into the previous entity.
    """
    order = np.lexsort((tid, ms, entity))
    ent = entity[order]
    if not ent.size:
        return order, ms.astype(np.int64)
    codes = np.concatenate([[0], np.cumsum(ent[1:] != ent[:-1])])
    t0 = int(ms.min())
    stride = int(ms.max()) - t0 + (LABEL_DELAY_DAYS + max(WINDOWS_DAYS)) * DAY_MS + 1
    if int(codes[-1]) + 1 > np.iinfo(np.int64).max // stride:
        raise OverflowError("too many entities for the time span to build an int64 window key")
    key = codes.astype(np.int64) * stride + (ms[order] - t0)
    return order, key


def _customer_windows(
    customer: np.ndarray, ms: np.ndarray, tid: np.ndarray, amount: np.ndarray
) -> dict[str, np.ndarray]:
    order, key = _grouped_keys(customer, ms, tid)
    csum = np.concatenate([[0.0], np.cumsum(amount[order])])
    pos = np.arange(key.size)
    out: dict[str, np.ndarray] = {}
    for n in WINDOWS_DAYS:
        # First row with time > t - n days; the window ends at the current row (tie order).
        lo = np.searchsorted(key, key - n * DAY_MS, side="right")
        count = pos - lo + 1
        total = csum[pos + 1] - csum[lo]
        nb, avg = np.empty(key.size, np.int64), np.empty(key.size, np.float64)
        nb[order], avg[order] = count, total / count
        out[f"customer_nb_tx_{n}d"], out[f"customer_avg_amount_{n}d"] = nb, avg
    return out


class _RowWindows(BaseIndexer):
    """Rolling windows with given bounds: row ``i`` aggregates rows ``[start[i], end[i])``.

    The bounds come from the same searchsorted as every other window here, so pandas'
    rolling median and max see exactly the rows the stream's state lists hold.
    """

    def __init__(self, start: np.ndarray, end: np.ndarray) -> None:
        super().__init__()
        self._start = start.astype(np.int64)
        self._end = end.astype(np.int64)

    def get_window_bounds(
        self,
        num_values: int = 0,
        min_periods: int | None = None,
        center: bool | None = None,
        closed: str | None = None,
        step: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        return self._start, self._end


def _rolling(values: np.ndarray, start: np.ndarray, end: np.ndarray) -> pd.core.window.Rolling:
    # Windows are never empty (the current row is in its own), so min_periods=1 never yields NaN.
    return pd.Series(values).rolling(_RowWindows(start, end), min_periods=1)


def _behaviour(
    customer: np.ndarray,
    ms: np.ndarray,
    tid: np.ndarray,
    terminal: np.ndarray,
    amount: np.ndarray,
    spending: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The customer behaviour features (``stages.shared.schemas``, BEHAVIOUR_FEATURES)."""
    out: dict[str, np.ndarray] = {}
    for n in AMOUNT_RATIO_DAYS:
        mean = spending[f"customer_avg_amount_{n}d"]
        # Same float operation as the stream (amount / mean); 0 / 0 is 1.0.
        safe = np.where(mean > 0, mean, 1.0)
        out[f"customer_amount_ratio_{n}d"] = np.where(mean > 0, amount / safe, 1.0)
    order, key = _grouped_keys(customer, ms, tid)
    size = key.size
    ms_s, cust_s, term_s = ms[order], customer[order], terminal[order]
    max_gap_ms = MAX_GAP_S * 1000
    gap = np.full(size, max_gap_ms, dtype=np.int64)
    if size > 1:
        same = cust_s[1:] == cust_s[:-1]
        gap[1:][same] = ms_s[1:][same] - ms_s[:-1][same]
    secs = np.empty(size, np.float64)
    secs[order] = np.minimum(gap, max_gap_ms) / 1000.0
    out["customer_secs_since_prev_tx"] = secs
    # Distinct terminals in (t - n days, t]: row j counts for row i (j <= i) when it is the
    # latest of its terminal up to i (i < next[j], the next row of the same customer and
    # terminal) and inside i's window (lo[i] <= j). lo is non-decreasing, so the rows i that
    # j counts for form one interval [j, stop[j]); a difference array sums them.
    pos = np.arange(size)
    pair = np.lexsort((pos, term_s, cust_s))
    nxt = np.full(size, size, dtype=np.int64)
    if size > 1:
        same_pair = (cust_s[pair][1:] == cust_s[pair][:-1]) & (
            term_s[pair][1:] == term_s[pair][:-1]
        )
        nxt[pair[:-1][same_pair]] = pair[1:][same_pair]
    for n in DISTINCT_TERMINAL_DAYS:
        lo = np.searchsorted(key, key - n * DAY_MS, side="right")
        stop = np.minimum(nxt, np.searchsorted(lo, pos, side="right"))
        ended = np.cumsum(np.bincount(stop, minlength=size + 1))[:size]
        distinct = np.empty(size, np.int64)
        distinct[order] = pos + 1 - ended
        out[f"customer_nb_terminals_{n}d"] = distinct
    # Median and max over (t - n days, t] in the sorted order (current row included). Same
    # float operations as the stream: pandas' median of an even count is (a + b) / 2, as
    # statistics.median's, and max is exact.
    amount_s = amount[order]
    lo = np.searchsorted(key, key - MEDIAN_RATIO_DAYS * DAY_MS, side="right")
    usual = _rolling(amount_s, lo, pos + 1).median().to_numpy()
    safe = np.where(usual > 0, usual, 1.0)
    lo = np.searchsorted(key, key - MAX_AMOUNT_DAYS * DAY_MS, side="right")
    largest = _rolling(amount_s, lo, pos + 1).max().to_numpy()
    for name, value in (
        (f"customer_amount_median_ratio_{MEDIAN_RATIO_DAYS}d", amount_s),
        (f"customer_max_amount_median_ratio_{MAX_AMOUNT_DAYS}d", largest),
    ):
        ratio = np.empty(size, np.float64)
        ratio[order] = np.where(usual > 0, value / safe, 1.0)
        out[name] = ratio
    return out


def _terminal_windows(
    terminal: np.ndarray, ms: np.ndarray, tid: np.ndarray, fraud: np.ndarray
) -> dict[str, np.ndarray]:
    order, key = _grouped_keys(terminal, ms, tid)
    fsum = np.concatenate([[0], np.cumsum(fraud[order].astype(np.int64))])
    delay = LABEL_DELAY_DAYS * DAY_MS
    # Rows with time <= t - delay: labels known at t.
    hi = np.searchsorted(key, key - delay, side="right")
    out: dict[str, np.ndarray] = {}
    for n in WINDOWS_DAYS:
        lo = np.searchsorted(key, key - delay - n * DAY_MS, side="right")
        count = hi - lo
        frauds = fsum[hi] - fsum[lo]
        risk = np.divide(frauds, count, out=np.zeros(key.size), where=count > 0)
        nb, rk = np.empty(key.size, np.int64), np.empty(key.size, np.float64)
        nb[order], rk[order] = count, risk
        out[f"terminal_nb_tx_{n}d"], out[f"terminal_risk_{n}d"] = nb, rk
    return out


def compute_features(
    tx: pd.DataFrame, features: tuple[str, ...] | list[str] = MODEL_FEATURES
) -> pd.DataFrame:
    """Model inputs of every transaction, from the definitions in SIMULATOR.md and
    ``stages.shared.schemas`` (the behaviour features).

    Args:
        tx: transactions with at least ``transaction_id``, ``customer_id``, ``terminal_id``,
            ``tx_datetime`` (tz-aware UTC), ``amount`` and ``is_fraud``; any row order.
        features: the feature columns wanted, in that order (default: the 15 of v1; a
            service's are ``stages.shared.schemas.service_features(name)``).

    Returns:
        One row per transaction, in the input order: ``transaction_id``, ``customer_id``,
        ``terminal_id``, ``tx_datetime``, then ``features`` in that order (counts and flags
        int64, amounts, ratios, seconds and risks float64).

    Raises:
        KeyError: missing input columns, or a feature name not defined here.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in tx.columns]
    if missing:
        raise KeyError(f"transactions lack columns {missing}")
    unknown = [f for f in features if f not in MODEL_FEATURES_V2]
    if unknown:
        raise KeyError(f"no batch definition for features {unknown}")
    ms = event_ms(tx["tx_datetime"])
    tid = tx["transaction_id"].to_numpy(np.int64)
    amount = tx["amount"].to_numpy(np.float64)
    customer = tx["customer_id"].to_numpy(np.int64)
    out = tx[list(ID_COLUMNS)].copy()
    cols: dict[str, np.ndarray] = {
        "amount": amount,
        "is_weekend": is_weekend_ms(ms),
        "is_night": is_night_ms(ms),
    }
    cols |= _customer_windows(customer, ms, tid, amount)
    if any(f in TERMINAL_FEATURES for f in features):
        cols |= _terminal_windows(
            tx["terminal_id"].to_numpy(np.int64), ms, tid, tx["is_fraud"].to_numpy()
        )
    if any(f in BEHAVIOUR_FEATURES for f in features):
        terminal = tx["terminal_id"].to_numpy(np.int64)
        cols |= _behaviour(customer, ms, tid, terminal, amount, cols)
    for name in features:
        out[name] = cols[name]
    return out


def _feature_rows(features: pd.DataFrame, key: str, names: tuple[str, ...]) -> pd.DataFrame:
    # Last transaction per (entity, timestamp) wins: see the module docstring on ties.
    ms = event_ms(features["tx_datetime"])
    order = np.lexsort((features["transaction_id"].to_numpy(np.int64), ms))
    ent = features[key].to_numpy(np.int64)[order]
    dup = pd.DataFrame({"e": ent, "t": ms[order]}).duplicated(keep="last").to_numpy()
    rows = features[[key, "tx_datetime", *names]].iloc[order[~dup]]
    out = pd.DataFrame(
        {
            key: rows[key].astype(np.int64),
            "event_timestamp": rows["tx_datetime"].dt.tz_convert("UTC"),
            "created_timestamp": rows["tx_datetime"].dt.tz_convert("UTC"),
        }
    )
    for name in names:
        out[name] = rows[name]
    return out.reset_index(drop=True)


def customer_feature_rows(features: pd.DataFrame) -> pd.DataFrame:
    """Rows for the ``customer_spending`` offline store, one per (customer, timestamp).

    Args:
        features: output of :func:`compute_features`.

    Returns:
        ``customer_id``, ``event_timestamp``, ``created_timestamp`` (both the transaction time),
        then ``CUSTOMER_FEATURES``, sorted by time.
    """
    return _feature_rows(features, "customer_id", CUSTOMER_FEATURES)


def terminal_feature_rows(features: pd.DataFrame) -> pd.DataFrame:
    """Rows for the ``terminal_risk`` offline store, one per (terminal, timestamp).

    Args:
        features: output of :func:`compute_features`.

    Returns:
        ``terminal_id``, ``event_timestamp``, ``created_timestamp``, then ``TERMINAL_FEATURES``.
    """
    return _feature_rows(features, "terminal_id", TERMINAL_FEATURES)


def behaviour_feature_rows(features: pd.DataFrame) -> pd.DataFrame:
    """Rows for the ``customer_behaviour`` offline store, one per (customer, timestamp).

    Args:
        features: output of :func:`compute_features` with the ``BEHAVIOUR_FEATURES``.

    Returns:
        ``customer_id``, ``event_timestamp``, ``created_timestamp``, then
        ``BEHAVIOUR_FEATURES``, sorted by time.
    """
    return _feature_rows(features, "customer_id", BEHAVIOUR_FEATURES)


# Every view the offline store holds a history of (what backfill_offline_store writes).
BACKFILL_VIEWS: Final = (CUSTOMER_VIEW, TERMINAL_VIEW, BEHAVIOUR_VIEW)


def backfill_offline_store(
    settings: Settings, tx: pd.DataFrame, *, replace: bool = False
) -> dict[str, Path]:
    """Compute every transaction's features and write every view into the offline store.

    Each view gets one new part file through ``stages.shared.offline.write_offline``; running
    it twice duplicates the history (identical rows, harmless for a point-in-time join but
    wasteful) unless ``replace`` first deletes each view's existing history.

    Returns:
        The Parquet file written per view name.
    """
    features = compute_features(tx, MODEL_FEATURES_V2)
    rows = {
        CUSTOMER_VIEW: customer_feature_rows,
        TERMINAL_VIEW: terminal_feature_rows,
        BEHAVIOUR_VIEW: behaviour_feature_rows,
    }
    frames = {view: rows[view](features) for view in BACKFILL_VIEWS}
    paths: dict[str, Path] = {}
    for view, df in frames.items():
        if replace:
            shutil.rmtree(settings.offline_dir / view, ignore_errors=True)
        paths[view] = write_offline(settings, view, df)
        logger.info("backfilled %d rows into %s (%s)", len(df), view, paths[view])
    return paths
