"""Customer behaviour features (feature service v2): the stream (per event,
``stages.enrichment.logic.customer_features``) and the batch definitions
(``training.features.compute_features``) agree, on hand-made cases with known answers and on
random inputs: ties, exact window edges, first transactions, customers idle for over 30
days, events late within the grace period.
"""

from __future__ import annotations

import numpy as np
import orjson
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.enrichment.logic import UNKNOWN_TERMINAL, CustomerState, customer_features
from stages.shared.schemas import (
    BEHAVIOUR_FEATURES,
    BEHAVIOUR_VIEW,
    CUSTOMER_FEATURES,
    CUSTOMER_VIEW,
    DAY_MS,
    MAX_GAP_S,
    MODEL_FEATURES,
    MODEL_FEATURES_V2,
    SERVICE_FEATURES,
    UnknownFeatureServiceError,
    service_features,
)
from training.features import behaviour_feature_rows, compute_features, event_ms

T0 = pd.Timestamp("2018-08-01 12:00:00", tz="UTC")
DAY = pd.Timedelta(days=1)
SEC = pd.Timedelta(seconds=1)
STREAMED = (*CUSTOMER_FEATURES, *BEHAVIOUR_FEATURES)


def frame(rows: list[tuple[int, int, pd.Timestamp, float]]) -> pd.DataFrame:
    """(customer, terminal, time, amount) rows; ids follow the list order."""
    df = pd.DataFrame(rows, columns=["customer_id", "terminal_id", "tx_datetime", "amount"])
    df.insert(0, "transaction_id", np.arange(len(df), dtype=np.int64))
    df["tx_datetime"] = pd.to_datetime(df["tx_datetime"], utc=True)
    df["is_fraud"] = 0
    return df


def batch(tx: pd.DataFrame) -> pd.DataFrame:
    return compute_features(tx, MODEL_FEATURES_V2).set_index("transaction_id")


def stream(tx: pd.DataFrame, grace_ms: int = 0) -> pd.DataFrame:
    """Every row through the per-event logic, in the frame's row order (the arrival order),
    the state going through its JSON form between events as in the state store."""
    states: dict[int, dict[str, object]] = {}
    out = {}
    ms = event_ms(tx["tx_datetime"])
    for r, t in zip(tx.itertuples(index=False), ms.tolist(), strict=True):
        state = CustomerState.from_state(states.get(r.customer_id))
        views = customer_features(state, t, float(r.amount), int(r.terminal_id), grace_ms)
        states[r.customer_id] = orjson.loads(orjson.dumps(state.to_state()))
        out[r.transaction_id] = {**views[CUSTOMER_VIEW], **views[BEHAVIOUR_VIEW]}
    frame = pd.DataFrame.from_dict(out, orient="index")[list(STREAMED)]
    return frame.rename_axis("transaction_id")


def test_service_features() -> None:
    assert service_features("fraud_model_v1") == MODEL_FEATURES
    assert service_features("fraud_model_v2") == (*MODEL_FEATURES, *BEHAVIOUR_FEATURES)
    assert set(SERVICE_FEATURES) == {"fraud_model_v1", "fraud_model_v2"}
    with pytest.raises(UnknownFeatureServiceError, match="fraud_model_v9"):
        service_features("fraud_model_v9")
    # The v1 default output is unchanged by the v2 features.
    assert list(compute_features(frame([(1, 1, T0, 1.0)])).columns)[4:] == list(MODEL_FEATURES)


def test_first_transaction_ties_edges_and_idle_customer() -> None:
    tx = frame(
        [
            (1, 10, T0 - 40 * DAY, 50.0),  # first ever: ratio 1, gap capped, 1 terminal
            (1, 11, T0 - 7 * DAY, 100.0),  # after 33 idle days: gap capped at 30 days
            (1, 12, T0 - DAY, 20.0),  # exactly 1 day before the next ones: not in 1d
            (1, 12, T0 - DAY + SEC, 30.0),
            (1, 13, T0, 40.0),
            (1, 12, T0, 40.0),  # tie: gap 0, sees the earlier one at the same ms
            (2, 10, T0, 0.0),  # first, amount 0: 0 / 0 is 1
            (2, 10, T0 + SEC, 0.0),
        ]
    )
    got = batch(tx)
    assert got.loc[0, "customer_amount_ratio_7d"] == 1.0
    assert got.loc[0, "customer_amount_ratio_30d"] == 1.0
    assert got.loc[0, "customer_secs_since_prev_tx"] == MAX_GAP_S
    assert got.loc[0, "customer_nb_terminals_1d"] == got.loc[0, "customer_nb_terminals_7d"] == 1
    assert got.loc[1, "customer_secs_since_prev_tx"] == MAX_GAP_S
    assert got.loc[1, "customer_amount_ratio_30d"] == 1.0  # the idle history is gone
    assert got.loc[3, "customer_secs_since_prev_tx"] == 1.0
    assert got.loc[4, "customer_secs_since_prev_tx"] == DAY.total_seconds() - 1
    assert got.loc[4, "customer_nb_terminals_1d"] == 2  # 12 (the one a second later) and 13
    assert got.loc[4, "customer_nb_terminals_7d"] == 2  # 11 is exactly 7 days before: out
    assert got.loc[5, "customer_secs_since_prev_tx"] == 0.0
    assert got.loc[5, "customer_nb_terminals_1d"] == 2
    assert got.loc[4, "customer_amount_ratio_7d"] == pytest.approx(40 / ((20 + 30 + 40) / 3))
    assert got.loc[5, "customer_amount_ratio_7d"] == pytest.approx(40 / ((20 + 30 + 40 + 40) / 4))
    assert got.loc[5, "customer_amount_ratio_30d"] == pytest.approx(40 / (230 / 5))
    assert got.loc[6, "customer_amount_ratio_7d"] == got.loc[7, "customer_amount_ratio_30d"] == 1.0
    # Medians over 30 days: 100 (row 1 alone; row 0 is 33 days older), then of 100, 20, 30
    # (30), of 100, 20, 30, 40 (35), and with the tie 40 too (40); zeros only: 1.0.
    assert got.loc[1, "customer_amount_median_ratio_30d"] == 1.0
    assert got.loc[3, "customer_amount_median_ratio_30d"] == 1.0
    assert got.loc[4, "customer_amount_median_ratio_30d"] == 40 / 35
    assert got.loc[5, "customer_amount_median_ratio_30d"] == 1.0
    assert got.loc[7, "customer_amount_median_ratio_30d"] == 1.0
    # The week's largest amount: 100 (row 1, exactly 7 days before rows 4-5, is out of it).
    assert got.loc[3, "customer_max_amount_median_ratio_7d"] == 100 / 30
    assert got.loc[4, "customer_max_amount_median_ratio_7d"] == 40 / 35
    assert got.loc[7, "customer_max_amount_median_ratio_7d"] == 1.0
    pd.testing.assert_frame_equal(
        stream(tx), got[list(STREAMED)], check_dtype=False, rtol=1e-12, atol=0
    )


def reference(tx: pd.DataFrame) -> pd.DataFrame:
    """Obviously correct, per row, from the definitions in stages.shared.schemas."""
    recs = tx.to_dict("records")
    out = {}
    for cur in recs:
        t = cur["tx_datetime"]

        def window(days: int, cur: dict[str, object] = cur, t: pd.Timestamp = t) -> list[dict]:
            return [
                o
                for o in recs
                if o["customer_id"] == cur["customer_id"]
                and t - days * DAY < o["tx_datetime"] <= t
                and (o["tx_datetime"] < t or o["transaction_id"] <= cur["transaction_id"])
            ]

        r: dict[str, float] = {}
        for n in (7, 30):
            mean = sum(o["amount"] for o in window(n)) / len(window(n))
            r[f"customer_amount_ratio_{n}d"] = cur["amount"] / mean if mean > 0 else 1.0
        prev = [o for o in window(30) if o["transaction_id"] != cur["transaction_id"]]
        gaps = [(t - o["tx_datetime"]).total_seconds() for o in prev]
        r["customer_secs_since_prev_tx"] = min(gaps) if gaps else float(MAX_GAP_S)
        for n in (1, 7):
            r[f"customer_nb_terminals_{n}d"] = len({o["terminal_id"] for o in window(n)})
        usual = float(np.median([o["amount"] for o in window(30)]))
        largest = max(o["amount"] for o in window(7))
        r["customer_amount_median_ratio_30d"] = cur["amount"] / usual if usual > 0 else 1.0
        r["customer_max_amount_median_ratio_7d"] = largest / usual if usual > 0 else 1.0
        out[cur["transaction_id"]] = r
    return pd.DataFrame.from_dict(out, orient="index")


def random_frame(rng: np.random.Generator, n: int, span_days: int = 80) -> pd.DataFrame:
    # Few customers and terminals; whole hours so that ties and exact window edges are
    # common; customer 3 is idle from day 10 to day 50 (more than 30 days).
    hours = np.sort(rng.integers(0, span_days * 24, size=n))
    customer = rng.integers(0, 4, size=n)
    customer[(customer == 3) & (hours > 10 * 24) & (hours < 50 * 24)] = 0
    return pd.DataFrame(
        {
            "transaction_id": np.arange(n, dtype=np.int64),
            "customer_id": customer,
            "terminal_id": rng.integers(0, 5, size=n),
            "tx_datetime": T0 + pd.to_timedelta(hours, unit="h"),
            "amount": np.where(rng.random(n) < 0.05, 0.0, np.round(rng.uniform(0, 200, n), 2)),
            "is_fraud": np.zeros(n, dtype=np.int8),
        }
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_matches_slow_reference_and_stream(seed: int) -> None:
    tx = random_frame(np.random.default_rng(seed), 300)
    got = batch(tx)
    want = reference(tx)
    assert tx.duplicated(["customer_id", "tx_datetime"]).any()
    capped = got["customer_secs_since_prev_tx"] == MAX_GAP_S
    assert capped.sum() > 4  # the four firsts and customer 3 back after 40 idle days
    for name in BEHAVIOUR_FEATURES:
        np.testing.assert_allclose(
            got.loc[want.index, name].to_numpy(), want[name].to_numpy(), rtol=1e-9, err_msg=name
        )
    pd.testing.assert_frame_equal(
        stream(tx), got[list(STREAMED)], check_dtype=False, rtol=1e-9, atol=0
    )


@pytest.mark.parametrize("seed", [3, 4])
def test_late_events_within_grace_see_what_has_arrived(seed: int) -> None:
    """Out of order within grace: each event's features are the batch definitions over the
    events that arrived before it (ties counted in arrival order)."""
    rng = np.random.default_rng(seed)
    tx = random_frame(rng, 150, span_days=40)
    grace_ms = 6 * 3_600_000
    # Arrival order: time plus a random delay of up to the grace period.
    ms = event_ms(tx["tx_datetime"])
    arrival = np.argsort(ms + rng.integers(0, grace_ms, size=len(tx)), kind="stable")
    arrived = tx.iloc[arrival].reset_index(drop=True)
    arrived["transaction_id"] = np.arange(len(arrived), dtype=np.int64)
    assert (np.diff(event_ms(arrived["tx_datetime"])) < 0).any()  # some really are late
    online = stream(arrived, grace_ms)
    for i in range(len(arrived)):
        want = batch(arrived.iloc[: i + 1]).loc[i, list(STREAMED)].to_numpy(np.float64)
        np.testing.assert_allclose(online.loc[i].to_numpy(), want, rtol=1e-9, err_msg=str(i))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2),  # customer
            st.integers(0, 3),  # terminal
            st.integers(0, 50 * 24),  # hour
            st.sampled_from([0.0, 0.01, 5.0, 17.25, 220.5, 1500.0]),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_stream_equals_batch_on_random_inputs(rows: list[tuple[int, int, int, float]]) -> None:
    rows.sort(key=lambda r: r[2])  # arrival in time order, ties in list (id) order
    tx = frame([(c, k, T0 + pd.Timedelta(hours=h), a) for c, k, h, a in rows])
    pd.testing.assert_frame_equal(
        stream(tx), batch(tx)[list(STREAMED)], check_dtype=False, rtol=1e-9, atol=0
    )


def test_state_stored_before_terminals_were_kept() -> None:
    old = {"ts": [0, DAY_MS], "amount": [1.0, 2.0], "max_ts": DAY_MS}
    state = CustomerState.from_state(old)
    assert state.terminal == [UNKNOWN_TERMINAL, UNKNOWN_TERMINAL]
    views = customer_features(state, DAY_MS + 1000, 3.0, 7, grace_ms=0)
    # The unknown terminals are not counted; the spending windows are unaffected.
    assert views[BEHAVIOUR_VIEW]["customer_nb_terminals_7d"] == 1.0
    assert views[CUSTOMER_VIEW]["customer_nb_tx_7d"] == 3.0
    assert views[BEHAVIOUR_VIEW]["customer_secs_since_prev_tx"] == 1.0
    assert CustomerState.from_state(orjson.loads(orjson.dumps(state.to_state()))) == state


def test_behaviour_offline_rows() -> None:
    f = compute_features(random_frame(np.random.default_rng(5), 100), MODEL_FEATURES_V2)
    rows = behaviour_feature_rows(f)
    assert list(rows.columns) == [
        "customer_id",
        "event_timestamp",
        "created_timestamp",
        *BEHAVIOUR_FEATURES,
    ]
    assert rows["customer_nb_terminals_1d"].dtype == np.int64
    assert not rows.duplicated(["customer_id", "event_timestamp"]).any()
