"""Property-based tests of every stage's parse function on malformed input.

The contract (DESIGN.md): a bad message never kills a stage and is never silently dropped.
For the pure parsers that means: whatever the bytes, a parser either returns a value that
meets the topic's contract or raises ``InvalidMessage`` with a machine-readable reason from a
closed set, never any other exception (which would crash the stage's loop). Each kind of
malformation is also checked to map to its own reason.

What counts as malformed, per topic:

* ``transactions``: not JSON, not an object, a missing or non-integer id, an id outside
  ``[0, 2**53)``, an amount that is missing, not a number, negative, above ``MAX_AMOUNT``
  (NaN and infinity cannot be written in JSON: they are ``not_json``), an oversized value, no
  event time, or an event time further in the future than the clock skew allowed
  (``future_event``). An event far in the *past* is valid on its own (replays are); the
  enrichment stage sends it to the DLQ as ``late_event`` when it is older than its
  customer's newest event minus the grace period (tested in the integration test).
* ``labels``: the same for its four integer fields, and ``is_fraud`` in {0, 1}.
* ``transactions.enriched``: the transaction fields plus ``event_ms`` under the same rules;
  carried feature values must be finite numbers.
* ``predictions``: unroutable records only (no integer ``transaction_id``, no ``score``, an
  event time librdkafka cannot stamp); a record with a nonsensical score is routed to
  ``decisions.review`` with reason ``model_error`` by design, not dead-lettered.

Unknown ids (a customer or terminal never seen) are valid: a new entity, empty windows.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stages.prediction.logic import decode_enriched
from stages.routing.logic import decide
from stages.shared.records import parse_label, parse_prediction
from stages.shared.schemas import (
    MAX_AMOUNT,
    MAX_ID,
    InvalidMessage,
    Transaction,
    parse_transaction,
)
from stages.shared.settings import RoutingSettings

REASONS = {
    "empty",
    "too_large",
    "not_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "out_of_range",
    "no_timestamp",
    "future_event",
}
MAX_BYTES = 64 * 1024
NOW_MS = 1_700_000_000_000
SKEW_MS = 3_600_000
EVENT_MS = 1_525_000_000_000  # 2018, as replays are

FAST = settings(max_examples=1_000, deadline=None, suppress_health_check=list(HealthCheck))

# -- strategies -----------------------------------------------------------------------------

ints = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, MAX_ID - 1, MAX_ID, 2**63 - 1, 2**63, 2**64 - 1]),
)
floats = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=20))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
not_an_int = st.one_of(
    st.none(), st.booleans(), floats.filter(lambda f: f != int(f)), st.text(max_size=8)
)


def valid_tx(tid: int = 1, cid: int = 2, term: int = 3, amount: float = 12.5) -> dict[str, Any]:
    return {"transaction_id": tid, "customer_id": cid, "terminal_id": term, "amount": amount}


valid_txs = st.builds(
    valid_tx,
    st.integers(0, MAX_ID - 1),
    st.integers(0, MAX_ID - 1),
    st.integers(0, MAX_ID - 1),
    st.floats(0, MAX_AMOUNT),
)
ID_FIELDS = ("transaction_id", "customer_id", "terminal_id")


def dumps(obj: Any) -> bytes:
    # The standard library writes integers of any size, as a hostile producer could.
    return json.dumps(obj, allow_nan=False).encode()


def reason_of(fn: Any, *args: Any, **kwargs: Any) -> str | None:
    try:
        fn(*args, **kwargs)
    except InvalidMessage as err:
        return err.reason
    return None


# -- transactions ---------------------------------------------------------------------------


def _check_transaction(tx: Transaction) -> None:
    for name in ID_FIELDS:
        value = getattr(tx, name)
        assert isinstance(value, int) and 0 <= value < MAX_ID
    assert math.isfinite(tx.amount) and 0 <= tx.amount <= MAX_AMOUNT
    assert 0 < tx.event_ms <= NOW_MS + SKEW_MS


@FAST
@given(raw=st.one_of(st.binary(max_size=300), json_values.map(dumps)), ts=ints)
@example(raw=b"x" * (MAX_BYTES + 1), ts=EVENT_MS)
@example(raw=b"", ts=EVENT_MS)
def test_parse_transaction_accepts_or_names_the_reason(raw: bytes, ts: int) -> None:
    try:
        tx = parse_transaction(raw, ts, MAX_BYTES, now_ms=NOW_MS, max_skew_ms=SKEW_MS)
    except InvalidMessage as err:
        assert err.reason in REASONS
        return
    _check_transaction(tx)


@FAST
@given(tx=valid_txs, field=st.sampled_from([*ID_FIELDS, "amount"]), data=st.data())
def test_each_transaction_defect_has_its_reason(
    tx: dict[str, Any], field: str, data: st.DataObject
) -> None:
    assert parse_transaction(dumps(tx), EVENT_MS, MAX_BYTES).transaction_id == tx["transaction_id"]

    missing = {k: v for k, v in tx.items() if k != field}
    assert reason_of(parse_transaction, dumps(missing), EVENT_MS, MAX_BYTES) == "missing_field"

    wrong = {**tx, field: data.draw(st.one_of(st.booleans(), st.text(max_size=5), st.lists(ints)))}
    assert reason_of(parse_transaction, dumps(wrong), EVENT_MS, MAX_BYTES) == "wrong_type"

    if field == "amount":
        bad = data.draw(
            st.one_of(
                st.floats(max_value=-1e-9, allow_infinity=False),
                st.floats(min_value=MAX_AMOUNT * (1 + 1e-12), allow_infinity=False),
            )
        )
    else:
        bad = data.draw(st.one_of(st.integers(-(2**63), -1), st.integers(MAX_ID, 2**64 - 1)))
    out = {**tx, field: bad}
    assert reason_of(parse_transaction, dumps(out), EVENT_MS, MAX_BYTES) == "out_of_range"


@FAST
@given(tx=valid_txs, ahead=st.integers(SKEW_MS + 1, 10**13), behind=st.integers(0, EVENT_MS))
def test_event_times(tx: dict[str, Any], ahead: int, behind: int) -> None:
    raw = dumps(tx)
    future = reason_of(
        parse_transaction, raw, NOW_MS + ahead, MAX_BYTES, now_ms=NOW_MS, max_skew_ms=SKEW_MS
    )
    assert future == "future_event"
    # Far in the past is valid on its own (a replay); lateness is the window's business.
    past = parse_transaction(raw, EVENT_MS - behind + 1, MAX_BYTES, now_ms=NOW_MS, max_skew_ms=0)
    assert past.event_ms == EVENT_MS - behind + 1
    assert reason_of(parse_transaction, raw, 0, MAX_BYTES) == "no_timestamp"
    # Without a clock, any positive time passes.
    assert parse_transaction(raw, NOW_MS + ahead, MAX_BYTES).event_ms == NOW_MS + ahead


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"transaction_id":1,"customer_id":2,"terminal_id":3,"amount":NaN}', "not_json"),
        (b'{"transaction_id":1,"customer_id":2,"terminal_id":3,"amount":Infinity}', "not_json"),
        (b'{"transaction_id":1,"customer_id":2,"terminal_id":3,"amount":1e400}', "not_json"),
        (b'{"transaction_id":1.5,"customer_id":2,"terminal_id":3,"amount":1}', "wrong_type"),
        (b"\xff\xfe\x00", "not_json"),
        (b"null", "not_object"),
        (b"[]", "not_object"),
        (None, "empty"),
    ],
)
def test_transaction_literals(raw: bytes | None, reason: str) -> None:
    assert reason_of(parse_transaction, raw, EVENT_MS, MAX_BYTES) == reason


# -- labels ---------------------------------------------------------------------------------

LABEL_FIELDS = ("transaction_id", "terminal_id", "tx_ms", "is_fraud")
valid_labels = st.fixed_dictionaries(
    {
        "transaction_id": st.integers(0, MAX_ID - 1),
        "customer_id": st.integers(0, MAX_ID - 1),
        "terminal_id": st.integers(0, MAX_ID - 1),
        "tx_ms": st.integers(1, MAX_ID - 1),
        "is_fraud": st.sampled_from([0, 1]),
    }
)


@FAST
@given(raw=st.one_of(st.binary(max_size=300), json_values.map(dumps), st.none()))
@example(raw=b"x" * (MAX_BYTES + 1))
def test_parse_label_accepts_or_names_the_reason(raw: bytes | None) -> None:
    try:
        tid, term, tx_ms, fraud = parse_label(raw, MAX_BYTES)
    except InvalidMessage as err:
        assert err.reason in REASONS
        return
    assert 0 <= tid < MAX_ID and 0 <= term < MAX_ID and 0 < tx_ms < MAX_ID and fraud in (0, 1)


@FAST
@given(label=valid_labels, field=st.sampled_from(LABEL_FIELDS), data=st.data())
def test_each_label_defect_has_its_reason(
    label: dict[str, Any], field: str, data: st.DataObject
) -> None:
    assert parse_label(dumps(label), MAX_BYTES)[0] == label["transaction_id"]
    assert parse_label(label)[0] == label["transaction_id"]  # decoded JSON works too
    missing = {k: v for k, v in label.items() if k != field}
    assert reason_of(parse_label, dumps(missing)) == "missing_field"
    wrong = {**label, field: data.draw(not_an_int.filter(lambda v: v is not None))}
    assert reason_of(parse_label, dumps(wrong)) == "wrong_type"
    bad = data.draw(
        st.integers(2, 2**64 - 1)
        if field == "is_fraud"
        else st.one_of(st.integers(-(2**63), -1), st.integers(MAX_ID, 2**64 - 1))
    )
    assert reason_of(parse_label, dumps({**label, field: bad})) == "out_of_range"


# -- transactions.enriched ------------------------------------------------------------------


def enriched(tx: dict[str, Any], event_ms: int = EVENT_MS, **extra: Any) -> dict[str, Any]:
    rec = {**tx, "event_ms": event_ms, "ts": {"ingest_ms": 1, "enriched_ms": 2}}
    rec["features"] = {"customer_spending": {"customer_nb_tx_1d": 1.0}}
    rec.update(extra)
    return rec


malformed_enriched = st.one_of(
    st.binary(max_size=200),
    json_values.map(dumps),
    st.builds(
        lambda tx, f, v: dumps({**enriched(tx), f: v}),
        valid_txs,
        st.sampled_from([*ID_FIELDS, "amount", "event_ms"]),
        st.one_of(not_an_int, st.integers(max_value=-1), st.integers(MAX_ID, 2**64 - 1)),
    ),
    st.builds(
        lambda tx, v: dumps(enriched(tx, features={"customer_spending": {"x": v}})),
        valid_txs,
        st.one_of(st.text(max_size=3), st.booleans(), st.lists(ints, max_size=2)),
    ),
    st.builds(lambda tx, v: dumps(enriched(tx, ts=v)), valid_txs, json_values),
)


@FAST
@given(
    values=st.lists(
        st.one_of(malformed_enriched, valid_txs.map(lambda t: dumps(enriched(t)))), max_size=20
    )
)
def test_decode_enriched_partitions_every_batch(values: list[bytes]) -> None:
    batch, bad = decode_enriched(values)
    # Every message is either a row or a dead letter, never both, never neither.
    assert sorted([*batch.index.tolist(), *(i for i, _ in bad)]) == list(range(len(values)))
    assert all(err.reason in REASONS for _, err in bad)
    for col in (batch.transaction_id, batch.customer_id, batch.terminal_id):
        assert col.dtype == np.int64 and ((col >= 0) & (col < MAX_ID)).all()
    assert (
        np.isfinite(batch.amount).all()
        and ((batch.amount >= 0) & (batch.amount <= MAX_AMOUNT)).all()
    )
    assert (batch.event_ms > 0).all()
    for snap in batch.carried:
        assert all(
            isinstance(v, float) and math.isfinite(v)
            for view in snap.values()
            for v in view.values()
        )
    for i in batch.index.tolist():
        # A valid row decodes to what was sent.
        obj = orjson.loads(values[i])
        j = batch.index.tolist().index(i)
        assert batch.transaction_id[j] == obj["transaction_id"]


@FAST
@given(tx=valid_txs, field=st.sampled_from([*ID_FIELDS, "amount", "event_ms"]), data=st.data())
def test_each_enriched_defect_has_its_reason(
    tx: dict[str, Any], field: str, data: st.DataObject
) -> None:
    rec = enriched(tx)
    del rec[field]
    assert decode_enriched([dumps(rec)])[1][0][1].reason == "missing_field"
    wrong = {**enriched(tx), field: data.draw(st.one_of(st.booleans(), st.text(max_size=4)))}
    assert decode_enriched([dumps(wrong)])[1][0][1].reason == "wrong_type"
    huge = {**enriched(tx), field: data.draw(st.integers(MAX_ID, 2**64 - 1))}
    assert decode_enriched([dumps(huge)])[1][0][1].reason == "out_of_range"


# -- predictions ----------------------------------------------------------------------------


def prediction(tid: int, score: Any, **extra: Any) -> dict[str, Any]:
    return {"transaction_id": tid, "score": score, "event_ms": EVENT_MS, **extra}


@FAST
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        json_values.map(dumps),
        st.builds(
            lambda tid, score, extra: dumps({**prediction(tid, score), **extra}),
            ints,
            json_values,
            st.dictionaries(
                st.sampled_from(["error", "missing_views", "feature_age_s", "ts", "event_ms"]),
                json_values,
            ),
        ),
    )
)
def test_predictions_are_routed_or_dead_lettered(raw: bytes) -> None:
    cfg = RoutingSettings()
    try:
        rec = parse_prediction(raw).fields
    except InvalidMessage as err:
        assert err.reason in REASONS
        return
    decision, reason = decide(rec, cfg)
    assert decision in ("action", "review", "approved")
    # The reason is a metric label: a short code, never the record's free text.
    assert reason in {
        "features_unavailable",
        "prediction_error",
        "model_error",
        "missing_features",
        "stale_features",
        "score_high",
        "low_confidence",
        "score_low",
    }
    event_ms = rec.get("event_ms")
    assert event_ms is None or 0 < event_ms < MAX_ID
    assert orjson.loads(orjson.dumps(rec)) == rec  # the routed record re-serialises


@pytest.mark.parametrize(
    ("rec", "reason"),
    [
        ({"score": 0.1}, "missing_field"),
        ({"transaction_id": "7", "score": 0.1}, "missing_field"),
        ({"transaction_id": 7}, "missing_field"),
        ({"transaction_id": -1, "score": 0.1}, "out_of_range"),
        ({"transaction_id": 2**63, "score": 0.1}, "out_of_range"),
        ({"transaction_id": 7, "score": 0.1, "event_ms": 2**63}, "out_of_range"),
        ({"transaction_id": 7, "score": 0.1, "event_ms": -5}, "out_of_range"),
        ({"transaction_id": 7, "score": 0.1, "event_ms": "x"}, "out_of_range"),
    ],
)
def test_unroutable_predictions(rec: dict[str, Any], reason: str) -> None:
    assert reason_of(parse_prediction, dumps(rec)) == reason


@pytest.mark.parametrize("score", ["0.9", None, True, -0.1, 1.5, [0.5]])
def test_untrustworthy_scores_go_to_review(score: Any) -> None:
    rec = parse_prediction(dumps(prediction(7, score))).fields
    assert decide(rec, RoutingSettings()) == ("review", "model_error")
