"""Records read from more than one consumer group, one type each with the one decoder that
checks it: a topic's contract is enforced in the same way by every stage that reads it.

- ``labels`` (the enrichment stage's labels process indexes them; the evaluation stage joins
  them with predictions): :class:`Label`, :func:`parse_label`.
- ``predictions`` (the routing stage decides on them; the evaluation stage joins them):
  :class:`Prediction`, :func:`parse_prediction`.
- A transaction's identity by content (the enrichment stage's duplicate check and the
  prediction stage's claims compare it): :func:`fingerprint`, and the reason a copy with
  other content is dead-lettered under, :data:`CONFLICT_REASON`.

A record that fails the check is dead-lettered by the stage that owns the topic's contract
(labels: enrichment; predictions: routing) and skipped, counted, by the others.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from stages.shared.schemas import MAX_ID, InvalidMessage, Transaction, json_object


class Label(NamedTuple):
    """A ``labels`` value: whether a transaction turned out to be fraud."""

    transaction_id: int
    terminal_id: int
    # The labelled transaction's time (ms): the label index orders a terminal's labels by it.
    tx_ms: int
    is_fraud: int


_LABEL_FIELDS = Label._fields


def parse_label(obj: Any, max_bytes: int | None = None) -> Label:
    """Check a ``labels`` value.

    Args:
        obj: the raw message bytes, or an already decoded JSON value.
        max_bytes: raw values larger than this are rejected (too_large).

    Raises:
        InvalidMessage: naming the problem.
    """
    if obj is None or isinstance(obj, bytes | bytearray):
        obj = json_object(obj, max_bytes)
    elif not isinstance(obj, dict):
        raise InvalidMessage("not_object", type(obj).__name__)
    out = []
    for name in _LABEL_FIELDS:
        v = obj.get(name)
        if v is None:
            raise InvalidMessage("missing_field", name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidMessage("wrong_type", f"{name} must be an integer")
        out.append(v)
    label = Label(*out)
    if label.is_fraud not in (0, 1):
        raise InvalidMessage("out_of_range", f"is_fraud={label.is_fraud}")
    if not (
        0 <= label.transaction_id < MAX_ID
        and 0 <= label.terminal_id < MAX_ID
        and 0 < label.tx_ms < MAX_ID
    ):
        raise InvalidMessage("out_of_range", "id or time out of range")
    return label


@dataclass(frozen=True, slots=True)
class Prediction:
    """A ``predictions`` value. Only what every reader relies on is checked here; the score
    is kept as written (routing sends an untrustworthy one to review, the evaluation skips
    it) and so is the whole record, which routing passes on with its decision."""

    transaction_id: int
    # The event time, None when absent; when present, an integer librdkafka accepts as a
    # message timestamp (the decision's).
    event_ms: int | None
    fields: dict[str, Any]

    @property
    def score(self) -> object:
        return self.fields.get("score")


def parse_prediction(raw: bytes | bytearray | None) -> Prediction:
    """Decode and check a prediction record.

    Raises:
        InvalidMessage: when the record cannot be routed or joined at all.
    """
    rec = json_object(raw)
    tid = rec.get("transaction_id")
    if isinstance(tid, bool) or not isinstance(tid, int):
        raise InvalidMessage("missing_field", "transaction_id")
    if not 0 <= tid < MAX_ID:
        raise InvalidMessage("out_of_range", f"transaction_id={tid}")
    if "score" not in rec:
        raise InvalidMessage("missing_field", "score")
    event_ms = rec.get("event_ms")
    if event_ms is not None and (
        isinstance(event_ms, bool) or not isinstance(event_ms, int) or not 0 < event_ms < MAX_ID
    ):
        raise InvalidMessage("out_of_range", f"event_ms={event_ms!r}")
    return Prediction(tid, event_ms, rec)


# --- a transaction's content -----------------------------------------------------------------
# A transaction id seen again with other content (DLQ reason, in both stages that check it).
CONFLICT_REASON: Final = "conflicting_duplicate"
_CONTENT = struct.Struct("<qqqdq")


def fingerprint(tx: Transaction) -> int:
    """A stable 64-bit hash of a transaction's canonical content: transaction, customer and
    terminal ids, amount (as a float: ``12``, ``12.0`` and ``12.00`` are one amount) and
    event time in ms. Field order, spacing and unknown fields of the JSON do not matter."""
    return content_fingerprint(
        tx.transaction_id, tx.customer_id, tx.terminal_id, tx.amount, tx.event_ms
    )


def content_fingerprint(
    transaction_id: int, customer_id: int, terminal_id: int, amount: float, event_ms: int
) -> int:
    """:func:`fingerprint` from the fields."""
    # + 0.0 turns -0.0 (a valid amount) into 0.0: one value, one encoding.
    packed = _CONTENT.pack(transaction_id, customer_id, terminal_id, amount + 0.0, event_ms)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little")
