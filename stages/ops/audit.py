"""``rtpipe audit``: read every outcome topic with read_committed and check the pipeline's
invariant: each transaction that entered ends in exactly one of decisions.action|review|
approved or a dead-letter topic. Also the numbers the demo summary prints, and the check that
the online store holds what the batch feature definitions compute (``check_online_features``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import orjson
import pandas as pd
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from stages.shared.kafka import DLQ_REASON
from stages.shared.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class TopicRecords:
    """What one topic holds: transaction ids (where readable) and a few extras."""

    topic: str
    count: int = 0
    ids: list[int] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    latency_ms: list[int] = field(default_factory=list)
    # Wall-clock time each decision was routed (decision topics only).
    routed_ms: list[int] = field(default_factory=list)
    first_ingest_ms: int | None = None
    last_routed_ms: int | None = None


@dataclass
class AuditReport:
    expected: int
    per_topic: dict[str, TopicRecords]
    lost: list[int]
    duplicated: list[int]
    unexpected: list[int]
    # Ids of rejected copies (dead-lettered as conflicting_duplicate): another record with
    # the id already had its outcome, so these are not a second one.
    conflicts: list[int] = field(default_factory=list)

    @property
    def outcomes(self) -> int:
        return sum(t.count for t in self.per_topic.values())

    def ids_on(self, topics: Iterable[str]) -> set[int]:
        """The transaction ids that ``topics`` hold (those this report read)."""
        return {i for t in topics if t in self.per_topic for i in self.per_topic[t].ids}

    def decision_times_ms(self) -> np.ndarray:
        """Every decision's routing time (wall-clock ms), sorted."""
        times = [t for rec in self.per_topic.values() for t in rec.routed_ms]
        return np.sort(np.asarray(times, dtype=np.int64))

    def longest_gap_s(self, until_ms: int | None = None) -> float:
        """The longest time between two consecutive decisions (seconds): how long a fault
        left the pipeline without deciding anything while events kept arriving.

        ``until_ms`` (wall-clock ms) is when a run that did not drain gave up waiting: the
        time from its last decision to then counts as a gap too (a pipeline that stopped
        deciding for good would otherwise report only the gaps before it stopped)."""
        times = self.decision_times_ms()
        if until_ms is not None and len(times) and until_ms > times[-1]:
            times = np.append(times, until_ms)
        return float(np.diff(times).max()) / 1000.0 if len(times) > 1 else 0.0

    def latency_percentiles(self) -> dict[str, float]:
        lat = np.concatenate(
            [np.asarray(t.latency_ms, dtype=np.float64) for t in self.per_topic.values()]
            or [np.empty(0)]
        )
        if not len(lat):
            return {}
        p = np.percentile(lat, [50, 95, 99])
        return {
            "p50_ms": float(p[0]),
            "p95_ms": float(p[1]),
            "p99_ms": float(p[2]),
            "max_ms": float(lat.max()),
        }

    def span_seconds(self) -> float | None:
        """Seconds from the first ingest to the last routed decision."""
        firsts = [t.first_ingest_ms for t in self.per_topic.values() if t.first_ingest_ms]
        lasts = [t.last_routed_ms for t in self.per_topic.values() if t.last_routed_ms]
        if not firsts or not lasts:
            return None
        return (max(lasts) - min(firsts)) / 1000.0

    def throughput(self) -> float | None:
        """Decisions per second from the first ingest to the last routing."""
        firsts = [t.first_ingest_ms for t in self.per_topic.values() if t.first_ingest_ms]
        lasts = [t.last_routed_ms for t in self.per_topic.values() if t.last_routed_ms]
        if not firsts or not lasts:
            return None
        span = (max(lasts) - min(firsts)) / 1000.0
        decided = sum(len(t.latency_ms) for t in self.per_topic.values())
        return decided / span if span > 0 else None


def read_topic(
    settings: Settings, topic: str, idle_s: float = 2.0, timeout_s: float = 120.0
) -> list[tuple[bytes | None, bytes | None, dict[str, bytes]]]:
    """Every committed record of a topic (key, value, headers), from the beginning."""
    return [(k, v, h) for _p, k, v, h in read_partitions(settings, topic, idle_s, timeout_s)]


def read_partitions(
    settings: Settings,
    topic: str,
    idle_s: float = 2.0,
    timeout_s: float = 120.0,
    committed: bool = True,
) -> list[tuple[int, bytes | None, bytes | None, dict[str, bytes]]]:
    """Every record of a topic (partition, key, value, headers), from the beginning: the
    committed ones, or with ``committed`` False also those of open and aborted transactions
    (``read_uncommitted``)."""
    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": f"rtpipe-audit-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed" if committed else "read_uncommitted",
            "enable.partition.eof": True,
        }
    )
    try:
        md = consumer.list_topics(topic, timeout=10)
        tmeta = md.topics.get(topic)
        if tmeta is None or tmeta.error is not None:
            return []
        parts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in tmeta.partitions]
        consumer.assign(parts)
        pending = {p.partition for p in parts}
        out = []
        deadline = time.monotonic() + timeout_s
        last_msg = time.monotonic()
        while pending and time.monotonic() < deadline:
            for msg in consumer.consume(10_000, 0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(msg.partition())
                    continue
                last_msg = time.monotonic()
                out.append((msg.partition(), msg.key(), msg.value(), dict(msg.headers() or [])))
            if time.monotonic() - last_msg > idle_s and not pending:
                break
        if pending:
            logger.warning("audit: %s partitions %s not read to the end", topic, sorted(pending))
        return out
    finally:
        consumer.close()


# DLQ reasons that reject a *copy* of a transaction whose own outcome is elsewhere.
REJECTED_COPY_REASONS = frozenset({"conflicting_duplicate"})


def _tx_id_of(value: bytes | None) -> int | None:
    if not value:
        return None
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    tid = obj.get("transaction_id") if isinstance(obj, dict) else None
    return tid if isinstance(tid, int) and not isinstance(tid, bool) else None


def input_transaction_ids(
    settings: Settings, expected_ids: Iterable[int], topic: str = "transactions"
) -> set[int]:
    """The ``expected_ids`` that the ``topic`` (``transactions`` or ``labels``) holds: what
    the pipeline was given. A record its producer saw acknowledged can still be missing from
    a broker that restarted (one broker, replication factor 1: measured in the Kafka-restart
    chaos run, 3 of 2,923 transactions, and in another 3 of 26,805 labels, with no gap in the
    partition's offsets), and no stage can decide on a record it never received or count a
    label it never read; the audit of the pipeline counts from what this returns."""
    wanted = set(expected_ids)
    found = set()
    for _key, value, _headers in read_topic(settings, settings.topics.name(topic)):
        tid = _tx_id_of(value)
        if tid is not None and tid in wanted:
            found.add(tid)
    return found


# The topics an event crosses before its outcome, in order (``Topics`` field names).
PIPELINE_TOPICS: tuple[str, ...] = ("transactions", "enriched", "predictions")


def where_stopped(settings: Settings, ids: Iterable[int]) -> list[str]:
    """Where transactions without an outcome stopped: for each topic an event crosses
    (:data:`PIPELINE_TOPICS`), how many of ``ids`` it holds committed and how many only
    outside a committed transaction (open or aborted), per partition. One line per topic,
    e.g. ``"rtpipe.predictions: 453 of 453 committed (p0 453), 0 more uncommitted"``: the
    first topic holding fewer than all of them names the stage that did not pass them on.
    """
    wanted = set(ids)
    lines = []
    for field_name in PIPELINE_TOPICS:
        topic = settings.topics.name(field_name)
        counts: dict[bool, Counter[int]] = {}
        for committed in (True, False):
            seen: set[int] = set()
            per: Counter[int] = Counter()
            records = read_partitions(settings, topic, timeout_s=30.0, committed=committed)
            for partition, _k, value, _h in records:
                tid = _tx_id_of(value)
                if tid in wanted and tid not in seen:
                    seen.add(tid)
                    per[partition] += 1
            counts[committed] = per
        done = sum(counts[True].values())
        extra = sum(counts[False].values()) - done
        parts = " ".join(f"p{p} {n}" for p, n in sorted(counts[True].items())) or "none"
        lines.append(
            f"{topic}: {done} of {len(wanted)} committed ({parts}), {extra} more uncommitted"
        )
    return lines


def pipeline_input(
    tx: pd.DataFrame, start: pd.Timestamp, lost_ids: Iterable[int], lost_label_ids: Iterable[int]
) -> tuple[pd.DataFrame, list[int]]:
    """The transactions the batch definitions are computed over for a replay from ``start``
    whose input topics lost ``lost_ids`` (transactions) and ``lost_label_ids`` (labels).

    A lost transaction is left out. A lost label of a transaction before ``start`` (warm-up
    history: such a transaction counts only in its terminal's label windows) is left out as
    well, which is what the pipeline saw: that transaction unlabelled. A lost label of a
    replayed transaction cannot be expressed that way (the transaction still counts in its
    customer's windows); those ids are returned, for the caller to report.
    """
    lost = set(lost_ids)
    label_lost = tx["transaction_id"].isin(set(lost_label_ids))
    replayed = tx["tx_datetime"] >= start
    inexpressible = tx.loc[label_lost & replayed, "transaction_id"].astype(int).tolist()
    keep = ~tx["transaction_id"].isin(lost) & ~(label_lost & ~replayed)
    return tx[keep], sorted(inexpressible)


def audit(settings: Settings, expected_ids: Iterable[int]) -> AuditReport:
    """Count each expected transaction id across the outcome and dead-letter topics."""
    t = settings.topics
    decision_topics = list(t.decision_topics())
    dlq_topics = [t.dlq(t.name(k)) for k in ("transactions", "enriched", "predictions")]
    per_topic: dict[str, TopicRecords] = {}
    seen: Counter[int] = Counter()
    conflicts: list[int] = []
    for topic in decision_topics + dlq_topics:
        rec = TopicRecords(topic)
        for _key, value, headers in read_topic(settings, topic):
            rec.count += 1
            tid = _tx_id_of(value)
            if topic in decision_topics and value:
                obj = orjson.loads(value)
                rec.reasons[str(obj.get("reason"))] += 1
                ts = obj.get("ts") or {}
                ingest, routed = ts.get("ingest_ms"), ts.get("routed_ms")
                if isinstance(routed, int) and routed > 0:
                    rec.routed_ms.append(routed)
                if isinstance(ingest, int) and isinstance(routed, int) and ingest > 0:
                    rec.latency_ms.append(routed - ingest)
                    rec.first_ingest_ms = min(rec.first_ingest_ms or ingest, ingest)
                    rec.last_routed_ms = max(rec.last_routed_ms or routed, routed)
            else:
                reason = headers.get(DLQ_REASON, b"?").decode(errors="replace")
                rec.reasons[reason] += 1
                if reason in REJECTED_COPY_REASONS:
                    if tid is not None:
                        conflicts.append(tid)
                    continue
            if tid is not None:
                rec.ids.append(tid)
                seen[tid] += 1
        per_topic[topic] = rec
    expected = set(expected_ids)
    lost = sorted(expected - set(seen))
    duplicated = sorted(i for i, c in seen.items() if c > 1 and i in expected)
    unexpected = sorted(set(seen) - expected)
    return AuditReport(len(expected), per_topic, lost, duplicated, unexpected, sorted(conflicts))


@dataclass
class FeatureCheck:
    """Online rows compared with the batch definition (training.features), per view.

    Attributes:
        entities: per view, how many entities of the replay were checked.
        missing: per view, entities with no online row.
        mismatched: per view, entities whose online row differs (values or event time)
            from the batch features of their last replayed transaction.
        max_abs_diff: per view, the largest absolute difference of a feature value.
    """

    entities: dict[str, int]
    missing: dict[str, list[int]]
    mismatched: dict[str, list[int]]
    max_abs_diff: dict[str, float]

    @property
    def ok(self) -> bool:
        return not any(self.missing.values()) and not any(self.mismatched.values())


def check_online_features(
    settings: Settings,
    tx: pd.DataFrame,
    start: pd.Timestamp,
    end: pd.Timestamp,
    atol: float = 1e-9,
    feature_service: str | None = None,
) -> FeatureCheck:
    """Check that the online store holds, for every customer and terminal of a replay of
    ``tx`` over ``[start, end)``, the batch features of its last replayed transaction, in
    every view of ``feature_service`` (default ``settings.prediction.feature_service``).

    Customer windows in the stream start empty at the replay start, so the batch customer
    features are computed over the transactions from ``start`` on; terminal windows are
    complete (the replay sends the labels of the preceding weeks), so terminal features are
    computed over all of ``tx``. Among several last transactions at the same millisecond the
    first one (lowest id) is the reference: the online writer keeps the first row written
    for an event time and never lets an equal or older one replace it.

    Args:
        settings: where the online store is and which Feast project to read.
        tx: the simulated transactions the replay was built from.
        start: the replay start (inclusive).
        end: the replay end (exclusive).
        atol: tolerance on feature values.
        feature_service: the service whose views are checked.

    Raises:
        redis.RedisError: Redis is unreachable.
    """

    from stages.shared.feast_store import open_feature_store
    from stages.shared.labels import LabelIndex
    from stages.shared.online.reader import OnlineFeatureReader
    from stages.shared.schemas import (
        MODEL_FEATURES_V2,
        TERMINAL_FEATURES,
        TERMINAL_VIEW,
    )
    from training.features import compute_features, event_ms

    replayed = tx[tx["tx_datetime"] >= start]
    customer_batch = compute_features(replayed, MODEL_FEATURES_V2)
    terminal_batch = compute_features(tx)
    in_window = (tx["tx_datetime"] >= start) & (tx["tx_datetime"] < end)
    window = tx.loc[in_window, ["transaction_id", "customer_id", "terminal_id", "tx_datetime"]]
    window = window.assign(ms=event_ms(window["tx_datetime"]))

    def last_rows(key: str) -> pd.DataFrame:
        # Newest event time per entity, lowest transaction id among ties.
        ordered = window.sort_values([key, "ms", "transaction_id"], ascending=[True, False, True])
        return ordered.drop_duplicates(key, keep="first").set_index(key)

    client = settings.redis.client(socket_timeout=10.0)
    reader = OnlineFeatureReader(
        client,
        open_feature_store(settings),
        feature_service or settings.prediction.feature_service,
        exclude_views=(TERMINAL_VIEW,),
    )
    check = FeatureCheck({}, {}, {}, {})
    # The service's customer views (as it projects them), then the terminal windows.
    specs = (
        *(
            (view, "customer_id", features, customer_batch)
            for view, features in reader.layout.services[reader.feature_service_name]
            if view != TERMINAL_VIEW
        ),
        (TERMINAL_VIEW, "terminal_id", TERMINAL_FEATURES, terminal_batch),
    )
    lasts = {key: last_rows(key) for _, key, _, _ in specs}
    if max(len(v) for v in lasts.values()) == 0:
        return check
    # Customer rows from the online store; terminal windows from the label index, counted
    # at each terminal's last replayed event time (what the prediction stage computes).
    customers = lasts["customer_id"]
    online = reader.read(
        {
            "customer_id": customers.index.to_numpy(np.int64),
            "terminal_id": np.zeros(len(customers), dtype=np.int64),
        }
    )
    terminals = lasts["terminal_id"]
    index = LabelIndex.from_settings(settings, client)
    term_values, _ = index.terminal_features(
        terminals.index.to_numpy(np.int64), terminals["ms"].to_numpy(np.int64)
    )
    served = {
        **{
            view: (
                online.values,
                online.feature_names,
                online.found[view],
                online.event_ts_ms[view],
            )
            for view, _, _, _ in specs
            if view != TERMINAL_VIEW
        },
        TERMINAL_VIEW: (
            term_values,
            TERMINAL_FEATURES,
            np.ones(len(terminals), dtype=bool),
            terminals["ms"].to_numpy(np.int64),
        ),
    }
    for view, key, names, batch in specs:
        last = lasts[key]
        m = len(last)
        values, value_names, found, ts = served[view]
        column = {name: j for j, name in enumerate(value_names)}
        got = values[:m, [column[f] for f in names]]
        want = (
            batch.set_index("transaction_id")
            .loc[last["transaction_id"], list(names)]
            .to_numpy(np.float64)
        )
        diff = np.abs(got - want)
        bad_value = ~np.isclose(got, want, rtol=0, atol=atol).all(axis=1)
        bad_ts = ts != last["ms"].to_numpy()
        entity = last.index.to_numpy()
        check.entities[view] = m
        check.missing[view] = entity[~found].tolist()
        check.mismatched[view] = entity[found & (bad_value | bad_ts)].tolist()
        check.max_abs_diff[view] = float(np.nanmax(diff[found])) if found.any() else 0.0
    return check
