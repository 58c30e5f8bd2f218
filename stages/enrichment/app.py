"""Enrichment stage wiring (quixstreams): per-customer and per-terminal windows in state
stores with changelog topics, aggregates pushed to Feast's online store, then the event is
forwarded to ``transactions.enriched``.

Topology::

    transactions (key customer) ─ parse ─┬─ bad ─────────────────────────► transactions.dlq
                                         └─ customer window ─┬─ late ────► transactions.dlq
                                                             ├─ row ─────► Feast online (customer)
                                                             └─ group_by terminal ─┐
    labels (key terminal) ─ parse ─┬─ bad ─────────────────────────► labels.dlq     │
                                   └──────────────── concat (time-aligned) ◄────────┘
                                   └─ terminal window ─┬─ row ───────────► Feast online (terminal)
                                                       └─ forward ───────► transactions.enriched

With exactly-once processing, sinks are flushed before the Kafka transaction that makes the
forwarded event visible commits, so a read_committed reader of ``transactions.enriched``
always finds the aggregates that include its event (read-your-writes).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import numpy as np
import orjson
import redis
from quixstreams import Application, State
from quixstreams.context import message_context
from quixstreams.kafka.configuration import ConnectionConfig
from quixstreams.models.serializers import JSONDeserializer, JSONSerializer
from quixstreams.sinks.base import BatchingSink, SinkBackpressureError, SinkBatch
from redis.backoff import NoBackoff
from redis.retry import Retry

from stages.enrichment.logic import (
    CustomerState,
    TerminalState,
    add_label,
    parse_label,
    terminal_features,
    update_customer,
)
from stages.shared.feast_store import open_feature_store
from stages.shared.kafka import DLQ_DETAIL, DLQ_REASON, DLQ_SOURCE, ensure_topics
from stages.shared.metrics import Metrics, build_metrics
from stages.shared.online import OnlineFeatureWriter, OnlineLayout, OnlineWriteError
from stages.shared.schemas import (
    CUSTOMER_FEATURES,
    CUSTOMER_VIEW,
    TERMINAL_FEATURES,
    TERMINAL_VIEW,
    InvalidMessage,
    parse_transaction,
)
from stages.shared.settings import Settings

logger = logging.getLogger(__name__)

STAGE = "enrichment"
INGEST_HEADER = "rtpipe.ingest_ms"
# How long partitions stay paused when Redis is unreachable before the batch is retried.
SINK_RETRY_AFTER_S = 1.0
# quixstreams keeps a Kafka transaction open from a checkpoint's first output to its commit,
# which includes the sink flush to Redis. If the broker times the transaction out first, the
# producer is fenced (fatal). Longer than the batch loop's, shorter than librdkafka's 60 s
# (the stall a killed instance leaves its readers): the flush is bounded by the socket
# timeouts below, with no client-side retries (backpressure retries instead).
TRANSACTION_TIMEOUT_MS = 30_000


def _key_loads(raw: bytes | bytearray) -> Any:
    """Label keys are JSON terminal ids; a key that is not JSON is kept as its bytes so the
    label reaches the DLQ (key_mismatch) instead of failing deserialization, which
    quixstreams treats as fatal."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return bytes(raw)


def _key_dumps(key: Any) -> bytes:
    return key if isinstance(key, bytes) else orjson.dumps(key)


class FeastOnlineSink(BatchingSink):
    """Writes one feature view's rows to Feast's Redis layout at each checkpoint, in one
    pipelined, idempotent round trip (an older row never overwrites a newer one)."""

    def __init__(
        self, writer: OnlineFeatureWriter, view: str, entity: str, features: tuple[str, ...]
    ) -> None:
        super().__init__()
        self._writer = writer
        self._view = view
        self._entity = entity
        self._features = features

    def write(self, batch: SinkBatch) -> None:
        rows = [item.value for item in batch]
        if not rows:
            return
        ids = np.fromiter((r[self._entity] for r in rows), dtype=np.int64, count=len(rows))
        ts = np.fromiter((r["event_ms"] for r in rows), dtype=np.int64, count=len(rows))
        values = {
            f: np.fromiter((r["features"][f] for r in rows), dtype=np.float64, count=len(rows))
            for f in self._features
        }
        try:
            self._writer.write(self._view, ids, values, ts)
        except OnlineWriteError as exc:
            if isinstance(exc.__cause__, redis.ConnectionError | redis.TimeoutError):
                # quixstreams drops this checkpoint (its Kafka transaction is aborted),
                # pauses the partitions and re-reads from the last committed offsets:
                # nothing is lost, and the re-pushed rows are idempotent.
                logger.warning("%s: Redis unavailable (%s); backpressure", self._view, exc)
                raise SinkBackpressureError(retry_after=SINK_RETRY_AFTER_S) from exc
            raise


def _dlq_headers(reason: str, detail: str) -> Any:
    ctx = message_context()
    where = f"{ctx.topic}[{ctx.partition}]@{ctx.offset}"

    def set_headers(value: Any, key: Any, timestamp: int, headers: Any) -> Any:
        return [
            (DLQ_REASON, reason.encode()),
            (DLQ_DETAIL, detail[:1000].encode("utf-8", "replace")),
            (DLQ_SOURCE, where.encode()),
        ]

    return set_headers


def build_app(settings: Settings, metrics: Metrics | None = None) -> Application:
    """Build the quixstreams application (topology above); ``app.run()`` starts it."""
    metrics = metrics or build_metrics()
    cfg = settings.enrichment
    topics = settings.topics
    kafka = settings.kafka
    max_bytes = settings.max_message_bytes
    grace = cfg.grace_ms
    skew = cfg.terminal_skew_ms
    late_terminal = metrics.inexact_windows.labels(TERMINAL_VIEW)

    conn = ConnectionConfig.from_librdkafka_dict(kafka.client_config())
    app = Application(
        broker_address=conn,
        consumer_group=topics.group(cfg.consumer_group),
        auto_offset_reset="earliest",
        commit_interval=cfg.commit_interval_s,
        processing_guarantee=cfg.processing_guarantee,
        state_dir=str(cfg.state_dir or settings.home / "state" / topics.group(cfg.consumer_group)),
        producer_extra_config={
            "linger.ms": 2,
            "compression.type": "lz4",
            "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
        },
        consumer_extra_config={"fetch.wait.max.ms": 10},
        loglevel=None,
    )

    tx_topic = app.topic(
        topics.name("transactions"), value_deserializer="bytes", key_deserializer="bytes"
    )
    # Bytes in, so a label that is not JSON reaches the DLQ with its original bytes.
    labels_topic = app.topic(
        topics.name("labels"),
        value_deserializer="bytes",
        key_deserializer=JSONDeserializer(loads=_key_loads),
    )
    tx_dlq = app.topic(
        topics.dlq(topics.name("transactions")), value_serializer="bytes", key_serializer="bytes"
    )
    labels_dlq = app.topic(
        topics.dlq(topics.name("labels")),
        value_serializer="bytes",
        key_serializer=JSONSerializer(dumps=_key_dumps),
    )
    enriched = app.topic(topics.name("enriched"), value_serializer="json", key_serializer="string")
    history_topic = app.topic(
        topics.name("history"), value_deserializer="bytes", key_deserializer="bytes"
    )
    history_dlq = app.topic(
        topics.dlq(topics.name("history")), value_serializer="bytes", key_serializer="bytes"
    )

    store = open_feature_store(settings)
    client = settings.redis.client(
        socket_timeout=5.0,
        socket_connect_timeout=2.0,
        # redis-py's default retries turn one refused connection into ~12 s inside the
        # open Kafka transaction; a failed flush backpressures and is retried instead.
        retry=Retry(NoBackoff(), 0),
    )
    writer = OnlineFeatureWriter(client, OnlineLayout.from_store(store))

    # -- transactions: parse, customer window ------------------------------------------------
    def parse(value: bytes, key: Any, timestamp: int, headers: Any) -> dict[str, Any]:
        metrics.messages_in.labels(STAGE).inc()
        ingest_ms = timestamp
        for name, hv in headers or ():
            if name == INGEST_HEADER:
                with contextlib.suppress(ValueError):
                    ingest_ms = int(hv)
        try:
            tx = parse_transaction(
                value,
                timestamp,
                max_bytes,
                now_ms=int(time.time() * 1000),
                max_skew_ms=cfg.max_clock_skew_ms,
            )
        except InvalidMessage as err:
            return {"error": err.reason, "detail": err.detail, "raw": value}
        return {
            "transaction_id": tx.transaction_id,
            "customer_id": tx.customer_id,
            "terminal_id": tx.terminal_id,
            "amount": tx.amount,
            "event_ms": tx.event_ms,
            "ts": {"ingest_ms": ingest_ms, "consumed_ms": int(time.time() * 1000)},
            "raw": value,
        }

    def customer_window(value: dict[str, Any], state: State) -> dict[str, Any]:
        cs = CustomerState.from_state(state.get("w"))
        raw = value.pop("raw")
        try:
            feats = update_customer(cs, value["event_ms"], value["amount"], grace)
        except InvalidMessage as err:
            return {
                "error": err.reason,
                "detail": err.detail,
                "raw": raw,
                "history": value.get("history", False),
            }
        state.set("w", cs.to_state())
        value["features"] = {CUSTOMER_VIEW: feats}
        return value

    def to_dlq(sdf: Any, topic: Any) -> None:
        def count(value: dict[str, Any]) -> bytes:
            metrics.dlq.labels(STAGE, value["error"]).inc()
            ctx = message_context()
            logger.warning(
                "dead letter %s[%d]@%d: %s: %s",
                ctx.topic,
                ctx.partition,
                ctx.offset,
                value["error"],
                value["detail"],
            )
            return value["raw"] if value["raw"] is not None else b""

        (
            sdf.set_headers(lambda v, k, t, h: _dlq_headers(v["error"], v["detail"])(v, k, t, h))
            .apply(count)
            .to_topic(topic)
        )

    def as_history(value: dict[str, Any]) -> dict[str, Any]:
        value["history"] = True
        return value

    sdf = app.dataframe(tx_topic).apply(parse, metadata=True)
    to_dlq(sdf[sdf.apply(lambda v: "error" in v)], tx_dlq)
    hist = app.dataframe(history_topic).apply(parse, metadata=True)
    to_dlq(hist[hist.apply(lambda v: "error" in v)], history_dlq)
    # History and live transactions share the customer windows, in event-time order.
    good = sdf[sdf.apply(lambda v: "error" not in v)].concat(
        hist[hist.apply(lambda v: "error" not in v)].apply(as_history)
    )
    windowed = good.apply(customer_window, stateful=True)
    late = windowed[windowed.apply(lambda v: "error" in v)]
    to_dlq(late[late.apply(lambda v: not v.get("history"))], tx_dlq)
    to_dlq(late[late.apply(lambda v: bool(v.get("history")))], history_dlq)
    # History only warms the windows up: it is not pushed, scored or routed.
    ok = windowed[windowed.apply(lambda v: "error" not in v and not v.get("history"))]
    ok.apply(
        lambda v: {
            "customer_id": v["customer_id"],
            "event_ms": v["event_ms"],
            "features": v["features"][CUSTOMER_VIEW],
        }
    ).sink(FeastOnlineSink(writer, CUSTOMER_VIEW, "customer_id", CUSTOMER_FEATURES))

    by_terminal = ok.group_by(lambda v: v["terminal_id"], name="terminal")

    # -- labels: parse ------------------------------------------------------------------------
    def parse_label_msg(value: bytes, key: Any, timestamp: int, headers: Any) -> dict[str, Any]:
        try:
            tx_id, term, tx_ms, fraud = parse_label(value, max_bytes)
            if key != term:
                # Keyed by another terminal, it would sit in that terminal's partition
                # and state: its window would silently miss it.
                raise InvalidMessage("key_mismatch", f"key {key!r} != terminal_id {term}")
        except InvalidMessage as err:
            return {"error": err.reason, "detail": err.detail, "raw": value}
        return {
            "label": True,
            "transaction_id": tx_id,
            "terminal_id": term,
            "tx_ms": tx_ms,
            "is_fraud": fraud,
        }

    labels = app.dataframe(labels_topic).apply(parse_label_msg, metadata=True)
    to_dlq(labels[labels.apply(lambda v: "error" in v)], labels_dlq)
    good_labels = labels[labels.apply(lambda v: "error" not in v)]

    # -- terminal window over labels and transactions, in event-time order -------------------
    def terminal_window(value: dict[str, Any], state: State) -> dict[str, Any] | None:
        ts_state = TerminalState.from_state(state.get("w"))
        if value.get("label"):
            if add_label(
                ts_state, value["tx_ms"], value["transaction_id"], value["is_fraud"], skew
            ):
                state.set("w", ts_state.to_state())
            return None
        if value["event_ms"] < ts_state.max_ts - skew:
            # Older than the labels kept: its terminal windows may miss some.
            late_terminal.inc()
        value["features"][TERMINAL_VIEW] = terminal_features(ts_state, value["event_ms"], skew)
        state.set("w", ts_state.to_state())
        return value

    merged = by_terminal.concat(good_labels).apply(terminal_window, stateful=True)
    txs = merged[merged.apply(lambda v: v is not None)]
    txs.apply(
        lambda v: {
            "terminal_id": v["terminal_id"],
            "event_ms": v["event_ms"],
            "features": v["features"][TERMINAL_VIEW],
        }
    ).sink(FeastOnlineSink(writer, TERMINAL_VIEW, "terminal_id", TERMINAL_FEATURES))

    def finish(value: dict[str, Any]) -> dict[str, Any]:
        now = int(time.time() * 1000)
        value["ts"]["enriched_ms"] = now
        metrics.messages_out.labels(STAGE, enriched.name).inc()
        ingest = value["ts"].get("ingest_ms") or value["event_ms"]
        metrics.stage_latency.labels(STAGE).observe(max(0.0, (now - ingest) / 1000.0))
        return value

    txs.apply(finish).to_topic(enriched, key=lambda v: str(v["transaction_id"]))
    return app


def run(settings: Settings, metrics: Metrics | None = None) -> None:
    """Run the enrichment stage until SIGTERM/SIGINT (quixstreams handles both).

    quixstreams stops on a failed checkpoint (a broker down for longer than the transaction
    timeout, a fenced producer) and leaves the restart to a supervisor. The stage is its own
    supervisor: it rebuilds the application, which resumes from the committed offsets and
    the changelogs (exactly-once), until it is asked to stop.
    """
    from stages.shared.kafka import StopFlag

    ensure_topics(settings.kafka, settings.topics)
    metrics = metrics or build_metrics()
    stop = StopFlag()
    backoff_s = 1.0
    while not stop.is_set():
        try:
            # Inside the try: building it fetches topic metadata, which fails while the
            # broker is still down.
            app = build_app(settings, metrics)
            app.run()
            return  # stopped by a signal
        except Exception:
            # Between runs our handlers apply (quixstreams installs its own inside run()).
            stop.install_signal_handlers()
            logger.exception("enrichment failed; restarting in %.0fs", backoff_s)
        deadline = time.monotonic() + backoff_s
        while not stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        backoff_s = min(backoff_s * 2, 30.0)
