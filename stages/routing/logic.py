"""Pure routing rules: a prediction record (stages/shared/records.py) -> exactly one decision
and the reason for it."""

from __future__ import annotations

import math
from typing import Any

from stages.shared.schemas import Decision
from stages.shared.settings import RoutingSettings

# Error codes the prediction stage writes on a record it could not score.
PREDICTION_ERRORS = frozenset({"features_unavailable"})


def decide(rec: dict[str, Any], cfg: RoutingSettings) -> tuple[Decision, str]:
    """The decision for one prediction and a machine-readable reason.

    Anything that makes the score untrustworthy (no score, missing or stale features) goes
    to review rather than being approved or actioned automatically.
    """
    error = rec.get("error")
    if error:
        # The reason becomes a metric label: only known codes, never free text.
        known = isinstance(error, str) and error in PREDICTION_ERRORS
        return "review", error if known else "prediction_error"
    score = rec.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        return "review", "model_error"
    if not 0.0 <= score <= 1.0:
        return "review", "model_error"
    if rec.get("missing_views"):
        return "review", "missing_features"
    ages = rec.get("feature_age_s") or {}
    if not isinstance(ages, dict):
        # Staleness cannot be checked on a malformed record: not trustworthy enough to approve.
        return "review", "prediction_error"
    if any(isinstance(a, int | float) and a > cfg.max_feature_age_s for a in ages.values()):
        return "review", "stale_features"
    if score >= cfg.action_threshold:
        return "action", "score_high"
    if score >= cfg.review_threshold:
        return "review", "low_confidence"
    return "approved", "score_low"
