"""Enrichment stage wiring (quixstreams): per-customer and per-terminal windows in state
stores with changelog topics, aggregates pushed to Feast's online store, then the event is
forwarded to ``transactions.enriched``.

Two quixstreams applications, each its own consumer group and process (``rtpipe run
enrichment`` starts the second as its child and supervises it)::

    customer app (group enrichment)
    transactions (key customer) ─ parse ─┬─ bad ──────────────────────────► transactions.dlq
    transactions.history ────────────────┤ (time-aligned; history only warms windows up)
                                         └─ customer window ─┬─ late ───► transactions.dlq
                                                             ├─ row ────► Feast online (customer)
                                                             └─ by terminal ─► (by_terminal)

    terminal app (group enrichment-terminal)
    transactions.by_terminal ─ decode ─┬─ bad ────────────────────────────► transactions.dlq
    labels (key terminal) ─ parse ─────┤ (time-aligned) ─ bad ─────────────► labels.dlq
                                       └─ terminal window ─┬─ row ─────────► Feast online (terminal)
                                                           └─ forward ─────► transactions.enriched

One application reading its own repartition topic in a time-aligned group stalled every
event until its own transaction committed: while a transaction is open, librdkafka's cached
high watermark of that partition is past what a read_committed reader can fetch, so
quixstreams waited for it. Split in two, each app's aligned inputs are written by others.

With exactly-once processing, sinks are flushed before the Kafka transaction that makes the
forwarded event visible commits, so a read_committed reader of ``transactions.enriched``
always finds the aggregates that include its event (read-your-writes).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
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
from stages.shared.kafka import (
    DLQ_DETAIL,
    DLQ_REASON,
    DLQ_SOURCE,
    TRANSACTIONAL_LINGER_MS,
    StopFlag,
    ensure_topics,
)
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
from stages.shared.settings import Settings, settings_to_env

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


# What the customer app hands the terminal app for each transaction.
_HANDOVER_FIELDS = ("transaction_id", "terminal_id", "event_ms", "ts", "features")


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


def application(settings: Settings, group: str) -> Application:
    """A quixstreams application with the stage's settings, in consumer group ``group``."""
    cfg = settings.enrichment
    kafka = settings.kafka
    group_id = settings.topics.group(group)
    return Application(
        broker_address=ConnectionConfig.from_librdkafka_dict(kafka.client_config()),
        consumer_group=group_id,
        auto_offset_reset="earliest",
        commit_interval=cfg.commit_interval_s,
        consumer_poll_timeout=cfg.poll_timeout_ms / 1000.0,
        processing_guarantee=cfg.processing_guarantee,
        state_dir=str((cfg.state_dir or settings.home / "state") / group_id),
        producer_extra_config={
            "linger.ms": TRANSACTIONAL_LINGER_MS,
            "compression.type": "lz4",
            "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
        },
        consumer_extra_config={"fetch.wait.max.ms": kafka.fetch_wait_max_ms},
        loglevel=None,
    )


def _redis_writer(settings: Settings) -> OnlineFeatureWriter:
    store = open_feature_store(settings)
    client = settings.redis.client(
        socket_timeout=5.0,
        socket_connect_timeout=2.0,
        # redis-py's default retries turn one refused connection into ~12 s inside the
        # open Kafka transaction; a failed flush backpressures and is retried instead.
        retry=Retry(NoBackoff(), 0),
    )
    return OnlineFeatureWriter(client, OnlineLayout.from_store(store))


def _to_dlq(metrics: Metrics, sdf: Any, topic: Any) -> None:
    """Dead-letter the rows of ``sdf`` (``error``, ``detail``, ``raw``) with their reason."""

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


def transaction_record(
    settings: Settings, value: bytes, timestamp: int, headers: Any
) -> dict[str, Any]:
    """One ``transactions`` (or history) message as the record the stage carries (ids,
    amount, event time, stage timestamps, the original bytes), or ``error``, ``detail``,
    ``raw`` when it is invalid."""
    ingest_ms = timestamp
    for name, hv in headers or ():
        if name == INGEST_HEADER:
            with contextlib.suppress(ValueError):
                ingest_ms = int(hv)
    try:
        tx = parse_transaction(
            value,
            timestamp,
            settings.max_message_bytes,
            now_ms=int(time.time() * 1000),
            max_skew_ms=settings.enrichment.max_clock_skew_ms,
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


def build_customer_app(settings: Settings, metrics: Metrics | None = None) -> Application:
    """The customer-window application (topology above); ``app.run()`` starts it."""
    metrics = metrics or build_metrics()
    cfg = settings.enrichment
    topics = settings.topics
    grace = cfg.grace_ms
    app = application(settings, cfg.consumer_group)

    tx_topic = app.topic(
        topics.name("transactions"), value_deserializer="bytes", key_deserializer="bytes"
    )
    tx_dlq = app.topic(
        topics.dlq(topics.name("transactions")), value_serializer="bytes", key_serializer="bytes"
    )
    # Keyed by the terminal id in the labels' key format (JSON), so the same murmur2
    # partitioner puts a terminal's transactions and labels in partitions of one number.
    by_terminal_topic = app.topic(
        topics.name("by_terminal"),
        value_serializer="json",
        key_serializer=JSONSerializer(dumps=_key_dumps),
    )
    history_topic = app.topic(
        topics.name("history"), value_deserializer="bytes", key_deserializer="bytes"
    )
    history_dlq = app.topic(
        topics.dlq(topics.name("history")), value_serializer="bytes", key_serializer="bytes"
    )

    writer = _redis_writer(settings)

    # -- transactions: parse, customer window ------------------------------------------------
    def parse(value: bytes, key: Any, timestamp: int, headers: Any) -> dict[str, Any]:
        metrics.messages_in.labels(STAGE).inc()
        return transaction_record(settings, value, timestamp, headers)

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
        _to_dlq(metrics, sdf, topic)

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

    ok.to_topic(by_terminal_topic, key=lambda v: v["terminal_id"])
    return app


def build_terminal_app(settings: Settings, metrics: Metrics | None = None) -> Application:
    """The terminal-window application (topology above); ``app.run()`` starts it."""
    metrics = metrics or build_metrics()
    cfg = settings.enrichment
    topics = settings.topics
    max_bytes = settings.max_message_bytes
    skew = cfg.terminal_skew_ms
    late_terminal = metrics.inexact_windows.labels(TERMINAL_VIEW)
    app = application(settings, cfg.terminal_consumer_group)

    by_terminal_topic = app.topic(
        topics.name("by_terminal"),
        value_deserializer="bytes",
        key_deserializer=JSONDeserializer(loads=_key_loads),
    )
    # Bytes in, so a label that is not JSON reaches the DLQ with its original bytes.
    labels_topic = app.topic(
        topics.name("labels"),
        value_deserializer="bytes",
        key_deserializer=JSONDeserializer(loads=_key_loads),
    )
    # Keys here are decoded terminal ids (JSON): written back the same way.
    tx_dlq = app.topic(
        topics.dlq(topics.name("transactions")),
        value_serializer="bytes",
        key_serializer=JSONSerializer(dumps=_key_dumps),
    )
    labels_dlq = app.topic(
        topics.dlq(topics.name("labels")),
        value_serializer="bytes",
        key_serializer=JSONSerializer(dumps=_key_dumps),
    )
    enriched = app.topic(topics.name("enriched"), value_serializer="json", key_serializer="string")
    writer = _redis_writer(settings)

    def to_dlq(sdf: Any, topic: Any) -> None:
        _to_dlq(metrics, sdf, topic)

    def decode(value: bytes) -> dict[str, Any]:
        # Written by the customer app only; anything else is dead-lettered, not fatal.
        try:
            out = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            return {"error": "bad_internal_record", "detail": str(exc), "raw": value}
        missing = (
            [k for k in _HANDOVER_FIELDS if k not in out]
            if isinstance(out, dict)
            else list(_HANDOVER_FIELDS)
        )
        if not missing and not isinstance(out["features"], dict):
            missing = ["features"]
        if missing:
            return {"error": "bad_internal_record", "detail": f"missing {missing}", "raw": value}
        return out

    by_terminal = app.dataframe(by_terminal_topic).apply(decode)
    to_dlq(by_terminal[by_terminal.apply(lambda v: "error" in v)], tx_dlq)
    good_tx = by_terminal[by_terminal.apply(lambda v: "error" not in v)]

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

    merged = good_tx.concat(good_labels).apply(terminal_window, stateful=True)
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


BUILDERS = {"customer": build_customer_app, "terminal": build_terminal_app}
# Set in the terminal process's environment: the pid of the stage process supervising it.
SUPERVISOR_PID_ENV = "RTPIPE_ENRICHMENT_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


def run_part(
    settings: Settings, part: str, metrics: Metrics | None = None, stop: StopFlag | None = None
) -> None:
    """Run one of the stage's applications (``customer`` or ``terminal``) until SIGTERM or
    SIGINT (quixstreams handles both).

    quixstreams stops on a failed checkpoint (a broker down for longer than the transaction
    timeout, a fenced producer) and leaves the restart to a supervisor. The stage is its own
    supervisor: it rebuilds the application, which resumes from the committed offsets and
    the changelogs (exactly-once), until it is asked to stop. Until quixstreams installs its
    own handlers (in ``app.run()``), SIGTERM/SIGINT set ``stop``, checked before each run.
    """
    build = BUILDERS[part]
    metrics = metrics or build_metrics()
    if stop is None:
        stop = StopFlag()
        stop.install_signal_handlers()
    backoff_s = 1.0
    while not stop.is_set():
        try:
            # Inside the try: building it fetches topic metadata, which fails while the
            # broker is still down.
            app = build(settings, metrics)
            if stop.is_set():
                return  # asked to stop while starting
            app.run()
            return  # stopped by a signal
        except Exception:
            # Between runs our handlers apply (quixstreams installs its own inside run()).
            stop.install_signal_handlers()
            logger.exception("enrichment %s failed; restarting in %.0fs", part, backoff_s)
        deadline = time.monotonic() + backoff_s
        while not stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        backoff_s = min(backoff_s * 2, 30.0)


def die_with_supervisor() -> None:
    """In the terminal process: exit (SIGTERM) when the stage process that started it dies,
    even by SIGKILL, so a crashed stage never leaves an orphan consuming in its group."""
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    if not expected:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != int(expected):
        # The supervisor died before prctl took effect.
        logger.error("enrichment supervisor %s is gone; exiting", expected)
        raise SystemExit(1)


class TerminalProcess:
    """Starts the terminal-window application as a child process and restarts it (with
    backoff) whenever it exits while the stage is running."""

    def __init__(self, settings: Settings) -> None:
        self._env = {
            **os.environ,
            **settings_to_env(settings),
            SUPERVISOR_PID_ENV: str(os.getpid()),
        }
        self._stop = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        # The child is started from this thread, which lives as long as the stage does:
        # PR_SET_PDEATHSIG fires when the *thread* that forked the child ends.
        self._thread = threading.Thread(target=self._supervise, name="enrichment-terminal")

    def start(self) -> None:
        self._thread.start()

    def _supervise(self) -> None:
        backoff_s = 1.0
        while not self._stop.is_set():
            started = time.monotonic()
            with self._lock:
                if self._stop.is_set():
                    break
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "stages.cli", "run", STAGE, "--part", "terminal"],
                    env=self._env,
                )
            logger.info("enrichment terminal process %d started", self._proc.pid)
            code = self._proc.wait()
            if self._stop.is_set():
                break
            if time.monotonic() - started > 60:
                backoff_s = 1.0
            logger.error(
                "enrichment terminal process exited with %s; restarting in %.0fs", code, backoff_s
            )
            self._stop.wait(backoff_s)
            backoff_s = min(backoff_s * 2, 30.0)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """Ask the child to finish (SIGTERM), kill it after ``timeout_s``; its exit code."""
        with self._lock:
            self._stop.set()
            proc = self._proc
        if proc is None:
            self._thread.join(timeout_s)
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.error("enrichment terminal process %d did not stop; killing it", proc.pid)
            proc.kill()
            code = proc.wait()
        self._thread.join(timeout_s)
        return code


def run(settings: Settings, metrics: Metrics | None = None, stop: StopFlag | None = None) -> None:
    """Run the whole enrichment stage until SIGTERM/SIGINT: the customer-window application
    in this process and the terminal-window application in a supervised child process."""
    if stop is None:
        stop = StopFlag()
        stop.install_signal_handlers()
    ensure_topics(settings.kafka, settings.topics)
    terminal = TerminalProcess(settings)
    terminal.start()
    try:
        run_part(settings, "customer", metrics, stop)
    finally:
        code = terminal.stop()
        logger.info("enrichment terminal process stopped (exit code %s)", code)
