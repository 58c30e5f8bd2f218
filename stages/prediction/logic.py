"""Pure, vectorised logic of the prediction stage: decode a micro-batch, assemble the model
matrix from request features and the batched online read, and build prediction records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from stages.shared.schemas import (
    DAY_MS,
    MAX_AMOUNT,
    MAX_ID,
    REQUEST_FEATURES,
    InvalidMessage,
    amount_field,
    int_field,
)


@dataclass(frozen=True, slots=True)
class EnrichedBatch:
    """Columns of the valid enriched events of one micro-batch."""

    index: np.ndarray  # positions of these rows in the consumed batch
    transaction_id: np.ndarray
    customer_id: np.ndarray
    terminal_id: np.ndarray
    amount: np.ndarray
    event_ms: np.ndarray
    enriched_ms: np.ndarray
    ingest_ms: np.ndarray  # wall-clock time the event entered Kafka (latency origin)
    # The aggregates the enrichment stage pushed for this very event, per feature view.
    carried: list[dict[str, dict[str, float]]]

    def __len__(self) -> int:
        return len(self.transaction_id)

    def take(self, keep: np.ndarray) -> EnrichedBatch:
        """The rows where ``keep`` (a boolean mask) is True."""
        rows = np.flatnonzero(keep).tolist()
        return EnrichedBatch(
            index=self.index[keep],
            transaction_id=self.transaction_id[keep],
            customer_id=self.customer_id[keep],
            terminal_id=self.terminal_id[keep],
            amount=self.amount[keep],
            event_ms=self.event_ms[keep],
            enriched_ms=self.enriched_ms[keep],
            ingest_ms=self.ingest_ms[keep],
            carried=[self.carried[i] for i in rows],
        )


_REQUIRED = ("transaction_id", "customer_id", "terminal_id", "amount", "event_ms")


def _stage_ms(value: object) -> int:
    """A per-stage wall-clock stamp (latency metadata only): 0 when absent or unusable."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < MAX_ID:
        return 0
    return value


def _fast_row(
    i: int, obj: dict[str, object]
) -> tuple[int, int, int, int, float, int, int, int] | None:
    """The common case, checked with exact type tests only; ``None`` sends the message to
    the slow path, which names what is wrong (or accepts an unusual but valid message)."""
    try:
        tid, cid, term = obj["transaction_id"], obj["customer_id"], obj["terminal_id"]
        amount, event_ms = obj["amount"], obj["event_ms"]
    except KeyError:
        return None
    if not (
        type(tid) is int
        and type(cid) is int
        and type(term) is int
        and type(event_ms) is int
        and type(amount) is float
    ):
        return None
    if not (
        0 <= tid < MAX_ID
        and 0 <= cid < MAX_ID
        and 0 <= term < MAX_ID
        and 0 < event_ms < MAX_ID
        and 0.0 <= amount <= MAX_AMOUNT
    ):
        return None
    ts = obj.get("ts")
    enriched = ingest = 0
    if type(ts) is dict:
        enriched = _stage_ms(ts.get("enriched_ms"))
        ingest = _stage_ms(ts.get("ingest_ms"))
    return (i, tid, cid, term, amount, event_ms, enriched, ingest)


def _fast_carried(feats: object) -> dict[str, dict[str, float]] | None:
    """Carried aggregates when every value is a float (as the enrichment stage writes
    them); ``None`` for anything else, which the slow path checks value by value."""
    if type(feats) is not dict:
        return None
    for values in feats.values():
        if type(values) is not dict:
            return None
        for v in values.values():
            if type(v) is not float or v - v != 0.0:  # not a float, or inf/nan
                return None
    return feats


def _carried(feats: object) -> dict[str, dict[str, float]]:
    """The aggregates the enrichment stage attached: per view, finite numbers only."""
    if feats is None:
        return {}
    if not isinstance(feats, dict):
        raise InvalidMessage("wrong_type", "features must be an object")
    out: dict[str, dict[str, float]] = {}
    for view, values in feats.items():
        if not isinstance(values, dict):
            raise InvalidMessage("wrong_type", f"features.{view} must be an object")
        row: dict[str, float] = {}
        for name, v in values.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise InvalidMessage("wrong_type", f"features.{view}.{name} must be a number")
            row[name] = float(v)
        out[view] = row
    return out


def decode_enriched(
    values: Sequence[bytes | None],
) -> tuple[EnrichedBatch, list[tuple[int, InvalidMessage]]]:
    """Decode enriched events; invalid ones are returned with their position and reason."""
    rows: list[tuple[int, int, int, int, float, int, int, int]] = []
    carried: list[dict[str, dict[str, float]]] = []
    bad: list[tuple[int, InvalidMessage]] = []
    for i, raw in enumerate(values):
        try:
            if raw is None:
                raise InvalidMessage("empty", "message has no value")
            obj = orjson.loads(raw)
            if not isinstance(obj, dict):
                raise InvalidMessage("not_object", type(obj).__name__)
            fast = _fast_row(i, obj)
            if fast is not None:
                fast_feats = _fast_carried(obj.get("features"))
                if fast_feats is not None:
                    rows.append(fast)
                    carried.append(fast_feats)
                    continue
            missing = [k for k in _REQUIRED if k not in obj]
            if missing:
                raise InvalidMessage("missing_field", ",".join(missing))
            ts = obj.get("ts") or {}
            if not isinstance(ts, dict):
                ts = {}
            # The same contract as the transactions topic: ids and times are integers in
            # range and the amount a finite number; anything else (a float id, a string, an
            # int beyond int64) would be coerced, overflow the batch arrays or mis-score.
            event_ms = int_field(obj, "event_ms")
            if event_ms <= 0:
                raise InvalidMessage("out_of_range", f"event_ms={event_ms}")
            row = (
                i,
                int_field(obj, "transaction_id"),
                int_field(obj, "customer_id"),
                int_field(obj, "terminal_id"),
                amount_field(obj),
                event_ms,
                _stage_ms(ts.get("enriched_ms")),
                _stage_ms(ts.get("ingest_ms")),
            )
            feats = _carried(obj.get("features"))
        except orjson.JSONDecodeError as exc:
            bad.append((i, InvalidMessage("not_json", str(exc))))
            continue
        except InvalidMessage as exc:
            bad.append((i, exc))
            continue
        rows.append(row)
        carried.append(feats)
    if rows:
        cols = list(zip(*rows, strict=True))
        batch = EnrichedBatch(
            index=np.asarray(cols[0], dtype=np.int64),
            transaction_id=np.asarray(cols[1], dtype=np.int64),
            customer_id=np.asarray(cols[2], dtype=np.int64),
            terminal_id=np.asarray(cols[3], dtype=np.int64),
            amount=np.asarray(cols[4], dtype=np.float64),
            event_ms=np.asarray(cols[5], dtype=np.int64),
            enriched_ms=np.asarray(cols[6], dtype=np.int64),
            ingest_ms=np.asarray(cols[7], dtype=np.int64),
            carried=carried,
        )
    else:
        empty_i = np.empty(0, dtype=np.int64)
        batch = EnrichedBatch(
            empty_i, empty_i, empty_i, empty_i, np.empty(0), empty_i, empty_i, empty_i, []
        )
    return batch, bad


def point_in_time(
    values: np.ndarray,
    event_ts_ms: dict[str, np.ndarray],
    found: dict[str, np.ndarray],
    feature_names: Sequence[str],
    batch: EnrichedBatch,
) -> dict[str, int]:
    """Make the online rows point-in-time correct for each event, in place.

    The online store keeps only each entity's newest row. When the pipeline runs behind
    (a replay, a backlog), the enrichment stage may already have pushed a row for a *later*
    event of the same entity; serving it would leak the future into this prediction. For
    those rows, the aggregates pushed for this very event (carried on the message) are used
    instead, with this event's timestamp. A row stamped with the event's own time may be
    another transaction's: two events of one entity in the same millisecond, of which the
    store keeps the first written (Feast skips equal timestamps). Where such a row differs
    from the event's own aggregates, those are used too.

    Returns:
        Per view, how many rows were taken from the event instead of the online store.
    """
    column = {name: j for j, name in enumerate(feature_names)}
    replaced: dict[str, int] = {}
    for view, ts in event_ts_ms.items():
        candidates = np.flatnonzero(found[view] & (ts >= batch.event_ms)).tolist()
        rows = [i for i in candidates if batch.carried[i].get(view)]
        replaced[view] = 0
        if not rows:
            continue
        names = [n for n in batch.carried[rows[0]][view] if n in column]
        try:
            block = np.array(
                [[batch.carried[i][view][n] for n in names] for i in rows], dtype=np.float64
            )
        except KeyError:
            # Snapshots with differing feature sets: row by row.
            replaced[view] = sum(_take_carried(values, ts, column, batch, view, i) for i in rows)
            continue
        idx = np.asarray(rows)
        cols = np.asarray([column[n] for n in names])
        current = values[np.ix_(idx, cols)]
        same = (current == block) | (np.isnan(current) & np.isnan(block))
        take = (ts[idx] > batch.event_ms[idx]) | ~same.all(axis=1)
        sel = idx[take]
        values[np.ix_(sel, cols)] = block[take]
        ts[sel] = batch.event_ms[sel]
        replaced[view] = int(take.sum())
    return replaced


def _take_carried(
    values: np.ndarray,
    ts: np.ndarray,
    column: dict[str, int],
    batch: EnrichedBatch,
    view: str,
    i: int,
) -> bool:
    """One row of :func:`point_in_time`: use the carried aggregates if the online row is
    newer than the event or differs from them. Returns whether it did."""
    carried = {column[n]: float(v) for n, v in batch.carried[i][view].items() if n in column}
    differs = any(
        not (values[i, j] == v or (np.isnan(values[i, j]) and np.isnan(v)))
        for j, v in carried.items()
    )
    if not (ts[i] > batch.event_ms[i] or differs):
        return False
    for j, v in carried.items():
        values[i, j] = v
    ts[i] = batch.event_ms[i]
    return True


def stable_fraction(ids: np.ndarray) -> np.ndarray:
    """A uniform value in [0, 1) per id that never changes across runs, processes or
    replicas (splitmix64 finaliser), so a canary slice is the same transactions everywhere."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def request_features(amount: np.ndarray, event_ms: np.ndarray) -> np.ndarray:
    """The request features (amount, is_weekend, is_night) as an (n, 3) float matrix."""
    weekday = (event_ms // DAY_MS + 3) % 7  # 1970-01-01 was a Thursday
    hour = (event_ms % DAY_MS) // 3_600_000
    out = np.empty((len(amount), len(REQUEST_FEATURES)), dtype=np.float64)
    out[:, 0] = amount
    out[:, 1] = weekday >= 5
    out[:, 2] = hour <= 6
    return out


def assemble_matrix(
    model_features: Sequence[str],
    request: np.ndarray,
    online_values: np.ndarray,
    online_names: Sequence[str],
) -> np.ndarray:
    """Put request and online columns in the model's feature order (a column gather)."""
    columns = {name: ("r", i) for i, name in enumerate(REQUEST_FEATURES)}
    columns.update({name: ("o", i) for i, name in enumerate(online_names)})
    unknown = [f for f in model_features if f not in columns]
    if unknown:
        raise KeyError(f"model features not served by the feature service: {unknown}")
    out = np.empty((request.shape[0], len(model_features)), dtype=np.float64)
    for j, name in enumerate(model_features):
        src, i = columns[name]
        out[:, j] = request[:, i] if src == "r" else online_values[:, i]
    return out


def _event_columns(batch: EnrichedBatch) -> list[list[Any]]:
    """The event's own fields as plain Python columns (numpy scalar indexing per field is the
    slow part): transaction, customer, terminal, amount, event time, ingest and enriched
    times."""
    return [
        batch.transaction_id.tolist(),
        batch.customer_id.tolist(),
        batch.terminal_id.tolist(),
        batch.amount.tolist(),
        batch.event_ms.tolist(),
        batch.ingest_ms.tolist(),
        batch.enriched_ms.tolist(),
    ]


def _record(cols: list[list[Any]], i: int, predicted_ms: int, **fields: Any) -> dict[str, Any]:
    """One prediction record: the event's fields, then ``fields``, then the stage times."""
    tid, cid, term, amount, event_ms, ingest, enriched = (c[i] for c in cols)
    return {
        "transaction_id": tid,
        "customer_id": cid,
        "terminal_id": term,
        "amount": amount,
        "event_ms": event_ms,
        **fields,
        "ts": {"ingest_ms": ingest, "enriched_ms": enriched, "predicted_ms": predicted_ms},
    }


def unscored_records(
    batch: EnrichedBatch,
    error: str,
    detail: str,
    model: str,
    model_version: str,
    predicted_ms: int,
) -> list[bytes]:
    """Records without a score (``error`` says why: routing sends them to review), in the
    same shape as :func:`prediction_records`'."""
    cols = _event_columns(batch)
    return [
        orjson.dumps(
            _record(
                cols,
                i,
                predicted_ms,
                score=None,
                error=error,
                error_detail=detail[:200],
                model=model,
                model_version=model_version,
            )
        )
        for i in range(len(batch))
    ]


@dataclass(frozen=True, slots=True)
class ScoredBatch:
    """What the model made of an :class:`EnrichedBatch`: one score per row, the matrix it
    scored, the online features' event times and presence per view, and who scored it
    (model, version, feature service; ``versions`` per row where a canary scored some,
    ``shadow`` the shadow model's version and scores)."""

    scores: np.ndarray
    matrix: np.ndarray
    feature_names: Sequence[str]
    feature_ts_ms: dict[str, np.ndarray]
    found: dict[str, np.ndarray]
    model: str
    model_version: str
    feature_service: str
    shadow: tuple[str, np.ndarray] | None = None
    versions: Sequence[str] | None = None


def prediction_records(batch: EnrichedBatch, scored: ScoredBatch, predicted_ms: int) -> list[bytes]:
    """Serialise one prediction record per row (DESIGN.md: model and version, score, the
    feature values used, feature age and per-stage timestamps)."""
    names = list(scored.feature_names)
    feature_ts_ms, found, shadow = scored.feature_ts_ms, scored.found, scored.shadow
    model, model_version, feature_service = (
        scored.model,
        scored.model_version,
        scored.feature_service,
    )
    views = list(feature_ts_ms)
    n = len(batch)
    # Plain Python columns once (numpy scalar indexing per field is the slow part).
    tid, cid, term = (
        batch.transaction_id.tolist(),
        batch.customer_id.tolist(),
        batch.terminal_id.tolist(),
    )
    amount, event_ms = batch.amount.tolist(), batch.event_ms.tolist()
    ingest, enriched = batch.ingest_ms.tolist(), batch.enriched_ms.tolist()
    score = scored.scores.tolist()
    ver = list(scored.versions) if scored.versions is not None else [model_version] * n
    found_l = {v: found[v].tolist() for v in views}
    ts_l = {v: feature_ts_ms[v].astype(np.int64).tolist() for v in views}
    age_l = {v: ((batch.event_ms - feature_ts_ms[v]) / 1000.0).tolist() for v in views}
    shadow_l = shadow[1].tolist() if shadow is not None else None
    has_nan = bool(np.isnan(scored.matrix).any())
    matrix_list = scored.matrix.tolist()
    out: list[bytes] = []
    for i in range(n):
        row = matrix_list[i]
        feats = (
            {k: (None if v != v else v) for k, v in zip(names, row, strict=True)}
            if has_nan
            else dict(zip(names, row, strict=True))
        )
        rec = {
            "transaction_id": tid[i],
            "customer_id": cid[i],
            "terminal_id": term[i],
            "amount": amount[i],
            "event_ms": event_ms[i],
            "score": score[i],
            "model": model,
            "model_version": ver[i],
            "feature_service": feature_service,
            "features": feats,
            "feature_ts_ms": {v: ts_l[v][i] for v in views},
            "feature_age_s": {v: (age_l[v][i] if found_l[v][i] else None) for v in views},
            "missing_views": [v for v in views if not found_l[v][i]],
            "ts": {
                "ingest_ms": ingest[i],
                "enriched_ms": enriched[i],
                "predicted_ms": predicted_ms,
            },
        }
        if shadow_l is not None:
            rec["shadow"] = {"model_version": shadow[0], "score": shadow_l[i]}  # type: ignore[index]
        out.append(orjson.dumps(rec))
    return out
