"""How sure the test metrics are: a paired bootstrap over cards, and card precision's ceiling.

One test week holds a few hundred frauds (435 on the reference split, after the known
compromised cards are removed), so differences of a few thousandths between two models'
ROC AUC, or of a few cards in card precision@100, can come from which cards happened to fall
in the week. :func:`paired_bootstrap` measures that: each replicate redraws the test window's
cards with replacement (a card drawn twice counts as two cards, with all its transactions),
scores every model on the *same* replicate, and keeps each metric and each difference between
the primary model and another. The reported interval is the 2.5-97.5 % range of the
replicates; ``share_ahead`` is the fraction of replicates in which the primary model's metric
is higher. Resampling cards keeps a card's own transactions together (a compromised card's
frauds are not independent); frauds of one compromised terminal span several cards and are
not kept together, so the intervals are, if anything, too narrow.

:func:`card_precision_ceiling` is card precision@k of an oracle that ranks every card with a
fraud that day first: the most any model can reach on that window, since each day holds only
so many fraud cards that are not already known or detected.

The metrics are the weighted forms of :mod:`training.evaluate`'s (a weight per row, the
number of times its card was drawn): with every weight 1 they equal ROC AUC and average
precision as scikit-learn computes them and :func:`training.evaluate.card_precision_at_k`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from training.evaluate import DEFAULT_TOP_K, _day, card_precision_at_k

DEFAULT_REPLICATES = 500
METRICS: tuple[str, ...] = ("roc_auc", "average_precision", "card_precision_at_k")
INTERVAL = (2.5, 97.5)


class _Ranking:
    """One model's scores of one test window, pre-sorted for weighted metrics in O(n)."""

    def __init__(self, y: np.ndarray, score: np.ndarray, cards: np.ndarray, days: np.ndarray):
        # Distinct score values, ascending; each row's group among them.
        self.values, self.group = np.unique(score, return_inverse=True)
        self.n_groups = self.values.size
        self.y = y
        # Card-days: each card's highest score that day and whether it had a fraud that day.
        frame = pd.DataFrame({"day": days, "card": cards, "score": score, "fraud": y})
        per = frame.groupby(["day", "card"], sort=True).agg(
            score=("score", "max"), fraud=("fraud", "max")
        )
        per = per.reset_index()
        self.days: list[tuple[np.ndarray, np.ndarray]] = []
        for _, rows in per.groupby("day", sort=True):
            # Highest score first, ties by card id (as card_precision_at_k breaks them).
            rows = rows.sort_values(["score", "card"], ascending=[False, True], kind="stable")
            self.days.append(
                (rows["card"].to_numpy(np.int64), rows["fraud"].to_numpy(np.int64) == 1)
            )

    def roc_auc(self, w: np.ndarray) -> float:
        pos = np.bincount(self.group, w * self.y, self.n_groups)
        neg = np.bincount(self.group, w * (1 - self.y), self.n_groups)
        total_pos, total_neg = pos.sum(), neg.sum()
        if total_pos <= 0 or total_neg <= 0:
            return float("nan")
        below = np.cumsum(neg) - neg  # negatives strictly below each group
        return float(np.sum(pos * (below + 0.5 * neg)) / (total_pos * total_neg))

    def average_precision(self, w: np.ndarray) -> float:
        pos = np.bincount(self.group, w * self.y, self.n_groups)[::-1]
        allw = np.bincount(self.group, w, self.n_groups)[::-1]
        total_pos = pos.sum()
        if total_pos <= 0:
            return float("nan")
        tp, seen = np.cumsum(pos), np.cumsum(allw)
        keep = seen > 0
        precision = np.where(keep, tp / np.where(keep, seen, 1.0), 0.0)
        return float(np.sum(pos / total_pos * precision))

    def card_precision(self, card_weight: np.ndarray, k: int) -> float:
        """Card precision@k where card ``c`` counts ``card_weight[c]`` times."""
        detected = np.zeros(card_weight.size, dtype=np.int64)  # copies detected so far
        per_day = []
        for cards, fraud in self.days:
            w = card_weight[cards] - detected[cards]
            before = np.cumsum(w) - w  # copies ranked above each card's
            taken = np.clip(k - before, 0, w)  # how many of its copies are in the top k
            hit = fraud & (taken > 0)
            per_day.append(float(taken[hit].sum()) / k)
            detected[cards[hit]] += taken[hit]
        return float(np.mean(per_day)) if per_day else float("nan")


@dataclass(frozen=True, slots=True)
class Interval:
    """A point estimate (the test window as it is) and its bootstrap interval."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Difference:
    """Primary minus another model on one metric, over the same replicates."""

    value: float
    low: float
    high: float
    share_ahead: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Uncertainty:
    """Every model's metrics with intervals, the primary's differences, the CP ceiling."""

    primary: str
    replicates: int
    n_cards: int
    k: int
    metrics: dict[str, dict[str, Interval]]
    differences: dict[str, dict[str, Difference]]
    card_precision_ceiling: float
    seed: int = 0
    interval: tuple[float, float] = field(default=INTERVAL)

    def to_dict(self) -> dict[str, Any]:
        return {
            "primary": self.primary,
            "replicates": self.replicates,
            "n_cards": self.n_cards,
            "k": self.k,
            "seed": self.seed,
            "interval": list(self.interval),
            "resampled": "cards",
            "metrics": {
                m: {name: iv.to_dict() for name, iv in per.items()}
                for m, per in self.metrics.items()
            },
            "differences": {
                other: {name: d.to_dict() for name, d in per.items()}
                for other, per in self.differences.items()
            },
            "card_precision_ceiling": self.card_precision_ceiling,
        }


def _day_numbers(ts: pd.Series) -> np.ndarray:
    """Each row's UTC day (as :mod:`training.evaluate` cuts them), as a day number."""
    day = _day(ts).dt.tz_localize(None)
    return day.to_numpy().astype("datetime64[D]").astype(np.int64)


def card_precision_ceiling(test: pd.DataFrame, k: int = DEFAULT_TOP_K) -> float:
    """Card precision@k if every card with a fraud that day were ranked first.

    Args:
        test: the scored rows of :func:`training.evaluate.card_precision_at_k` (known
            compromised cards already removed; ``score`` is not read).
    """
    oracle = test.assign(score=test["is_fraud"].astype(np.float64))
    return card_precision_at_k(oracle, k).mean


def paired_bootstrap(
    test: pd.DataFrame,
    scores: Mapping[str, np.ndarray],
    primary: str,
    replicates: int = DEFAULT_REPLICATES,
    seed: int = 0,
    k: int = DEFAULT_TOP_K,
) -> Uncertainty:
    """Each model's test metrics with a card-bootstrap interval, and the primary's differences.

    Args:
        test: the rows the metrics are computed on (known compromised cards removed), with
            ``customer_id``, ``tx_datetime`` (tz-aware) and ``is_fraud``.
        scores: each model's scores, aligned with ``test``'s rows; ``primary`` among them.
        primary: the model whose differences to every other one are measured.
        replicates: bootstrap replicates (at least 1).
        seed: random state of the draws.
        k: cards per day of card precision.

    Raises:
        ValueError: for fewer than 1 replicate, an unknown ``primary``, a score array not
            aligned with ``test``, or a test window without rows.
    """
    if replicates < 1:
        raise ValueError(f"replicates must be >= 1, got {replicates}")
    if primary not in scores:
        raise ValueError(f"primary model {primary!r} not among the scores {sorted(scores)}")
    if len(test) == 0:
        raise ValueError("no test rows to bootstrap")
    for name, s in scores.items():
        if len(s) != len(test):
            raise ValueError(f"{name}: {len(s)} scores for {len(test)} test rows")
    card_ids, cards = np.unique(test["customer_id"].to_numpy(np.int64), return_inverse=True)
    days = _day_numbers(test["tx_datetime"])
    y = test["is_fraud"].to_numpy(np.int64)
    rankings = {
        name: _Ranking(y, np.asarray(s, dtype=np.float64), cards, days)
        for name, s in scores.items()
    }
    n_cards = card_ids.size

    def measure(card_weight: np.ndarray) -> dict[str, dict[str, float]]:
        w = card_weight[cards].astype(np.float64)
        return {
            name: {
                "roc_auc": r.roc_auc(w),
                "average_precision": r.average_precision(w),
                "card_precision_at_k": r.card_precision(card_weight, k),
            }
            for name, r in rankings.items()
        }

    point = measure(np.ones(n_cards, dtype=np.int64))
    rng = np.random.default_rng(seed)
    draws = [
        measure(np.bincount(rng.integers(0, n_cards, n_cards), minlength=n_cards))
        for _ in range(replicates)
    ]
    lo_q, hi_q = INTERVAL

    def defined(values: Sequence[float]) -> np.ndarray:
        """The replicates' values where the metric is defined (not NaN)."""
        a = np.asarray(values, dtype=np.float64)
        return a[~np.isnan(a)]

    def interval(finite: np.ndarray) -> tuple[float, float]:
        if finite.size == 0:  # a metric undefined on every replicate (no fraud, say)
            return float("nan"), float("nan")
        lo, hi = np.percentile(finite, [lo_q, hi_q])
        return float(lo), float(hi)

    metrics: dict[str, dict[str, Interval]] = {}
    differences: dict[str, dict[str, Difference]] = {n: {} for n in scores if n != primary}
    for m in METRICS:
        metrics[m] = {}
        for name in scores:
            lo, hi = interval(defined([d[name][m] for d in draws]))
            metrics[m][name] = Interval(point[name][m], lo, hi)
        for other in differences:
            diffs = defined([d[primary][m] - d[other][m] for d in draws])
            lo, hi = interval(diffs)
            ahead = float(np.mean(diffs > 0)) if diffs.size else 0.0
            differences[other][m] = Difference(point[primary][m] - point[other][m], lo, hi, ahead)
    return Uncertainty(
        primary=primary,
        replicates=replicates,
        n_cards=n_cards,
        k=k,
        metrics=metrics,
        differences=differences,
        card_precision_ceiling=card_precision_ceiling(test, k),
        seed=seed,
    )


def difference_lines(uncertainty: Uncertainty) -> list[str]:
    """Plain-text lines: the primary's difference to each other model, and the CP ceiling."""
    u = uncertainty
    short = {"roc_auc": "ROC AUC", "average_precision": "AP", "card_precision_at_k": f"CP@{u.k}"}
    low, high = u.interval
    lines = []
    for other, per in u.differences.items():
        parts = [
            f"{short[m]} {d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}] ahead in "
            f"{100 * d.share_ahead:.0f} %"
            for m, d in per.items()
        ]
        lines.append(f"{u.primary} - {other}: " + "; ".join(parts))
    lines.append(
        f"(paired card bootstrap, {u.replicates} replicates of {u.n_cards} cards, "
        f"{low:g}-{high:g} % ranges; card precision@{u.k} of an oracle ranking every fraud "
        f"card first: {u.card_precision_ceiling:.4f})"
    )
    return lines
