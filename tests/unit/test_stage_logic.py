"""Pure logic of the three stages: windows, request features, matrix assembly, routing."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from stages.enrichment.logic import (
    CustomerState,
    LateEvent,
    update_customer,
)
from stages.prediction.logic import (
    EnrichedBatch,
    assemble_matrix,
    decode_enriched,
    point_in_time,
    request_features,
)
from stages.routing.logic import decide
from stages.shared.records import parse_label, parse_prediction
from stages.shared.schemas import (
    DAY_MS,
    InvalidMessage,
    is_night,
    is_weekend,
    parse_transaction,
)
from stages.shared.settings import RoutingSettings
from tests.terminal_reference import TerminalState, add_label, terminal_features

T0 = 1_525_132_800_000  # 2018-05-01T00:00:00Z, a Tuesday


def test_customer_windows_include_current_and_exclude_exactly_n_days_ago() -> None:
    s = CustomerState.from_state(None)
    update_customer(s, T0, 10.0, grace_ms=0)
    update_customer(s, T0 + DAY_MS - 1, 20.0, grace_ms=0)
    f = update_customer(s, T0 + DAY_MS, 30.0, grace_ms=0)
    # (t - 1 day, t]: the first one (exactly one day before) is out.
    assert f["customer_nb_tx_1d"] == 2
    assert f["customer_avg_amount_1d"] == pytest.approx(25.0)
    assert f["customer_nb_tx_7d"] == 3
    assert f["customer_avg_amount_7d"] == pytest.approx(20.0)


def test_customer_ties_count_in_arrival_order_and_late_events_are_rejected() -> None:
    s = CustomerState.from_state(None)
    assert update_customer(s, T0, 1.0, grace_ms=1000)["customer_nb_tx_1d"] == 1
    assert update_customer(s, T0, 3.0, grace_ms=1000)["customer_nb_tx_1d"] == 2
    # Out of order within grace: its own window only sees events at or before it.
    update_customer(s, T0 + 5000, 5.0, grace_ms=10_000)
    assert update_customer(s, T0 + 100, 7.0, grace_ms=10_000)["customer_nb_tx_1d"] == 3
    with pytest.raises(LateEvent) as err:
        update_customer(s, T0 - 20_000, 1.0, grace_ms=10_000)
    assert err.value.reason == "late_event"


def test_customer_state_is_pruned_to_the_longest_window() -> None:
    s = CustomerState.from_state(None)
    for d in range(100):
        update_customer(s, T0 + d * DAY_MS, 1.0, grace_ms=0)
    assert len(s.ts) <= 31
    restored = CustomerState.from_state(orjson.loads(orjson.dumps(s.to_state())))
    assert restored == s


def test_terminal_risk_uses_only_labels_older_than_the_delay() -> None:
    s = TerminalState.from_state(None)
    t = T0 + 40 * DAY_MS
    add_label(s, t - 8 * DAY_MS, 1, 1, grace_ms=0)  # in (t-8d, t-7d]? 8 days ago: 1d window no
    add_label(s, t - 7 * DAY_MS - 1, 2, 0, grace_ms=0)  # just inside every window
    add_label(s, t - 6 * DAY_MS, 3, 1, grace_ms=0)  # only 6 days old: not yet usable
    f = terminal_features(s, t, grace_ms=0)
    assert f["terminal_nb_tx_1d"] == 1
    assert f["terminal_risk_1d"] == 0.0
    assert f["terminal_nb_tx_7d"] == 2
    assert f["terminal_risk_7d"] == pytest.approx(0.5)
    # A repeated label changes nothing.
    assert not add_label(s, t - 8 * DAY_MS, 1, 1, grace_ms=0)
    assert terminal_features(s, t, grace_ms=0) == f


def test_empty_terminal_window_is_zero() -> None:
    f = terminal_features(TerminalState.from_state(None), T0, grace_ms=0)
    assert all(v == 0.0 for v in f.values())


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({"transaction_id": 1, "terminal_id": 2, "tx_ms": 3}, "missing_field"),
        ({"transaction_id": 1, "terminal_id": 2, "tx_ms": 3, "is_fraud": 2}, "out_of_range"),
        ({"transaction_id": True, "terminal_id": 2, "tx_ms": 3, "is_fraud": 1}, "wrong_type"),
        ([1], "not_object"),
    ],
)
def test_parse_label_rejects(value: object, reason: str) -> None:
    with pytest.raises(InvalidMessage) as err:
        parse_label(value)
    assert err.value.reason == reason


def test_parse_transaction_and_request_features_agree_with_calendar() -> None:
    raw = b'{"transaction_id": 5, "customer_id": 6, "terminal_id": 7, "amount": 12.5}'
    tx = parse_transaction(raw, T0 + 3 * 3_600_000, max_bytes=1000)
    assert (tx.transaction_id, tx.customer_id, tx.terminal_id, tx.amount) == (5, 6, 7, 12.5)
    saturday_noon = T0 + 4 * DAY_MS + 12 * 3_600_000
    assert is_weekend(saturday_noon) == 1 and is_night(saturday_noon) == 0
    assert is_weekend(T0) == 0 and is_night(T0 + 6 * 3_600_000 + 59_000) == 1
    req = request_features(np.array([1.0, 2.0]), np.array([T0, saturday_noon]))
    np.testing.assert_array_equal(req, [[1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])


def test_decode_enriched_separates_bad_rows() -> None:
    good = orjson.dumps(
        {
            "transaction_id": 1,
            "customer_id": 2,
            "terminal_id": 3,
            "amount": 4.0,
            "event_ms": T0,
            "ts": {"ingest_ms": 9, "enriched_ms": 10},
            "features": {"v": {"f": 1.0}},
        }
    )
    batch, bad = decode_enriched([good, b"{", None, b'{"transaction_id": 1}', good])
    assert batch.index.tolist() == [0, 4]
    assert batch.ingest_ms.tolist() == [9, 9]
    assert [(i, e.reason) for i, e in bad] == [(1, "not_json"), (2, "empty"), (3, "missing_field")]


def test_assemble_matrix_orders_columns_and_rejects_unknown_features() -> None:
    req = np.array([[1.0, 0.0, 1.0]])
    online = np.array([[7.0, 8.0]])
    m = assemble_matrix(["b", "amount", "a", "is_night"], req, online, ["a", "b"])
    np.testing.assert_array_equal(m, [[8.0, 1.0, 7.0, 1.0]])
    with pytest.raises(KeyError):
        assemble_matrix(["zzz"], req, online, ["a", "b"])


def _carrying(rows: list[tuple[int, dict[str, float]]]) -> EnrichedBatch:
    """A decoded batch whose rows carry view ``v``'s aggregates: (event ms, features)."""
    raw = [
        orjson.dumps(
            {
                "transaction_id": i,
                "customer_id": 1,
                "terminal_id": 1,
                "amount": 1.0,
                "event_ms": event_ms,
                "features": {"v": feats},
            }
        )
        for i, (event_ms, feats) in enumerate(rows)
    ]
    batch, bad = decode_enriched(raw)
    assert not bad
    return batch


def test_point_in_time_replaces_rows_newer_than_the_event_or_another_events_tie() -> None:
    batch = _carrying([(T0 + i, {"a": 100.0 + i}) for i in range(5)])
    values = np.array([[5.0], [5.0], [102.0], [5.0], [5.0]])
    # Row 0: a row from the future. Row 1: same time, another event's row (values differ).
    # Row 2: same time, this event's own row. Row 3: missing. Row 4: an older row.
    ts = {"v": np.array([T0 + 2, T0 + 1, T0 + 2, T0 + 1, T0 + 1])}
    found = {"v": np.array([True, True, True, False, True])}
    replaced = point_in_time(values, ts, found, ["a"], batch)
    assert replaced == {"v": 2}
    np.testing.assert_array_equal(values[:, 0], [100.0, 101.0, 102.0, 5.0, 5.0])
    assert ts["v"].tolist() == [T0, T0 + 1, T0 + 2, T0 + 1, T0 + 1]


def test_point_in_time_row_by_row_when_snapshots_differ() -> None:
    batch = _carrying([(T0, {"a": 2.0, "b": 3.0}), (T0, {"a": 1.0})])
    values = np.array([[9.0, 9.0], [1.0, 9.0]])
    ts = {"v": np.array([T0, T0])}
    found = {"v": np.array([True, True])}
    assert point_in_time(values, ts, found, ["a", "b"], batch) == {"v": 1}
    np.testing.assert_array_equal(values, [[2.0, 3.0], [1.0, 9.0]])


@pytest.mark.parametrize(
    ("rec", "expected"),
    [
        ({"score": 0.9}, ("action", "score_high")),
        ({"score": 0.3}, ("review", "low_confidence")),
        ({"score": 0.01}, ("approved", "score_low")),
        ({"score": None, "error": "features_unavailable"}, ("review", "features_unavailable")),
        ({"score": float("nan")}, ("review", "model_error")),
        ({"score": 1.5}, ("review", "model_error")),
        ({"score": 0.01, "missing_views": ["customer_spending"]}, ("review", "missing_features")),
        ({"score": 0.01, "feature_age_s": {"v": 10 * 86_400.0}}, ("review", "stale_features")),
    ],
)
def test_routing_decisions(rec: dict[str, object], expected: tuple[str, str]) -> None:
    cfg = RoutingSettings(action_threshold=0.5, review_threshold=0.2, max_feature_age_s=86_400)
    assert decide(rec, cfg) == expected


def test_parse_prediction_requires_an_id_and_a_score() -> None:
    assert parse_prediction(b'{"transaction_id": 1, "score": 0.5}').score == 0.5
    for raw, reason in [
        (b"x", "not_json"),
        (b'{"score": 1}', "missing_field"),
        (b'{"transaction_id": 1}', "missing_field"),
        (None, "empty"),
    ]:
        with pytest.raises(InvalidMessage) as err:
            parse_prediction(raw)
        assert err.value.reason == reason


def test_stable_fraction_is_deterministic_and_uniform() -> None:
    from stages.prediction.logic import stable_fraction

    ids = np.arange(200_000, dtype=np.int64)
    f = stable_fraction(ids)
    np.testing.assert_array_equal(f, stable_fraction(ids.copy()))
    assert ((f >= 0) & (f < 1)).all()
    assert abs((f < 0.3).mean() - 0.3) < 0.01
    # Not just the id order: neighbours land far apart.
    assert abs(np.corrcoef(ids, f)[0, 1]) < 0.01


def test_terminal_windows_are_exact_for_transactions_arriving_out_of_order() -> None:
    # The terminal step merges customer partitions: a later transaction can arrive first.
    s = TerminalState.from_state(None)
    t = T0 + 60 * DAY_MS
    add_label(s, t - 36 * DAY_MS, 1, 0, grace_ms=DAY_MS)  # needed by a transaction at t
    late = terminal_features(s, t + 3 * 3_600_000, grace_ms=DAY_MS)  # arrives first
    on_time = terminal_features(s, t, grace_ms=DAY_MS)
    assert late["terminal_nb_tx_30d"] == 1
    assert on_time["terminal_nb_tx_30d"] == 1
    # Without the slack the label would have been pruned by the later transaction.
    s2 = TerminalState.from_state(None)
    add_label(s2, t - 36 * DAY_MS, 1, 0, grace_ms=0)
    terminal_features(s2, t + 3 * 3_600_000 + DAY_MS, grace_ms=0)
    assert terminal_features(s2, t, grace_ms=0)["terminal_nb_tx_30d"] == 0


def test_replay_puts_a_label_before_a_transaction_at_the_instant_it_becomes_known() -> None:
    import pandas as pd

    from stages.ops.replay import ReplayPlan, build_events

    t0 = pd.Timestamp("2018-05-01", tz="UTC")
    tx = pd.DataFrame(
        {
            "transaction_id": [1, 2],
            "customer_id": [10, 11],
            "terminal_id": [5, 5],
            "amount": [1.0, 2.0],
            "is_fraud": [1, 0],
            "tx_datetime": [
                t0,
                t0 + pd.Timedelta(days=7),
            ],  # tx 2 at the instant 1's label is known
        }
    )
    plan = ReplayPlan(t0 + pd.Timedelta(days=7), t0 + pd.Timedelta(days=8), history_days=7)
    ev = build_events(tx, plan)
    kinds = ev["kind"].tolist()
    assert kinds.index(0) < kinds.index(1)  # the label (kind 0) goes first
    label = ev[ev["kind"] == 0].iloc[0]
    assert label["tx_ms"] == int(t0.value // 1_000_000)
    assert (ev["kind"] == 2).sum() == 1  # tx 1 also warms the customer windows up


@pytest.mark.parametrize("ages", [True, 3, "old", [1, 2]])
def test_a_malformed_feature_age_goes_to_review(ages: object) -> None:
    rec = {"transaction_id": 1, "score": 0.01, "feature_age_s": ages}
    assert decide(rec, RoutingSettings()) == ("review", "prediction_error")


def test_the_enriched_record_is_what_the_prediction_stage_decodes() -> None:
    # The enrichment app's writer and the prediction stage's reader of the same contract.
    from stages.enrichment.app import _enriched_json
    from stages.prediction.logic import decode_enriched
    from stages.shared.schemas import CUSTOMER_FEATURES, CUSTOMER_VIEW

    feats = {f: float(i) + 0.5 for i, f in enumerate(CUSTOMER_FEATURES)}
    rec = {
        "kind": "ok",
        "raw": b"{...}",
        "warmup": False,
        "transaction_id": 7,
        "customer_id": 3,
        "terminal_id": 11,
        "amount": 12.5,
        "event_ms": 1_530_000_000_000,
        "ts": {"ingest_ms": 1_800_000_000_000, "consumed_ms": 1, "enriched_ms": 1_800_000_000_005},
        # Per view, as customer_features returns them.
        "features": {CUSTOMER_VIEW: feats},
    }
    batch, bad = decode_enriched([_enriched_json(rec)])
    assert bad == []
    assert batch.transaction_id.tolist() == [7] and batch.terminal_id.tolist() == [11]
    assert batch.enriched_ms.tolist() == [1_800_000_000_005]
    assert batch.carried == [{CUSTOMER_VIEW: feats}]


def test_scored_and_unscored_records_share_their_shape() -> None:
    import orjson

    from stages.prediction.logic import ScoredBatch, prediction_records, unscored_records

    n = 3
    batch = EnrichedBatch(
        index=np.arange(n),
        transaction_id=np.array([5, 6, 7]),
        customer_id=np.array([1, 2, 3]),
        terminal_id=np.array([9, 9, 8]),
        amount=np.array([10.0, 20.5, 0.0]),
        event_ms=np.array([T0, T0 + 1, T0 + 2]),
        enriched_ms=np.array([T0 + 10] * n),
        ingest_ms=np.array([T0 + 5] * n),
        carried=[{}] * n,
    )
    ts = {"customer_spending": batch.event_ms.copy()}
    found = {"customer_spending": np.ones(n, dtype=bool)}
    scored = [
        orjson.loads(r)
        for r in prediction_records(
            batch,
            ScoredBatch(
                np.array([0.1, 0.2, 0.3]),
                np.zeros((n, 1)),
                ["amount"],
                ts,
                found,
                model="fraud",
                model_version="v0001",
                feature_service="fraud_model_v1",
            ),
            T0 + 20,
        )
    ]
    unscored = [
        orjson.loads(r)
        for r in unscored_records(
            batch, "features_unavailable", "x" * 300, "fraud", "v0001", T0 + 20
        )
    ]
    event = ("transaction_id", "customer_id", "terminal_id", "amount", "event_ms", "ts")
    for s, u in zip(scored, unscored, strict=True):
        assert {k: s[k] for k in event} == {k: u[k] for k in event}
        assert (u["score"], u["error"], u["model"], u["model_version"]) == (
            None,
            "features_unavailable",
            "fraud",
            "v0001",
        )
        assert len(u["error_detail"]) == 200
    assert unscored[1]["ts"] == {
        "ingest_ms": T0 + 5,
        "enriched_ms": T0 + 10,
        "predicted_ms": T0 + 20,
    }
