"""Training/serving skew check: every feature recomputed in batch from the raw transactions and
labels (``training.features.compute_features``, the definitions in SIMULATOR.md), compared with

(a) the values the prediction stage logged with each online prediction (the ``features`` dict
    of the records on the ``predictions`` topic), and
(b) what Feast's ``get_historical_features`` returns for the same transactions (the training
    path, ``training.dataset``).

A value mismatches when ``|served - batch| > tolerance * max(1, |batch|)`` (absolute below 1,
relative above, so that mean amounts in the hundreds are not held to a tighter standard than
counts); a value missing on one side only (NaN, or None in a record) is a mismatch, missing on
both sides is not.

**Replays and history.** The streaming enrichment stage's customer windows start empty when a
replay starts: unless the replay included 30 days of history before the first scored
transaction, its customer counts and means cover only the transactions since the replay start.
``history_start`` (the replay start) makes comparison (a) fair: its batch *customer* features
are computed over the transactions from ``history_start`` on only. Terminal features are always
computed over all transactions, because the terminal windows are built from the labels stream,
which carries the full history. Comparison (b) always uses all transactions (the offline store
is backfilled from the full history).

Expected, documented differences that the check will show rather than hide: where one customer
or terminal has several transactions with the same timestamp, the offline store keeps one row per
(entity, timestamp) (see ``training.features``), so (b) can differ on those few rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stages.shared.schemas import (
    BEHAVIOUR_FEATURES,
    CUSTOMER_FEATURES,
    MODEL_FEATURES,
    MODEL_FEATURES_V2,
    service_features,
)
from training.features import compute_features

if TYPE_CHECKING:
    from feast import FeatureStore

    from stages.shared.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-6
# Computed from the customer's own transactions (the stream's customer state), as opposed to
# the terminal windows, which come from the labels stream.
CUSTOMER_STATE_FEATURES = (*CUSTOMER_FEATURES, *BEHAVIOUR_FEATURES)
RECORD_COLUMNS = ("score", "model_version", "event_ms", "feature_service")
COMPARISON_COLUMNS = ("compared", "mismatches", "mismatch_rate", "max_abs_diff")


def predictions_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Prediction records (decoded JSON from the ``predictions`` topic) as one frame.

    Args:
        records: dicts with ``transaction_id`` and a ``features`` dict (name -> number or
            None); ``score``, ``model_version``, ``event_ms`` and ``feature_service`` are kept
            when present.

    Returns:
        One row per transaction id (index ``transaction_id``, sorted), a float64 column per
        feature seen (None -> NaN), then ``score``, ``model_version``, ``event_ms``,
        ``feature_service``. When a transaction was predicted more than once (a re-processed
        batch), the last record wins.

    Raises:
        ValueError: if a record has no ``transaction_id``.
    """
    rows: list[dict[str, Any]] = []
    for i, rec in enumerate(records):
        if "transaction_id" not in rec:
            raise ValueError(f"prediction record {i} has no transaction_id")
        feats = rec.get("features") or {}
        row: dict[str, Any] = {
            name: (np.nan if v is None else float(v)) for name, v in feats.items()
        }
        row["transaction_id"] = int(rec["transaction_id"])
        row["score"] = np.nan if rec.get("score") is None else float(rec["score"])
        row["model_version"] = rec.get("model_version")
        row["event_ms"] = rec.get("event_ms")
        row["feature_service"] = rec.get("feature_service")
        rows.append(row)
    if not rows:
        return pd.DataFrame(
            columns=[*MODEL_FEATURES, *RECORD_COLUMNS],
            index=pd.Index([], name="transaction_id", dtype=np.int64),
        ).astype({n: "float64" for n in (*MODEL_FEATURES, "score")})
    frame = pd.DataFrame(rows)
    n_dup = int(frame["transaction_id"].duplicated().sum())
    if n_dup:
        logger.warning("%d transactions were predicted more than once: last record kept", n_dup)
    frame = frame.drop_duplicates("transaction_id", keep="last").set_index("transaction_id")
    features = [c for c in frame.columns if c not in RECORD_COLUMNS]
    ordered = [n for n in MODEL_FEATURES_V2 if n in features] + sorted(
        n for n in features if n not in MODEL_FEATURES_V2
    )
    frame[ordered] = frame[ordered].astype("float64")
    return frame[[*ordered, *RECORD_COLUMNS]].sort_index()


def compare_features(
    batch: pd.DataFrame,
    served: pd.DataFrame,
    features: Sequence[str] = MODEL_FEATURES,
    tolerance: float = DEFAULT_TOLERANCE,
) -> pd.DataFrame:
    """Mismatch counts per feature between two frames indexed by transaction id.

    Only transactions present in both frames are compared. A feature column absent from
    ``served`` counts every compared row as a mismatch.

    Args:
        batch: the reference values (from the definitions).
        served: the values to check (online records, or the offline join).
        features: the columns to compare, in report order.
        tolerance: see the module docstring.

    Returns:
        Index ``feature``; columns ``compared``, ``mismatches``, ``mismatch_rate`` (NaN when
        nothing was compared) and ``max_abs_diff`` (over rows where both sides have a value).
    """
    common = batch.index.intersection(served.index)
    out = []
    for name in features:
        a = batch.loc[common, name].to_numpy(np.float64)
        if name in served.columns:
            b = served.loc[common, name].to_numpy(np.float64)
        else:
            b = np.full(a.shape, np.nan)
        both = ~np.isnan(a) & ~np.isnan(b)
        diff = np.abs(a - b, where=both, out=np.zeros(a.shape))
        bad = (np.isnan(a) != np.isnan(b)) | (diff > tolerance * np.maximum(1.0, np.abs(a)))
        n = len(common)
        out.append(
            {
                "feature": name,
                "compared": n,
                "mismatches": int(bad.sum()),
                "mismatch_rate": float(bad.sum() / n) if n else float("nan"),
                "max_abs_diff": float(diff.max()) if both.any() else float("nan"),
            }
        )
    return pd.DataFrame(out, columns=["feature", *COMPARISON_COLUMNS]).set_index("feature")


@dataclass(frozen=True, slots=True)
class SkewReport:
    """Result of :func:`check_skew`.

    ``online`` / ``offline`` are :func:`compare_features` frames (None when that comparison was
    not asked for). ``missing_online`` / ``missing_offline`` are requested transactions that
    had no prediction record / no offline feature row.
    """

    requested: int
    online: pd.DataFrame | None
    offline: pd.DataFrame | None
    missing_online: int = 0
    missing_offline: int = 0
    unknown_transactions: int = 0
    tolerance: float = DEFAULT_TOLERANCE
    history_start: str | None = None

    def mismatch_rates(self) -> pd.DataFrame:
        """Mismatch rate per feature, one column per comparison that ran."""
        cols = {
            name: frame["mismatch_rate"]
            for name, frame in (("online", self.online), ("offline", self.offline))
            if frame is not None
        }
        return pd.DataFrame(cols)

    @property
    def ok(self) -> bool:
        """No mismatch and nothing missing in the comparisons that ran."""
        frames = [f for f in (self.online, self.offline) if f is not None]
        return (
            all(int(f["mismatches"].sum()) == 0 for f in frames)
            and self.missing_online == 0
            and self.missing_offline == 0
            and self.unknown_transactions == 0
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""

        def table(frame: pd.DataFrame | None) -> dict[str, Any] | None:
            return None if frame is None else frame.to_dict(orient="index")

        return {
            "requested": self.requested,
            "unknown_transactions": self.unknown_transactions,
            "missing_online": self.missing_online,
            "missing_offline": self.missing_offline,
            "tolerance": self.tolerance,
            "history_start": self.history_start,
            "online": table(self.online),
            "offline": table(self.offline),
            "ok": self.ok,
        }

    def __str__(self) -> str:
        lines = [
            f"skew check of {self.requested} transactions (tolerance {self.tolerance:g}"
            + (f", online customer history from {self.history_start}" if self.history_start else "")
            + f"): unknown {self.unknown_transactions}, no prediction record "
            f"{self.missing_online}, no offline row {self.missing_offline}",
        ]
        for name, frame in (
            ("(a) online vs batch", self.online),
            ("(b) Feast offline vs batch", self.offline),
        ):
            if frame is None:
                continue
            n = int(frame["compared"].max()) if len(frame) else 0
            lines.append(f"{name}: {n} transactions compared")
            for feat, row in frame.iterrows():
                lines.append(
                    f"  {feat:<26} {int(row['mismatches']):>7} mismatches "
                    f"({row['mismatch_rate']:.4%}), max |diff| {row['max_abs_diff']:.3g}"
                )
        return "\n".join(lines)


def _batch_features(tx: pd.DataFrame) -> pd.DataFrame:
    features = compute_features(tx, MODEL_FEATURES_V2).set_index("transaction_id")
    return features[list(MODEL_FEATURES_V2)].astype("float64")


def recorded_service(predictions: pd.DataFrame | None) -> str | None:
    """The one feature service the prediction records name, or None (none named, or several)."""
    if predictions is None or "feature_service" not in predictions.columns:
        return None
    named = predictions["feature_service"].dropna().unique()
    return str(named[0]) if len(named) == 1 else None


def compare_by_service(
    batch: pd.DataFrame, served: pd.DataFrame, default_service: str, tolerance: float
) -> pd.DataFrame:
    """:func:`compare_features` of each record against its own feature service's features
    (``feature_service`` column; records without one: ``default_service``), summed per
    feature over the services (a feature is compared on the records whose service has it)."""
    named = (
        served["feature_service"].fillna(default_service)
        if "feature_service" in served.columns
        else pd.Series(default_service, index=served.index)
    )
    parts = [
        compare_features(batch, served.loc[named == svc], service_features(svc), tolerance)
        for svc in sorted(named.unique())
    ]
    if not parts:
        return compare_features(batch, served, service_features(default_service), tolerance)
    if len(parts) == 1:
        return parts[0]
    names = [n for n in MODEL_FEATURES_V2 if any(n in p.index for p in parts)]
    joined = pd.concat(parts, keys=range(len(parts)), names=["part", "feature"])
    grouped = joined.groupby(level="feature")
    out = pd.DataFrame(
        {
            "compared": grouped["compared"].sum(),
            "mismatches": grouped["mismatches"].sum(),
            "max_abs_diff": grouped["max_abs_diff"].max(),
        }
    ).loc[names]
    rate = out["mismatches"] / out["compared"].where(out["compared"] > 0)
    out.insert(2, "mismatch_rate", rate.astype("float64"))
    return out[list(COMPARISON_COLUMNS)]


def check_skew(
    settings: Settings,
    tx: pd.DataFrame,
    predictions: pd.DataFrame | None,
    transaction_ids: Iterable[int] | np.ndarray | pd.Series,
    *,
    history_start: str | pd.Timestamp | None = None,
    offline: bool = True,
    store: FeatureStore | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    progress: bool = False,
    feature_service: str | None = None,
) -> SkewReport:
    """Compare batch features with online-logged and Feast offline features.

    Every record is compared on its own feature service's features (the service it names;
    else ``feature_service``; else the one setting); the offline join uses
    ``feature_service``, else the one service the records name, else the setting.

    Args:
        settings: process settings (feature repo, and the default feature service).
        tx: the raw transactions with labels (``transaction_id``, ``customer_id``,
            ``terminal_id``, ``tx_datetime``, ``amount``, ``is_fraud``), covering at least the
            30 + 7 days before the checked transactions.
        predictions: :func:`predictions_frame` of the prediction records, or None to skip (a).
        transaction_ids: the transactions to check.
        history_start: the replay start (see the module docstring); None means the online
            windows saw the whole history in ``tx``.
        offline: run comparison (b) through Feast.
        store: an open feature store for (b) (default: ``open_feature_store(settings)``).
        tolerance: see the module docstring.
        progress: show a progress bar over the Feast calls.
        feature_service: see above.

    Returns:
        Mismatch counts and rates per feature for each comparison, and counts of what could
        not be compared.
    """
    default = feature_service or settings.prediction.feature_service
    service = feature_service or recorded_service(predictions) or default
    ids = pd.Index(np.unique(np.fromiter(transaction_ids, dtype=np.int64)))
    known = pd.Index(tx["transaction_id"].to_numpy(np.int64))
    unknown = ids.difference(known)
    ids = ids.intersection(known)
    full = _batch_features(tx).loc[ids]

    online_cmp: pd.DataFrame | None = None
    missing_online = 0
    start = None
    if predictions is not None:
        reference = full
        if history_start is not None:
            start = pd.Timestamp(history_start)
            start = start.tz_localize("UTC") if start.tzinfo is None else start.tz_convert("UTC")
            recent = tx.loc[tx["tx_datetime"] >= start]
            partial = _batch_features(recent)
            reference = full.copy()
            customer = list(CUSTOMER_STATE_FEATURES)
            in_recent = ids.intersection(partial.index)
            reference.loc[in_recent, customer] = partial.loc[in_recent, customer]
            # Transactions before the replay start cannot have been scored by the replay.
            reference.loc[ids.difference(partial.index), customer] = np.nan
        served = predictions.loc[predictions.index.intersection(ids)]
        missing_online = len(ids.difference(predictions.index))
        online_cmp = compare_by_service(reference, served, default, tolerance)

    offline_cmp: pd.DataFrame | None = None
    missing_offline = 0
    if offline:
        from training.dataset import stored_features

        offline_values = _offline_features(settings, tx, ids, store, progress, service)
        no_row = offline_values[list(stored_features(service))].isna().all(axis=1)
        missing_offline = int(no_row.sum())
        offline_cmp = compare_features(
            full, offline_values.loc[~no_row], service_features(service), tolerance
        )

    report = SkewReport(
        requested=len(ids) + len(unknown),
        online=online_cmp,
        offline=offline_cmp,
        missing_online=missing_online,
        missing_offline=missing_offline,
        unknown_transactions=len(unknown),
        tolerance=tolerance,
        history_start=None if start is None else start.isoformat(),
    )
    # The callers (CLI, demo) print the report; the log keeps its headline.
    logger.info("skew check done: %s", "ok" if report.ok else "MISMATCHES")
    logger.debug("%s", report)
    return report


def _offline_features(
    settings: Settings,
    tx: pd.DataFrame,
    ids: pd.Index,
    store: FeatureStore | None,
    progress: bool,
    service: str,
) -> pd.DataFrame:
    """Request features plus the Feast point-in-time join, the training path (dataset.py)."""
    from training.dataset import point_in_time_features, request_features

    if store is None:
        from stages.shared.feast_store import open_feature_store

        store = open_feature_store(settings)
    window = (
        tx.loc[tx["transaction_id"].isin(ids)]
        .sort_values("transaction_id", kind="stable")
        .reset_index(drop=True)
    )
    stored = point_in_time_features(store, window, service, progress=progress, allow_missing=True)
    frame = pd.concat([request_features(window), stored], axis=1)[list(service_features(service))]
    frame.index = pd.Index(window["transaction_id"].to_numpy(np.int64), name="transaction_id")
    return frame.astype("float64")
