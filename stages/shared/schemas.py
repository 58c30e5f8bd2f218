"""Message contracts and feature names shared by every stage, training and the skew check.

Values on every topic are JSON objects; the Kafka message timestamp is the event time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from stages.shared.errors import RtpipeError

# --- Feast names -----------------------------------------------------------------------------
CUSTOMER_VIEW: Final = "customer_spending"
TERMINAL_VIEW: Final = "terminal_risk"
WINDOWS_DAYS: Final = (1, 7, 30)
# Labels become known this long after the transaction (SIMULATOR.md).
LABEL_DELAY_DAYS: Final = 7

CUSTOMER_FEATURES: Final = tuple(
    name for n in WINDOWS_DAYS for name in (f"customer_nb_tx_{n}d", f"customer_avg_amount_{n}d")
)
TERMINAL_FEATURES: Final = tuple(
    name for n in WINDOWS_DAYS for name in (f"terminal_nb_tx_{n}d", f"terminal_risk_{n}d")
)
# Computed from the event itself, not stored in Feast.
REQUEST_FEATURES: Final = ("amount", "is_weekend", "is_night")
# The model's input order. Changing it means a new feature service version.
MODEL_FEATURES: Final = (*REQUEST_FEATURES, *CUSTOMER_FEATURES, *TERMINAL_FEATURES)

DAY_MS: Final = 86_400_000

# Customer behaviour (feature service v2), its own view so that v1's view, its offline
# history and its service stay exactly as v1 models were trained and served on. For a
# transaction at ``t`` by customer ``c`` on terminal ``k`` (windows as above, current
# transaction included, ties in transaction-id order):
# - ``customer_amount_ratio_{n}d``: amount / customer_avg_amount_{n}d for n in 7, 30; a
#   first transaction is its own mean (1.0), and 0 / 0 (only zero amounts) is 1.0 too;
# - ``customer_secs_since_prev_tx``: seconds since c's previous transaction in
#   ``(t - 30 days, t]`` (0 for a tie), or 30 days (``MAX_GAP_S``) when there is none: a
#   first transaction and one after more than 30 idle days look the same, because 30 days
#   is all the history the stream keeps;
# - ``customer_nb_terminals_{n}d``: distinct terminals among c's transactions in
#   ``(t - n days, t]`` for n in 1, 7 (at least 1: the current one);
# - ``customer_amount_median_ratio_{n}d``: amount / the median of c's amounts in
#   ``(t - n days, t]`` for n in 30 (1.0 when that median is 0). The mean moves with the
#   inflated amounts of a compromised card (a third of its transactions at five times the
#   usual amount for two weeks); the median of 30 days stays near the usual amount;
# - ``customer_max_amount_median_ratio_{n}d``: the largest of c's amounts in ``(t - n days,
#   t]`` for n in 7, over the same 30-day median (1.0 when it is 0): a card that showed an
#   outsized amount this week, whatever the current amount.
BEHAVIOUR_VIEW: Final = "customer_behaviour"
AMOUNT_RATIO_DAYS: Final = (7, 30)
DISTINCT_TERMINAL_DAYS: Final = (1, 7)
MEDIAN_RATIO_DAYS: Final = 30
MAX_AMOUNT_DAYS: Final = 7
MAX_GAP_S: Final = 30 * 86_400
BEHAVIOUR_FEATURES: Final = (
    *(f"customer_amount_ratio_{n}d" for n in AMOUNT_RATIO_DAYS),
    "customer_secs_since_prev_tx",
    *(f"customer_nb_terminals_{n}d" for n in DISTINCT_TERMINAL_DAYS),
    f"customer_amount_median_ratio_{MEDIAN_RATIO_DAYS}d",
    f"customer_max_amount_median_ratio_{MAX_AMOUNT_DAYS}d",
)
# Model input order per feature service (the Feast services in feature_repo/ serve the
# stored ones; tests/integration/test_feast_repo.py checks that they agree).
FEATURE_SERVICE_V1: Final = "fraud_model_v1"
FEATURE_SERVICE_V2: Final = "fraud_model_v2"
MODEL_FEATURES_V2: Final = (*MODEL_FEATURES, *BEHAVIOUR_FEATURES)
SERVICE_FEATURES: Final[dict[str, tuple[str, ...]]] = {
    FEATURE_SERVICE_V1: MODEL_FEATURES,
    FEATURE_SERVICE_V2: MODEL_FEATURES_V2,
}
# The views whose features the enrichment stage computes per customer event, and their names.
CUSTOMER_VIEWS: Final[dict[str, tuple[str, ...]]] = {
    CUSTOMER_VIEW: CUSTOMER_FEATURES,
    BEHAVIOUR_VIEW: BEHAVIOUR_FEATURES,
}


class UnknownFeatureServiceError(RtpipeError, ValueError):
    """A feature service name that no model input order is defined for."""

    def __init__(self, service: str) -> None:
        super().__init__(f"unknown feature service {service!r}; known: {sorted(SERVICE_FEATURES)}")
        self.service = service


def service_features(service: str) -> tuple[str, ...]:
    """The model inputs of a feature service, in the model's column order.

    Raises:
        UnknownFeatureServiceError: for a name not in :data:`SERVICE_FEATURES`.
    """
    try:
        return SERVICE_FEATURES[service]
    except KeyError:
        raise UnknownFeatureServiceError(service) from None


Decision = Literal["action", "review", "approved"]


class InvalidMessage(RtpipeError, ValueError):
    """A message that cannot be processed; ``reason`` is a machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Transaction:
    """A payment event as produced to the ``transactions`` topic."""

    transaction_id: int
    customer_id: int
    terminal_id: int
    amount: float
    event_ms: int

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "transaction_id": self.transaction_id,
                "customer_id": self.customer_id,
                "terminal_id": self.terminal_id,
                "amount": self.amount,
            }
        )


# Amounts above this are rejected as absurd rather than scored (the simulator's largest
# inflated amounts are around 2,500).
MAX_AMOUNT: Final = 1_000_000.0
MAX_ID: Final = 2**53


def int_field(obj: dict[str, Any], name: str) -> int:
    """A required non-negative integer id below ``MAX_ID``.

    Raises:
        InvalidMessage: missing_field, wrong_type or out_of_range.
    """
    if name not in obj:
        raise InvalidMessage("missing_field", name)
    value = obj[name]
    # bool is an int subclass; a JSON true is not an id.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidMessage("wrong_type", f"{name} must be an integer, got {type(value).__name__}")
    if not 0 <= value < MAX_ID:
        raise InvalidMessage("out_of_range", f"{name}={value}")
    return value


def json_object(raw: bytes | bytearray | None, max_bytes: int | None = None) -> dict[str, Any]:
    """Decode a message value that must be a JSON object.

    Raises:
        InvalidMessage: empty, too_large (over ``max_bytes``), not_json or not_object.
    """
    if raw is None:
        raise InvalidMessage("empty", "message has no value")
    if max_bytes is not None and len(raw) > max_bytes:
        raise InvalidMessage("too_large", f"{len(raw)} bytes > {max_bytes}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage("not_json", str(exc)) from None
    if not isinstance(obj, dict):
        raise InvalidMessage("not_object", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def amount_field(obj: dict[str, Any]) -> float:
    """A required finite amount in ``[0, MAX_AMOUNT]``.

    Raises:
        InvalidMessage: missing_field, wrong_type or out_of_range.
    """
    amount = obj.get("amount")
    if amount is None:
        raise InvalidMessage("missing_field", "amount")
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise InvalidMessage("wrong_type", f"amount must be a number, got {type(amount).__name__}")
    amount = float(amount)
    if not math.isfinite(amount) or amount < 0 or amount > MAX_AMOUNT:
        raise InvalidMessage("out_of_range", f"amount={amount}")
    return amount


def parse_transaction(
    raw: bytes | None,
    event_ms: int,
    max_bytes: int,
    *,
    now_ms: int | None = None,
    max_skew_ms: int | None = None,
) -> Transaction:
    """Validate a raw ``transactions`` value.

    Args:
        raw: the message value as received.
        event_ms: the Kafka message timestamp (event time, ms since the epoch).
        max_bytes: values larger than this are rejected.
        now_ms: the wall clock; with ``max_skew_ms``, events stamped further in the future
            are rejected (``future_event``): one would advance its customer's and terminal's
            event-time clock and make every later genuine event late.
        max_skew_ms: the producer clock skew tolerated; None disables the check.

    Raises:
        InvalidMessage: with a reason code naming what is wrong.
    """
    obj = json_object(raw, max_bytes)
    if event_ms <= 0:
        raise InvalidMessage("no_timestamp", f"event time {event_ms}")
    if now_ms is not None and max_skew_ms is not None and event_ms > now_ms + max_skew_ms:
        raise InvalidMessage(
            "future_event", f"event time {event_ms} is {event_ms - now_ms} ms ahead of the clock"
        )
    amount = amount_field(obj)
    return Transaction(
        transaction_id=int_field(obj, "transaction_id"),
        customer_id=int_field(obj, "customer_id"),
        terminal_id=int_field(obj, "terminal_id"),
        amount=amount,
        event_ms=event_ms,
    )


def is_weekend(event_ms: int) -> int:
    """1 if the (UTC) day of ``event_ms`` is a Saturday or Sunday."""
    # 1970-01-01 was a Thursday (weekday 3 with Monday = 0).
    weekday = (event_ms // DAY_MS + 3) % 7
    return int(weekday >= 5)


def is_night(event_ms: int) -> int:
    """1 if the (UTC) hour of ``event_ms`` is 6 or earlier."""
    return int((event_ms % DAY_MS) // 3_600_000 <= 6)
