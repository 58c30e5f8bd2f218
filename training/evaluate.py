"""Model evaluation per SIMULATOR.md's protocol: AUC, average precision, card precision@k.

Pure functions over pandas frames; no I/O. Days are UTC calendar days of ``tx_datetime``.

Protocol:

1. **Known compromised cards** are removed from each test day ``D`` before any metric is
   computed (ROC AUC and average precision included, as in the reference protocol): cards with a
   fraud in the training period, and cards with a fraud on a day ``d`` with ``D - d > 7`` (its
   label known for more than the 7-day delay by day ``D``), looking back to the training start.
2. **Card precision@k**: for each test day, each remaining card is scored by its highest
   transaction score that day and labelled by whether it had a fraud that day; cards already
   *detected* (a fraud among an earlier test day's top k) are excluded; the fraction of frauds in
   the top ``k`` (denominator ``k``, as in the reference definition) is averaged over test days.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from stages.shared.schemas import LABEL_DELAY_DAYS

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 100


@dataclass(frozen=True, slots=True)
class CardPrecision:
    """Card precision@k averaged over test days, with the per-day detail."""

    k: int
    mean: float
    per_day: dict[str, float] = field(default_factory=dict)
    compromised_cards_per_day: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Metrics:
    """Test-window metrics of one model, after removal of known compromised cards."""

    roc_auc: float
    average_precision: float
    card_precision_at_k: float
    k: int
    n_transactions: int
    n_frauds: int
    n_removed_known_compromised: int
    card_precision_per_day: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)


def _day(ts: pd.Series) -> pd.Series:
    return ts.dt.tz_convert("UTC").dt.floor("D")


def known_compromised_mask(
    test: pd.DataFrame,
    history: pd.DataFrame,
    train_start: pd.Timestamp,
    train_end: pd.Timestamp,
    delay_days: int = LABEL_DELAY_DAYS,
) -> np.ndarray:
    """Which test rows belong to a card already known to be compromised on that row's day.

    Args:
        test: test transactions with ``customer_id`` and ``tx_datetime``.
        history: transactions with ``customer_id``, ``tx_datetime``, ``is_fraud``, covering at
            least ``[train_start, last test day - delay_days - 1]``; rows before ``train_start``
            are ignored.
        train_start: first instant of the training window (inclusive).
        train_end: end of the training window (exclusive).
        delay_days: label delay; a fraud on day ``d`` is known on test day ``D`` if
            ``D - d > delay_days``.

    Returns:
        Boolean array aligned with ``test`` rows: True for rows to remove.
    """
    frauds = history.loc[
        (history["is_fraud"] == 1) & (history["tx_datetime"] >= train_start),
        ["customer_id", "tx_datetime"],
    ]
    in_training = frauds["tx_datetime"] < train_end
    train_cards = set(frauds.loc[in_training, "customer_id"].tolist())
    # First fraud day per card; known on day D if D - first_day > delay.
    first_day = _day(frauds["tx_datetime"]).groupby(frauds["customer_id"]).min()
    test_day = _day(test["tx_datetime"])
    first = test["customer_id"].map(first_day)
    known_later = (test_day - first) > pd.Timedelta(days=delay_days)
    mask = test["customer_id"].isin(train_cards) | known_later.fillna(False).astype(bool)
    return mask.to_numpy(dtype=bool)


def card_precision_at_k(scored: pd.DataFrame, k: int = DEFAULT_TOP_K) -> CardPrecision:
    """Card precision@k per test day, excluding cards detected on earlier test days.

    Args:
        scored: test transactions with ``customer_id``, ``tx_datetime``, ``is_fraud``, ``score``
            (known compromised cards already removed).
        k: cards inspected per day.

    Returns:
        The mean over test days and the per-day values (keys are ISO dates).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    day = _day(scored["tx_datetime"])
    detected: set[int] = set()
    per_day: dict[str, float] = {}
    compromised: dict[str, int] = {}
    for d, rows in scored.groupby(day, sort=True):
        rows = rows[~rows["customer_id"].isin(detected)]
        cards = rows.groupby("customer_id").agg(score=("score", "max"), fraud=("is_fraud", "max"))
        # Ties in score are broken by card id so that the result is deterministic.
        cards = cards.reset_index().sort_values(
            ["score", "customer_id"], ascending=[False, True], kind="stable"
        )
        top = cards.head(k)
        hits = top.loc[top["fraud"] == 1, "customer_id"].tolist()
        key = pd.Timestamp(d).date().isoformat()
        per_day[key] = len(hits) / k
        compromised[key] = int((cards["fraud"] == 1).sum())
        detected.update(hits)
    mean = float(np.mean(list(per_day.values()))) if per_day else float("nan")
    return CardPrecision(k=k, mean=mean, per_day=per_day, compromised_cards_per_day=compromised)


def roc_auc(y: np.ndarray | pd.Series, score: np.ndarray | pd.Series) -> float:
    """ROC AUC; NaN when only one class is present."""
    y = np.asarray(y)
    if np.unique(y).size < 2:
        return float("nan")
    return float(roc_auc_score(y, score))


def average_precision(y: np.ndarray | pd.Series, score: np.ndarray | pd.Series) -> float:
    """Average precision (area under the precision-recall curve); NaN without positives."""
    y = np.asarray(y)
    if not (y == 1).any():
        return float("nan")
    return float(average_precision_score(y, score))


def evaluate(
    test: pd.DataFrame,
    history: pd.DataFrame,
    train_start: pd.Timestamp,
    train_end: pd.Timestamp,
    k: int = DEFAULT_TOP_K,
    delay_days: int = LABEL_DELAY_DAYS,
) -> Metrics:
    """All report metrics on a scored test window, after removing known compromised cards.

    Args:
        test: test transactions with ``customer_id``, ``tx_datetime``, ``is_fraud``, ``score``.
        history: labelled transactions from ``train_start`` up to the test window (see
            :func:`known_compromised_mask`).
        train_start: first instant of the training window.
        train_end: end (exclusive) of the training window.
        k: cards per day for card precision.
        delay_days: label delay.

    Returns:
        The metrics.
    """
    remove = known_compromised_mask(test, history, train_start, train_end, delay_days)
    kept = test.loc[~remove]
    y = kept["is_fraud"].to_numpy()
    s = kept["score"].to_numpy()
    cp = card_precision_at_k(kept, k)
    metrics = Metrics(
        roc_auc=roc_auc(y, s),
        average_precision=average_precision(y, s),
        card_precision_at_k=cp.mean,
        k=k,
        n_transactions=len(kept),
        n_frauds=int((y == 1).sum()),
        n_removed_known_compromised=int(remove.sum()),
        card_precision_per_day=cp.per_day,
    )
    logger.info(
        "AUC %.4f  AP %.4f  CP@%d %.4f  (%d tx, %d frauds, %d removed)",
        metrics.roc_auc,
        metrics.average_precision,
        k,
        metrics.card_precision_at_k,
        metrics.n_transactions,
        metrics.n_frauds,
        metrics.n_removed_known_compromised,
    )
    return metrics
