"""Input integrity of the customer windows (issue #11): one window update and one outcome per
transaction id, whatever producers do with keys and retries. Pure functions, no Kafka.

Placement. The entity is the payload's ``customer_id``, never the message key. A customer's
canonical key is the JSON encoding of its integer id (``b"4500"``) and its canonical
partition is Kafka's default partitioner over that key (the Java client's murmur2, also
librdkafka's ``murmur2``/``murmur2_random`` and ``rtpipe replay``'s). quixstreams keeps
state per message key and partition, so a record is windowed only where both are canonical;
:func:`route` says what to do with the others: re-produce them to the input topic with the
canonical key and a ``rtpipe.rekeyed`` header naming the reason (inside the exactly-once
transaction that consumes the original), or dead-letter them (``rekey_loop``) when they
already were re-produced once and still arrive misplaced (the topic's partition count
changed in between, or the stage's own producer does not partition by murmur2).

Idempotent intake. Within a customer's state, a transaction id is remembered with a 64-bit
fingerprint of its content (:func:`stages.shared.records.fingerprint`) for ``horizon_ms``
(default 31 days, longer than the longest window, 30 days) of the customer's event time:

- The remembered set holds the entries whose event time ``e`` is in ``(M - H, M]``, where
  ``M`` is the newest event time remembered for the customer and ``H`` the horizon; older
  ones are pruned whenever an entry is added (:func:`remember`).
- :func:`check_duplicate` finds an entry with the same id whose event time is less than
  ``H`` from the record's: same fingerprint ``"duplicate"`` (no window update, no outcome),
  another fingerprint ``"conflict"`` (dead-letter ``conflicting_duplicate``; the first copy
  stays the reference and the conflicting copy is not remembered). Otherwise ``"new"``.
- Out of order is fine: an entry is kept by its own event time relative to ``M``, whatever
  the order of arrival. An exact copy is recognised as long as the customer's clock has not
  moved ``H`` or more past the original. A copy arriving later than that is ``"new"``: with
  ``H`` longer than the window grace it is then always late for the windows (its event time
  is more than the grace behind ``M``), so it is never counted twice, but it is
  dead-lettered ``late_event``: the id's second outcome. Two records with one id whose event
  times are ``H`` or more apart are two transactions (both ``"new"``).
- An event far in the future (up to the stage's tolerated clock skew) advances ``M`` and so
  prunes early; that is the same clock the windows' lateness uses.

Order in the stage: :func:`route` first (state is only the customer's when the key and the
partition are canonical), then :func:`check_duplicate` *before* the windows' lateness check
(so a retried old event is a silent duplicate, not a ``late_event``), then :func:`remember`
every ``"new"`` record whatever its outcome (windowed or ``late_event``), so that its retries
add no second outcome. :func:`admit` does the last two.

Limit. A copy whose payload names *another* customer lands in that customer's partition and
state, where this id was never seen: per-customer deduplication cannot see it (it is windowed
there and scored again). Only a check keyed by transaction id can (downstream topics are).

State encoding. :meth:`DedupState.to_bytes` is, little-endian: the newest event time ``M``
and a base time ``B`` (int64 each), then for the ``n`` entries, in event-time order, their
transaction ids (int64 each), fingerprints (uint64 each) and event times as offsets from
``B`` (uint32 each, hence ``H <= 2**32`` ms, about 49.7 days; ``B`` moves up when an offset
would overflow): ``16 + 20 n`` bytes. quixstreams stores state values as JSON by default, so
:meth:`DedupState.to_state` is that in an ASCII string, ``"1:"`` and its base64:
``2 + 4 * ceil((16 + 20 n) / 3)`` characters, which can sit inside the customer's window
dict (one state value, one changelog record per update). With :func:`state_dumps` and
:func:`state_loads` as the application's RocksDB serialisers, the bytes can be stored as
they are, under their own state key.

Memory at 1 M transactions a day with the default 31-day horizon: 31 M entries remembered in
steady state across all customers; as bytes 31e6 * 20 B = 620 MB (0.58 GiB), as the JSON
string 31e6 * 80/3 B = 826.7 MB (0.77 GiB), in RocksDB and as much again in the compacted
changelog topic; plus about 35 bytes per customer (header, prefix, key). A customer's
entries are pruned only when one of its transactions arrives, so an idle customer keeps
its last 31 days of ids until its next one (as its window lists do). On the 2-core
development machine, decoding, checking, inserting and encoding 60 entries costs about
25 us as the JSON string (base64 is most of it), 10 us as bytes.
"""

from __future__ import annotations

import binascii
import struct
import sys
from array import array
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple

import orjson

from stages.shared.errors import RtpipeError
from stages.shared.records import fingerprint
from stages.shared.schemas import DAY_MS, WINDOWS_DAYS, Transaction

# --- placement -------------------------------------------------------------------------------
REKEYED_HEADER: Final = "rtpipe.rekeyed"

RouteAction = Literal["window", "rekey", "dlq"]
RouteReason = Literal["no_key", "key_mismatch", "key_format", "wrong_partition", "rekey_loop"]

_MASK32: Final = 0xFFFFFFFF
_M: Final = 0x5BD1E995
_SEED: Final = 0x9747B28C
_WORDS = struct.Struct("<I")


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (``org.apache.kafka.common.utils.Utils.murmur2``), as the Java
    client's signed 32-bit result."""
    length = len(data)
    h = (_SEED ^ length) & _MASK32
    body = length & ~3
    for (k,) in _WORDS.iter_unpack(data[:body]):
        k = (k * _M) & _MASK32
        k ^= k >> 24
        k = (k * _M) & _MASK32
        h = ((h * _M) & _MASK32) ^ k
    rest = length & 3
    if rest:
        # The Java switch falls through: 3 takes bytes 2, 1, 0; then one multiply.
        if rest == 3:
            h ^= data[body + 2] << 16
        if rest >= 2:
            h ^= data[body + 1] << 8
        h ^= data[body]
        h = (h * _M) & _MASK32
    h ^= h >> 13
    h = (h * _M) & _MASK32
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def canonical_key(customer_id: int) -> bytes:
    """The message key a customer's transactions must carry: its id as a JSON number."""
    if isinstance(customer_id, bool) or not isinstance(customer_id, int):
        raise TypeError(f"customer_id must be an int, got {type(customer_id).__name__}")
    return orjson.dumps(customer_id)


def canonical_partition(key: bytes, num_partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner gives ``key``:
    ``(murmur2(key) & 0x7fffffff) % num_partitions``."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be positive, got {num_partitions}")
    return (murmur2(key) & 0x7FFFFFFF) % num_partitions


class Routing(NamedTuple):
    """What the stage does with a record: window it here, re-produce it canonically keyed
    (``rekey``), or dead-letter it; ``reason`` is None exactly when it is windowed."""

    action: RouteAction
    reason: RouteReason | None


def key_customer(key: bytes) -> int | None:
    """The customer id a non-canonical key spells, if any: a JSON number or string of
    digits (``4500``, ``"4500"``, ``4500.0``, ``" 4500 "``), or bare digits (``04500``)."""
    try:
        value = orjson.loads(key)
    except orjson.JSONDecodeError:
        try:
            value = key.decode("ascii").strip()
        except UnicodeDecodeError:
            return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        return int(text) if text.isascii() and text.isdigit() else None
    return None


def _misplacement(
    key: bytes | None, partition: int, num_partitions: int, customer_id: int
) -> RouteReason | None:
    if not key:
        # A null key is placed at random; an empty one is as good as none.
        return "no_key"
    canonical = canonical_key(customer_id)
    if key != canonical:
        named = key_customer(key)
        # A key that spells no id at all (binary, text) is a format problem too.
        return "key_mismatch" if named is not None and named != customer_id else "key_format"
    if partition != canonical_partition(canonical, num_partitions):
        return "wrong_partition"
    return None


def route(
    key: bytes | None,
    partition: int,
    num_partitions: int,
    payload_customer_id: int,
    rekeyed: bool,
) -> Routing:
    """Where a valid ``transactions`` record goes, by its key and partition.

    Args:
        key: the message key bytes as received (None when the record has none).
        partition: the partition it was read from.
        num_partitions: the input topic's partition count.
        payload_customer_id: the customer id of the parsed payload.
        rekeyed: whether the record carries :data:`REKEYED_HEADER` (the stage re-produced it).

    Returns:
        ``("window", None)`` when key and partition are canonical; otherwise ``("rekey",
        reason)`` with reason ``no_key``, ``key_mismatch`` (the key names another customer),
        ``key_format`` (another encoding of this customer, or no id at all) or
        ``wrong_partition`` (canonical key, another partitioner); ``("dlq", "rekey_loop")``
        for a re-produced record that still arrives misplaced.
    """
    reason = _misplacement(key, partition, num_partitions, payload_customer_id)
    if reason is None:
        return Routing("window", None)
    if rekeyed:
        return Routing("dlq", "rekey_loop")
    return Routing("rekey", reason)


def describe_placement(
    key: bytes | None, partition: int, num_partitions: int, customer_id: int
) -> str:
    """A DLQ/log detail: where the record was and where it belongs."""
    canonical = canonical_key(customer_id)
    return (
        f"key {key!r} partition {partition}; customer {customer_id} belongs under key "
        f"{canonical!r} in partition {canonical_partition(canonical, num_partitions)} "
        f"of {num_partitions}"
    )


def rekeyed_reason(headers: Iterable[tuple[str, Any]] | None) -> str | None:
    """The reason of the record's :data:`REKEYED_HEADER`, or None if it has none."""
    for name, value in headers or ():
        if name == REKEYED_HEADER:
            if isinstance(value, bytes | bytearray):
                return bytes(value).decode("utf-8", "replace")
            return "" if value is None else str(value)
    return None


def rekey_headers(
    headers: Iterable[tuple[str, Any]] | None, reason: RouteReason
) -> list[tuple[str, bytes]]:
    """The headers of the re-produced copy: the original ones (``rtpipe.ingest_ms`` keeps
    the latency measured from the first arrival) and :data:`REKEYED_HEADER` = reason."""
    out: list[tuple[str, bytes]] = []
    for name, value in headers or ():
        if name == REKEYED_HEADER:
            continue
        if isinstance(value, bytes | bytearray):
            out.append((name, bytes(value)))
        elif isinstance(value, str):
            out.append((name, value.encode()))
    out.append((REKEYED_HEADER, reason.encode()))
    return out


# --- idempotent intake -----------------------------------------------------------------------
DedupVerdict = Literal["new", "duplicate", "conflict"]

DEFAULT_HORIZON_MS: Final = 31 * DAY_MS
# Shorter and an exact copy could come back inside a window that has forgotten it.
MIN_HORIZON_MS: Final = max(WINDOWS_DAYS) * DAY_MS
# Event times are stored as uint32 millisecond offsets from a base inside the horizon.
MAX_HORIZON_MS: Final = 2**32

_FORMAT: Final = "1:"
_HEADER = struct.Struct("<qq")
_ENTRY_BYTES: Final = 20
# array typecodes by width ("I" is 4 bytes on every platform Python supports, but say so).
_U32: Final = "I" if array("I").itemsize == 4 else "L"
_SWAP: Final = sys.byteorder == "big"


class DedupStateError(RtpipeError, ValueError):
    """A stored dedup state that cannot be decoded."""


def check_horizon(horizon_ms: int, grace_ms: int) -> None:
    """Raise ValueError unless ``horizon_ms`` covers the longest window and the grace and
    fits the encoding (for the settings validator)."""
    if not MIN_HORIZON_MS <= horizon_ms <= MAX_HORIZON_MS:
        raise ValueError(
            f"dedup horizon {horizon_ms} ms must be in [{MIN_HORIZON_MS}, {MAX_HORIZON_MS}]"
        )
    if horizon_ms <= grace_ms:
        raise ValueError(f"dedup horizon {horizon_ms} ms must exceed the grace {grace_ms} ms")


def _i64() -> array[int]:
    return array("q")


@dataclass
class DedupState:
    """One customer's remembered transactions, in event-time order (ties in arrival order):
    parallel arrays of ids, fingerprints and event-time offsets from ``base_ms``; and the
    newest event time remembered, ``max_ms``. See the module docstring.

    The arrays are the C ``array`` type, not numpy: a customer holds tens of entries, and
    at that size numpy's per-call overhead made a decode, check, insert and encode cost
    130 us instead of about 25.
    """

    max_ms: int = 0
    base_ms: int = 0
    tx_id: array[int] = field(default_factory=_i64)
    fingerprint: array[int] = field(default_factory=lambda: array("Q"))
    offset: array[int] = field(default_factory=lambda: array(_U32))
    horizon_ms: int = DEFAULT_HORIZON_MS

    def __post_init__(self) -> None:
        if not 0 < self.horizon_ms <= MAX_HORIZON_MS:
            raise ValueError(f"horizon_ms must be in (0, {MAX_HORIZON_MS}], got {self.horizon_ms}")

    def __len__(self) -> int:
        return len(self.tx_id)

    @property
    def event_ms(self) -> list[int]:
        """The entries' event times, ascending."""
        base = self.base_ms
        return [base + o for o in self.offset]

    @classmethod
    def from_state(cls, raw: Any, horizon_ms: int = DEFAULT_HORIZON_MS) -> DedupState:
        """Decode :meth:`to_state`'s string or :meth:`to_bytes`' bytes (None, ``""`` or
        ``b""``: an empty state).

        Raises:
            DedupStateError: if ``raw`` is neither.
        """
        if not raw:
            return cls(horizon_ms=horizon_ms)
        if isinstance(raw, bytes | bytearray):
            return cls.from_bytes(bytes(raw), horizon_ms)
        if not isinstance(raw, str) or not raw.startswith(_FORMAT):
            raise DedupStateError(f"not a dedup state: {str(raw)[:40]!r}")
        try:
            blob = binascii.a2b_base64(raw[len(_FORMAT) :], strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise DedupStateError(f"bad base64: {exc}") from None
        return cls.from_bytes(blob, horizon_ms)

    @classmethod
    def from_bytes(cls, blob: bytes, horizon_ms: int = DEFAULT_HORIZON_MS) -> DedupState:
        """Decode :meth:`to_bytes`.

        Raises:
            DedupStateError: if ``blob`` is not ``16 + 20 n`` bytes, n > 0.
        """
        n, extra = divmod(len(blob) - _HEADER.size, _ENTRY_BYTES)
        if n < 1 or extra:
            raise DedupStateError(f"{len(blob)} bytes is not {_HEADER.size} + 20 n, n > 0")
        max_ms, base_ms = _HEADER.unpack_from(blob)
        at = _HEADER.size
        ids, fps, offsets = array("q"), array("Q"), array(_U32)
        ids.frombytes(blob[at : at + 8 * n])
        fps.frombytes(blob[at + 8 * n : at + 16 * n])
        offsets.frombytes(blob[at + 16 * n :])
        if _SWAP:
            for a in (ids, fps, offsets):
                a.byteswap()
        return cls(max_ms, base_ms, ids, fps, offsets, horizon_ms)

    def to_state(self) -> str:
        """The encoding for a JSON state value (an ASCII string); ``""`` when empty."""
        if not len(self):
            return ""
        return _FORMAT + binascii.b2a_base64(self.to_bytes(), newline=False).decode("ascii")

    def to_bytes(self) -> bytes:
        """The raw encoding (``16 + 20 n`` bytes), for a state stored as bytes
        (:func:`state_dumps`); ``b""`` when empty."""
        if not len(self):
            return b""
        parts = [self.tx_id, self.fingerprint, self.offset]
        if _SWAP:
            parts = [array(a.typecode, a) for a in parts]
            for a in parts:
                a.byteswap()
        return _HEADER.pack(self.max_ms, self.base_ms) + b"".join(a.tobytes() for a in parts)


# quixstreams' own state serialisation (quixstreams.utils.json), which these extend.
_ORJSON_OPTIONS: Final = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
# A JSON document never starts with a NUL byte.
_BYTES_TAG: Final = b"\x00"


def state_dumps(value: Any) -> bytes:
    """quixstreams state serialiser (``RocksDBOptions(dumps=state_dumps, loads=state_loads)``)
    that also stores ``bytes`` values, raw behind a NUL tag, so that :meth:`DedupState.to_bytes`
    can be kept under its own state key without base64. Everything else is JSON exactly as
    quixstreams writes it, so existing stores and changelogs read back unchanged."""
    if isinstance(value, bytes | bytearray):
        return _BYTES_TAG + bytes(value)
    return orjson.dumps(value, option=_ORJSON_OPTIONS)


def state_loads(raw: bytes) -> Any:
    """The inverse of :func:`state_dumps`."""
    if raw[:1] == _BYTES_TAG:
        return raw[1:]
    return orjson.loads(raw)


def check_duplicate(state: DedupState, tx_id: int, fingerprint: int, event_ms: int) -> DedupVerdict:
    """Whether a transaction was seen before within the horizon (module docstring).

    Returns:
        ``"duplicate"`` (same id and content: no window update, no outcome), ``"conflict"``
        (same id, other content: dead-letter ``conflicting_duplicate``) or ``"new"``.
    """
    # remember() keeps each id once (module docstring), so the first hit is the only one.
    try:
        i = state.tx_id.index(tx_id)
    except ValueError:
        return "new"
    if abs(state.base_ms + state.offset[i] - event_ms) >= state.horizon_ms:
        return "new"
    return "duplicate" if state.fingerprint[i] == fingerprint else "conflict"


def remember(state: DedupState, tx_id: int, fingerprint: int, event_ms: int) -> None:
    """Remember a transaction that :func:`check_duplicate` found new, advance the
    customer's clock and prune what fell out of the horizon (possibly this very entry, if
    it is that old)."""
    state.max_ms = max(state.max_ms, event_ms)
    floor = state.max_ms - state.horizon_ms  # entries at or below are forgotten
    if not len(state):
        state.base_ms = floor + 1
    cut = bisect_right(state.offset, floor - state.base_ms) if floor >= state.base_ms else 0
    if cut:
        del state.tx_id[:cut]
        del state.fingerprint[:cut]
        del state.offset[:cut]
    if event_ms <= floor:
        return
    # Every kept time is above the floor, so the base may move up to floor + 1; moving it
    # only when the newest offset would overflow uint32 makes it rare (every 2**32 - H ms).
    if state.max_ms - state.base_ms >= 2**32:
        shift = floor + 1 - state.base_ms
        state.offset = array(_U32, [o - shift for o in state.offset])
        state.base_ms = floor + 1
    rel = event_ms - state.base_ms
    pos = bisect_right(state.offset, rel)
    state.tx_id.insert(pos, tx_id)
    state.fingerprint.insert(pos, fingerprint)
    state.offset.insert(pos, rel)


def admit(state: DedupState, tx: Transaction) -> DedupVerdict:
    """:func:`check_duplicate`, then :func:`remember` when the transaction is new."""
    fp = fingerprint(tx)
    verdict = check_duplicate(state, tx.transaction_id, fp, tx.event_ms)
    if verdict == "new":
        remember(state, tx.transaction_id, fp, tx.event_ms)
    return verdict
