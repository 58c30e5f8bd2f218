"""Card bootstrap of the test metrics (training.uncertainty): pure logic on synthetic windows."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from training.card import ModelCard
from training.evaluate import card_precision_at_k
from training.report import uncertainty_section
from training.uncertainty import (
    _day_numbers,
    _Ranking,
    card_precision_ceiling,
    difference_lines,
    paired_bootstrap,
)


def window(n_cards: int = 300, days: int = 5, seed: int = 1) -> pd.DataFrame:
    """Transactions of ``n_cards`` cards over ``days`` days, a few percent fraud, tied scores."""
    rng = np.random.default_rng(seed)
    n = n_cards * days * 2
    frame = pd.DataFrame(
        {
            "customer_id": rng.integers(0, n_cards, n),
            "tx_datetime": pd.Timestamp("2018-08-08", tz="UTC")
            + pd.to_timedelta(rng.integers(0, days * 86_400, n), unit="s"),
            "is_fraud": (rng.random(n) < 0.04).astype(np.int64),
        }
    )
    # A signal, rounded so that many scores tie (ties are where the metrics differ most).
    frame["score"] = np.round(frame["is_fraud"] * 0.3 + rng.random(n) * 0.8, 2)
    return frame


def ranking(frame: pd.DataFrame, score: str = "score") -> tuple[_Ranking, np.ndarray]:
    ids, cards = np.unique(frame["customer_id"].to_numpy(), return_inverse=True)
    r = _Ranking(
        frame["is_fraud"].to_numpy(np.int64),
        frame[score].to_numpy(np.float64),
        cards,
        _day_numbers(frame["tx_datetime"]),
    )
    return r, ids


def test_unit_weights_equal_the_evaluation_metrics() -> None:
    frame = window()
    r, ids = ranking(frame)
    ones = np.ones(len(frame))
    assert r.roc_auc(ones) == pytest.approx(roc_auc_score(frame["is_fraud"], frame["score"]))
    assert r.average_precision(ones) == pytest.approx(
        average_precision_score(frame["is_fraud"], frame["score"])
    )
    for k in (5, 20, 100):
        expected = card_precision_at_k(frame, k).mean
        assert r.card_precision(np.ones(ids.size, dtype=np.int64), k) == pytest.approx(expected)


def test_integer_weights_equal_the_metrics_of_a_window_with_copied_cards() -> None:
    frame = window(n_cards=120, days=4, seed=7)
    r, ids = ranking(frame)
    rng = np.random.default_rng(3)
    card_weight = rng.integers(0, 4, ids.size)
    # The same draw written out: card c drawn w times becomes w cards c*10 + j (same order).
    position = {c: i for i, c in enumerate(ids)}
    copies = []
    for c, w in zip(ids, card_weight, strict=True):
        for j in range(w):
            rows = frame[frame["customer_id"] == c].copy()
            rows["customer_id"] = c * 10 + j
            copies.append(rows)
    copied = pd.concat(copies, ignore_index=True)
    row_weight = frame["customer_id"].map(position).map(lambda i: card_weight[i]).to_numpy(float)
    assert r.roc_auc(row_weight) == pytest.approx(
        roc_auc_score(copied["is_fraud"], copied["score"])
    )
    assert r.average_precision(row_weight) == pytest.approx(
        average_precision_score(copied["is_fraud"], copied["score"])
    )
    for k in (3, 10, 40):
        assert r.card_precision(card_weight, k) == pytest.approx(
            card_precision_at_k(copied, k).mean
        )


def test_bootstrap_points_differences_and_ceiling() -> None:
    frame = window(n_cards=400, days=3, seed=11)
    rng = np.random.default_rng(5)
    good = frame["score"].to_numpy()
    scores = {
        "primary": good,
        "same": good.copy(),
        "noisier": good + rng.normal(0, 0.5, len(frame)),
        "oracle": frame["is_fraud"].to_numpy(np.float64),
    }
    u = paired_bootstrap(frame, scores, "primary", replicates=200, seed=2, k=20)
    auc = u.metrics["roc_auc"]["primary"]
    assert auc.value == pytest.approx(roc_auc_score(frame["is_fraud"], good))
    assert auc.low < auc.value < auc.high
    cp = u.metrics["card_precision_at_k"]["oracle"]
    assert cp.value == pytest.approx(
        card_precision_at_k(frame.assign(score=scores["oracle"]), 20).mean
    )
    assert u.card_precision_ceiling == pytest.approx(cp.value)
    assert u.card_precision_ceiling == pytest.approx(card_precision_ceiling(frame, 20))
    same = u.differences["same"]
    assert all(d.value == 0 and d.low == 0 and d.high == 0 for d in same.values())
    assert all(d.share_ahead == 0 for d in same.values())
    noisier = u.differences["noisier"]["roc_auc"]
    assert noisier.value > 0 and noisier.low > 0 and noisier.share_ahead > 0.95
    oracle = u.differences["oracle"]["average_precision"]
    assert oracle.high < 0 and oracle.share_ahead == 0
    assert set(u.differences) == {"same", "noisier", "oracle"}
    # The same seed draws the same replicates.
    again = paired_bootstrap(frame, scores, "primary", replicates=200, seed=2, k=20)
    assert again.to_dict() == u.to_dict()
    assert u.to_dict()["metrics"]["roc_auc"]["primary"]["value"] == auc.value


def test_bootstrap_rejects_bad_arguments() -> None:
    frame = window(n_cards=50, days=2)
    s = {"a": frame["score"].to_numpy()}
    with pytest.raises(ValueError, match="replicates"):
        paired_bootstrap(frame, s, "a", replicates=0)
    with pytest.raises(ValueError, match="primary model 'b'"):
        paired_bootstrap(frame, s, "b")
    with pytest.raises(ValueError, match="3 scores for"):
        paired_bootstrap(frame, {"a": np.zeros(3)}, "a")
    with pytest.raises(ValueError, match="no test rows"):
        paired_bootstrap(frame.iloc[:0], {"a": np.zeros(0)}, "a")


def test_report_section_and_text_lines() -> None:
    frame = window(n_cards=200, days=2, seed=4)
    scores = {"lightgbm": frame["score"].to_numpy(), "random_forest": frame["score"].to_numpy() * 0}
    u = paired_bootstrap(frame, scores, "lightgbm", replicates=50, k=10)
    card = ModelCard.from_dict(
        {
            "name": "m",
            "version": "v1",
            "created_at": "2026-12-03T00:00:00+00:00",
            "uncertainty": u.to_dict(),
        }
    )
    text = "\n".join(uncertainty_section(card.uncertainty or {}))
    assert "## How sure these numbers are" in text
    assert f"{u.n_cards} cards, 50 replicates" in text
    assert "| lightgbm | " in text and "| random_forest | " in text
    d = u.differences["random_forest"]["roc_auc"]
    assert f"{d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}] ({100 * d.share_ahead:.0f} %)" in text
    assert f"first: {u.card_precision_ceiling:.4f}" in text
    assert uncertainty_section({}) == []
    lines = difference_lines(u)
    assert lines[0].startswith("lightgbm - random_forest: ROC AUC ")
    assert "CP@10" in lines[0] and f"50 replicates of {u.n_cards} cards" in lines[-1]


def test_a_window_without_fraud_has_undefined_ranking_intervals_and_no_warning() -> None:
    frame = window(n_cards=40, days=2).assign(is_fraud=0)
    s = {"a": frame["score"].to_numpy(), "b": frame["score"].to_numpy()[::-1].copy()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        u = paired_bootstrap(frame, s, "a", replicates=20)
    auc = u.metrics["roc_auc"]["a"]
    assert np.isnan(auc.value) and np.isnan(auc.low) and np.isnan(auc.high)
    assert u.differences["b"]["average_precision"].share_ahead == 0.0
    assert u.metrics["card_precision_at_k"]["a"].value == 0.0 == u.card_precision_ceiling
