"""Evaluation protocol on small hand-made frames with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.evaluate import (
    average_precision,
    card_precision_at_k,
    evaluate,
    known_compromised_mask,
    roc_auc,
)

TRAIN_START = pd.Timestamp("2018-07-25", tz="UTC")
TRAIN_END = pd.Timestamp("2018-08-01", tz="UTC")


def ts(day: str, hour: int = 12) -> pd.Timestamp:
    return pd.Timestamp(day, tz="UTC") + pd.Timedelta(hours=hour)


def tx(rows: list[tuple[int, pd.Timestamp, int, float]]) -> pd.DataFrame:
    """(customer, time, is_fraud, score) rows."""
    return pd.DataFrame(rows, columns=["customer_id", "tx_datetime", "is_fraud", "score"])


def test_known_compromised_training_and_delayed_frauds() -> None:
    history = tx(
        [
            (1, ts("2018-07-24"), 1, 0),  # before training: ignored
            (2, ts("2018-07-27"), 1, 0),  # training fraud: removed on every test day
            (3, ts("2018-08-01"), 0, 0),  # legitimate: never removed
            (4, ts("2018-08-02"), 1, 0),  # gap fraud on 08-02: known from 08-10 on (> 7 days)
            (5, ts("2018-08-09", 1), 1, 0),  # test-day fraud: known from 08-17 only
        ]
    )
    test = tx(
        [
            (1, ts("2018-08-08"), 0, 0),
            (2, ts("2018-08-08"), 1, 0),
            (2, ts("2018-08-14"), 0, 0),
            (3, ts("2018-08-08"), 0, 0),
            (4, ts("2018-08-09"), 1, 0),  # 7 days after: not yet known
            (4, ts("2018-08-10", 0), 1, 0),  # 8 days after: known
            (5, ts("2018-08-09", 23), 1, 0),
            (5, ts("2018-08-14"), 1, 0),
        ]
    )
    mask = known_compromised_mask(test, history, TRAIN_START, TRAIN_END)
    assert mask.tolist() == [False, True, True, False, False, True, False, False]


def test_card_precision_by_hand() -> None:
    d1, d2 = "2018-08-08", "2018-08-09"
    scored = tx(
        [
            # Day 1: card 1 max 0.9 (fraud), card 2 max 0.8 (legit), card 3 max 0.1 (fraud).
            (1, ts(d1, 1), 0, 0.2),
            (1, ts(d1, 2), 1, 0.9),
            (2, ts(d1), 0, 0.8),
            (3, ts(d1), 1, 0.1),
            # Day 2: card 1 was detected on day 1 (excluded); card 3 now top with a fraud.
            (1, ts(d2), 1, 0.99),
            (3, ts(d2), 1, 0.7),
            (2, ts(d2), 0, 0.6),
            (4, ts(d2), 0, 0.5),
        ]
    )
    cp = card_precision_at_k(scored, k=2)
    assert cp.per_day == {d1: 0.5, d2: 0.5}
    assert cp.mean == pytest.approx(0.5)
    assert cp.compromised_cards_per_day == {d1: 2, d2: 1}
    # With k=1: day 1 picks card 1 (hit); day 2 excludes card 1, picks card 3 (hit).
    assert card_precision_at_k(scored, k=1).per_day == {d1: 1.0, d2: 1.0}
    # Denominator is k even when fewer cards exist; day 1 detected cards 1 and 3.
    assert card_precision_at_k(scored, k=10).per_day == {d1: 0.2, d2: 0.0}


def test_card_precision_card_label_is_any_fraud_that_day() -> None:
    # The card's top transaction is legitimate, but another of its transactions that day is fraud.
    scored = tx([(1, ts("2018-08-08", 1), 0, 0.9), (1, ts("2018-08-08", 2), 1, 0.1)])
    assert card_precision_at_k(scored, k=1).mean == 1.0


def test_card_precision_rejects_bad_k() -> None:
    with pytest.raises(ValueError):
        card_precision_at_k(tx([(1, ts("2018-08-08"), 0, 0.5)]), k=0)


def test_auc_and_ap_known_values() -> None:
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(y, s) == pytest.approx(0.75)
    # Ranks: 0.8 (hit, P=1), 0.4 (miss), 0.35 (hit, P=2/3) -> AP = (1 + 2/3) / 2.
    assert average_precision(y, s) == pytest.approx(5 / 6)
    assert np.isnan(roc_auc(np.zeros(3), np.ones(3)))
    assert np.isnan(average_precision(np.zeros(3), np.ones(3)))


def test_evaluate_removes_known_cards_before_all_metrics() -> None:
    history = tx([(9, ts("2018-07-26"), 1, 0)])
    test = tx(
        [
            (9, ts("2018-08-08"), 0, 1.0),  # known compromised, top score, legit: would hurt
            (1, ts("2018-08-08"), 1, 0.9),
            (2, ts("2018-08-08"), 0, 0.2),
        ]
    )
    m = evaluate(test, history, TRAIN_START, TRAIN_END, k=1)
    assert m.n_removed_known_compromised == 1
    assert m.n_transactions == 2 and m.n_frauds == 1
    assert m.roc_auc == pytest.approx(1.0)
    assert m.average_precision == pytest.approx(1.0)
    assert m.card_precision_at_k == pytest.approx(1.0)
    assert m.to_dict()["k"] == 1
