"""``rtpipe backtest``: score an offline period through the prediction stage's own code path
and report the training metrics (``training/evaluate.py``) plus what the online evaluation
and the router would have seen.

Feature rows come from the batch definition (:func:`training.features.compute_features`,
which is what the Feast offline store is backfilled from, so it equals a point-in-time join
of the offline store). Each micro-batch of ``settings.prediction.max_batch`` rows then goes
through the same functions as the stage: ``request_features`` and ``assemble_matrix`` of
:mod:`stages.prediction.logic`, a verified registry model wrapped in the stage's
:class:`~stages.prediction.models.ServingModel`, and :func:`stages.routing.logic.decide`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from stages.evaluation.quality import OnlineMetrics, online_metrics
from stages.prediction.logic import assemble_matrix, request_features
from stages.prediction.models import ServingModel
from stages.routing.logic import decide
from stages.shared.schemas import (
    LABEL_DELAY_DAYS,
    REQUEST_FEATURES,
    WINDOWS_DAYS,
    service_features,
)
from stages.shared.settings import Settings
from training import registry
from training.card import Window
from training.dataset import utc_day
from training.evaluate import DEFAULT_TOP_K, Metrics, evaluate
from training.features import compute_features, event_ms
from training.reference import psi_against, reference_from_card

logger = logging.getLogger(__name__)

# Features of a transaction look back at most this far (terminal windows: delay + 30 days).
LOOKBACK_DAYS = LABEL_DELAY_DAYS + max(WINDOWS_DAYS)


@dataclass(frozen=True)
class BacktestReport:
    """What a backtest measured.

    ``metrics`` are the training report's (known compromised cards removed); ``online`` is
    computed on every scored row, as the evaluation stage would once all labels are in.
    ``scored`` has transaction_id, customer_id, tx_datetime, is_fraud, score, decision.
    """

    start: pd.Timestamp
    end: pd.Timestamp
    model: str
    model_version: str
    train_window: tuple[pd.Timestamp, pd.Timestamp]
    metrics: Metrics
    online: OnlineMetrics
    decisions: dict[str, int]
    score_psi: float | None
    scored: pd.DataFrame

    def summary(self) -> dict[str, Any]:
        """JSON-ready headline numbers."""
        return {
            "window": [self.start.isoformat(), self.end.isoformat()],
            "model": self.model,
            "model_version": self.model_version,
            "roc_auc": self.metrics.roc_auc,
            "average_precision": self.metrics.average_precision,
            f"card_precision@{self.metrics.k}": self.metrics.card_precision_at_k,
            "n_transactions": len(self.scored),
            "n_evaluated": self.metrics.n_transactions,
            "n_frauds": self.metrics.n_frauds,
            "precision_action": self.online.precision["action"],
            "recall_action": self.online.recall["action"],
            "ece": self.online.ece,
            "score_psi": self.score_psi,
            "decisions": self.decisions,
        }


def _training_window(
    window: Window | None, start: pd.Timestamp
) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The model's training window (for known-compromised-card removal); without one in its
    card, the reference protocol's shape: 7 days ending one label delay before ``start``."""
    if window is not None:
        return pd.Timestamp(window.start, tz="UTC"), pd.Timestamp(window.end, tz="UTC")
    end = start - pd.Timedelta(days=LABEL_DELAY_DAYS)
    return end - pd.Timedelta(days=7), end


def backtest(
    settings: Settings,
    start: str | pd.Timestamp,
    days: int,
    *,
    transactions: pd.DataFrame | None = None,
    model_version: str | None = None,
    k: int = DEFAULT_TOP_K,
) -> BacktestReport:
    """Score ``[start, start + days)`` with a registry model and report its metrics.

    Args:
        settings: process settings (data set, registry, model name, batch size, thresholds).
        start: first day (UTC), e.g. ``"2018-08-08"``.
        days: number of days scored.
        transactions: the data set (default: read from ``settings.data_dir``).
        model_version: registry version (default: the promoted one).
        k: cards per day for card precision@k.

    Returns:
        The report.

    Raises:
        RegistryError: no such (or no promoted) model version.
        ValueError: no transactions in the window.
    """
    from training.simulate import read_dataset

    tx = transactions if transactions is not None else read_dataset(settings.data_dir)
    begin = utc_day(start)
    end = begin + pd.Timedelta(days=days)
    name = settings.prediction.model_name
    version = model_version or registry.current_version(settings.registry_dir, name)
    if version is None:
        raise registry.RegistryError(f"model {name} has no promoted version: train one first")
    loaded = registry.load_version(settings.registry_dir, name, version)
    model = ServingModel.from_loaded(loaded, settings.prediction.feature_service)
    train_start, train_end = _training_window(loaded.card.training_window, begin)

    # Only the look-back the features need, so a backtest of a week does not featurise months.
    history_start = min(begin - pd.Timedelta(days=LOOKBACK_DAYS), train_start)
    recent = tx.loc[(tx["tx_datetime"] >= history_start) & (tx["tx_datetime"] < end)]
    wanted = service_features(model.feature_service)
    feats = compute_features(recent, wanted)
    # Everything but the request features comes from the stored views.
    online_names = tuple(f for f in wanted if f not in REQUEST_FEATURES)
    in_window = (feats["tx_datetime"] >= begin).to_numpy()
    rows = feats.loc[in_window].sort_values("transaction_id", kind="stable")
    if rows.empty:
        raise ValueError(f"no transactions in [{begin}, {end})")

    amount = rows["amount"].to_numpy(np.float64)
    ms = event_ms(rows["tx_datetime"])
    online_values = rows[list(online_names)].to_numpy(np.float64)
    scores = np.empty(len(rows), dtype=np.float64)
    step = settings.prediction.max_batch
    for lo in range(0, len(rows), step):
        hi = lo + step
        request = request_features(amount[lo:hi], ms[lo:hi])
        matrix = assemble_matrix(model.features, request, online_values[lo:hi], online_names)
        scores[lo:hi] = model.predict(matrix)
    decisions = [decide({"score": float(s)}, settings.routing)[0] for s in scores]

    labels = tx.set_index("transaction_id")["is_fraud"]
    scored = rows[["transaction_id", "customer_id", "tx_datetime"]].reset_index(drop=True)
    scored["is_fraud"] = labels.loc[scored["transaction_id"]].to_numpy(np.int64)
    scored["score"] = scores
    scored["decision"] = decisions

    history = tx.loc[
        (tx["tx_datetime"] >= train_start) & (tx["tx_datetime"] < end),
        ["customer_id", "tx_datetime", "is_fraud"],
    ]
    metrics = evaluate(scored, history, train_start, train_end, k=k)
    online = online_metrics(scored["is_fraud"].to_numpy(), scores, settings.routing)
    ref = reference_from_card(loaded.card)
    score_psi = psi_against(ref.score, scores) if ref is not None and ref.score else None
    report = BacktestReport(
        start=begin,
        end=end,
        model=name,
        model_version=version,
        train_window=(train_start, train_end),
        metrics=metrics,
        online=online,
        decisions=dict(Counter(decisions)),
        score_psi=None if score_psi is None or math.isnan(score_psi) else score_psi,
        scored=scored,
    )
    logger.info("backtest %s: %s", version, report.summary())
    return report
