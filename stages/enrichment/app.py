"""Enrichment stage wiring: the customer windows (quixstreams) on the event path, and the
label index (the stage's labels process) beside it.

Two processes, each its own consumer group (``rtpipe run enrichment`` starts the second as
its child and supervises it)::

    customer app (group enrichment, quixstreams, exactly-once)
    transactions (key customer) ─ parse ─┬─ bad ──────────────────────────► transactions.dlq
                                         └─ customer window ─┬─ late ────► transactions.dlq
                                                             ├─ warm-up ─► (state only)
                                                             ├─ row ─────► Feast online (customer)
                                                             └─ forward ─► transactions.enriched

    labels process (group enrichment-labels, stages/enrichment/labels.py)
    labels ─ parse ─┬─ bad ─► labels.dlq
                    └─ label index (Redis, per terminal) ─► terminal windows, computed by
                       the prediction stage for each event at its own time

An event crosses one exactly-once hop here (the terminal windows used to need a second, a
repartition by terminal through ``transactions.by_terminal``). Records with the header
``rtpipe.warmup`` (a replay's or a new deployment's earlier transactions) update the windows
and go no further: they are never pushed, scored or routed.

With exactly-once processing, sinks are flushed before the Kafka transaction that makes the
forwarded event visible commits, so a read_committed reader of ``transactions.enriched``
always finds the aggregates that include its event (read-your-writes).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
import redis
from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from quixstreams import Application, State
from quixstreams.context import message_context
from quixstreams.kafka.configuration import ConnectionConfig
from quixstreams.models.serializers import JSONSerializer, Serializer
from quixstreams.models.topics import TopicManager
from quixstreams.sinks.base import SinkBackpressureError, SinkBatch
from redis.backoff import NoBackoff
from redis.retry import Retry

from stages.enrichment.backpressure import RetryingBatchingSink
from stages.enrichment.intake import (
    DedupState,
    canonical_key,
    check_duplicate,
    check_horizon,
    describe_placement,
    rekey_headers,
    rekeyed_reason,
    remember,
    route,
)
from stages.enrichment.logic import CustomerState, customer_features
from stages.enrichment.topics import PromptTopicAdmin
from stages.enrichment.watch import PartitionWatch
from stages.shared.kafka import (
    DLQ_DETAIL,
    DLQ_REASON,
    DLQ_SOURCE,
    TRANSACTIONAL_LINGER_MS,
    TRANSACTIONAL_RETRY_BACKOFF,
    ensure_topics,
    static_member_config,
)
from stages.shared.metrics import Assignment, Metrics, build_metrics
from stages.shared.online.errors import OnlineWriteError
from stages.shared.online.layout import online_layout
from stages.shared.online.writer import OnlineFeatureWriter
from stages.shared.records import CONFLICT_REASON, content_fingerprint
from stages.shared.schemas import (
    CUSTOMER_VIEW,
    CUSTOMER_VIEWS,
    InvalidMessage,
    parse_transaction,
)
from stages.shared.settings import Settings
from stages.shared.watchdog import LoopWatchdog

logger = logging.getLogger(__name__)

STAGE = "enrichment"
INGEST_HEADER = "rtpipe.ingest_ms"
# A record with this header (any value) only warms the customer windows up.
WARMUP_HEADER = "rtpipe.warmup"
# How long one checkpoint retries its Redis flush before the app fails (and is restarted):
# below the transaction timeout, which the open transaction must not outlive.
SINK_RETRY_BUDGET_S = 20.0
# quixstreams keeps a Kafka transaction open from a checkpoint's first output to its commit,
# which includes the sink flush to Redis. If the broker times the transaction out first, the
# producer is fenced (fatal). Longer than the batch loop's, shorter than librdkafka's 60 s
# (the stall a killed instance leaves its readers): the flush is bounded by the socket
# timeouts below, with no client-side retries (backpressure retries instead).
CHECKPOINT_TRANSACTION_TIMEOUT_MS = 30_000
# Attempts of a checkpoint's overlapped send_offsets_to_transaction on retriable errors (as
# quixstreams' own, internal_producer.py).
OFFSETS_ATTEMPTS = 3


class FeastOnlineSink(RetryingBatchingSink):
    """Writes feature views' rows to Feast's Redis layout at each checkpoint, one pipelined,
    idempotent round trip per view (an older row never overwrites a newer one).

    While Redis is unreachable the checkpoint retries in place (``RetryingBatchingSink``),
    never through quixstreams' pause/seek path, which drops fetched messages in apps that
    time-align their inputs (``stages/enrichment/backpressure.py``); past the retry budget
    the app fails and the stage restarts it from its committed offsets. Rows are written
    again whole on a retry (idempotent), so a view written before a failed one is harmless.

    Args:
        writer: the online writer.
        views: per view name, its features; each record's ``features[view]`` holds them.
        entity: the join key field of the records.
    """

    def __init__(
        self,
        writer: OnlineFeatureWriter,
        views: dict[str, tuple[str, ...]],
        entity: str,
        *,
        overlap: bool = False,
    ) -> None:
        super().__init__(retry_budget_s=SINK_RETRY_BUDGET_S, overlap=overlap)
        self._writer = writer
        self._views = views
        self._entity = entity

    def write(self, batch: SinkBatch) -> None:
        rows = [item.value for item in batch]
        if not rows:
            return
        ids = np.fromiter((r[self._entity] for r in rows), dtype=np.int64, count=len(rows))
        ts = np.fromiter((r["event_ms"] for r in rows), dtype=np.int64, count=len(rows))
        for view, features in self._views.items():
            values = {
                f: np.fromiter(
                    (r["features"][view][f] for r in rows), dtype=np.float64, count=len(rows)
                )
                for f in features
            }
            try:
                self._writer.write(view, ids, values, ts)
            except OnlineWriteError as exc:
                if isinstance(exc.__cause__, redis.ConnectionError | redis.TimeoutError):
                    # Retried by flush() (the rows are idempotent).
                    raise SinkBackpressureError(retry_after=1.0) from exc
                raise


def pushed_views(settings: Settings) -> dict[str, tuple[str, ...]]:
    """The customer views the stage pushes: those of ``CUSTOMER_VIEWS`` that the applied
    feature repo defines (a registry applied before the behaviour view existed gets the
    spending view only, and a warning)."""
    layout = online_layout(settings)
    views = {v: f for v, f in CUSTOMER_VIEWS.items() if v in layout.views}
    absent = sorted(set(CUSTOMER_VIEWS) - set(views))
    if absent:
        logger.warning(
            "feature views %s are not in project %s: not pushed (run `rtpipe feast apply`)",
            absent,
            layout.project,
        )
    if CUSTOMER_VIEW not in views:
        raise RuntimeError(
            f"feature view {CUSTOMER_VIEW} is not in project {layout.project}: "
            "run `rtpipe feast apply` first"
        )
    return views


def _untimed(phase: str, seconds: float) -> None:
    """A commit step nobody times."""


class NaturalBatchingApplication(Application):
    """A quixstreams application that commits its checkpoint as soon as the consumer has
    nothing more to give (a poll came back empty), and otherwise every ``commit_interval``.

    quixstreams commits on a timer only: with a short interval every checkpoint is a small
    Kafka transaction (throughput falls: 680 events/s at most with 5 ms on 2 cores), with a
    long one every event waits for the timer. Committing when the input is drained gives
    both: a lone event is committed right after it is processed, and under load a
    checkpoint grows until the interval. This hooks quixstreams' per-message step
    (``Application._process_message``, 3.28), so the pinned version is part of it.
    """

    _watch: PartitionWatch | None = None
    _assignment: Assignment | None = None
    _watchdog: LoopWatchdog | None = None
    _observe_commit: Callable[[str, float], None] | None = None

    def _get_topic_manager(self) -> TopicManager:
        """quixstreams' own topic manager, from the application's own config, with the
        prompt admin (:class:`~stages.enrichment.topics.PromptTopicAdmin`)."""
        return self._topic_manager_factory(
            topic_admin=PromptTopicAdmin(
                broker_address=self._config.broker_address,
                extra_config=self._config.producer_extra_config,
            ),
            consumer_group=self._config.consumer_group,
            timeout=self._config.request_timeout,
            create_timeout=self._config.topic_create_timeout,
            auto_create_topics=self._config.auto_create_topics,
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # An idle app's checkpoints expire empty every commit_interval, and closing one
        # aborts the Kafka transaction it began (8 % of an idle stage's time in
        # abort_transaction, py-spy): an event arriving meanwhile waits. An empty
        # checkpoint stays open instead, until it has something to commit.
        ctx = self._processing_context
        commit = ctx.commit_checkpoint

        def commit_checkpoint(force: bool = False, revoking: bool = False) -> None:
            if not force and not revoking and ctx.checkpoint.empty():
                return
            commit(force=force, revoking=revoking)

        ctx.commit_checkpoint = commit_checkpoint  # type: ignore[method-assign]

    def time_commits(self, observe: Callable[[str, float], None]) -> None:
        """Tell ``observe`` how long each checkpoint waited for the producer's flush (the
        forwarded events and the state changelogs acknowledged) and for
        ``commit_transaction``, as ``("flush" | "end_txn", seconds)``; with
        :meth:`overlap_commits` (called after this) also for the online-store write and the
        offsets left to wait for (``"sinks"``, ``"offsets"``): stages/shared/metrics.
        COMMIT_PHASES."""
        self._observe_commit = observe
        producer = self._producer
        flush, commit = producer.flush, producer.commit_transaction

        def timed_flush(timeout: float | None = None) -> int:
            began = time.perf_counter()
            try:
                return flush(timeout=timeout)
            finally:
                observe("flush", time.perf_counter() - began)

        def timed_commit(
            positions: list[TopicPartition], group_metadata: Any, timeout: float | None = None
        ) -> None:
            began = time.perf_counter()
            try:
                commit(positions, group_metadata, timeout)
            finally:
                observe("end_txn", time.perf_counter() - began)

        producer.flush = timed_flush  # type: ignore[method-assign]
        producer.commit_transaction = timed_commit  # type: ignore[method-assign]

    def overlap_commits(self) -> None:
        """Overlap an exactly-once checkpoint's round trips with each other.

        quixstreams commits a checkpoint one step after the other: flush the sinks (a Redis
        round trip), produce the changelogs and flush the producer (AddPartitionsToTxn and
        Produce), then ``send_offsets_to_transaction`` (AddOffsetsToTxn, TxnOffsetCommit)
        and ``commit_transaction`` (EndTxn). Here the offsets, known once the checkpoint is
        due, are sent on a worker thread as soon as the commit begins, and every
        ``RetryingBatchingSink`` built with ``overlap`` writes on its own worker, both while
        the producer flushes; the commit then waits for both and sends only EndTxn. The
        online store still has a checkpoint's rows before readers of the output can see its
        events, and a failed write or offsets call still fails the checkpoint uncommitted
        (the app is restarted from its committed offsets). Transactional calls never run at
        once: an abort, too, waits for the worker first.
        """
        ctx = self._processing_context
        producer = self._producer
        # quixstreams' Producer (kafka/producer.py): the transactional calls as they are.
        client = producer._producer
        consumer = self._consumer
        commit, abort = producer.commit_transaction, producer.abort_transaction
        commit_checkpoint = ctx.commit_checkpoint
        sinks = self._sink_manager
        observe = self._observe_commit or _untimed
        worker = ThreadPoolExecutor(1, "enrichment-offsets")
        sent: dict[str, Any] = {}

        def send_offsets(positions: list[TopicPartition], metadata: Any) -> None:
            for attempt in range(1, OFFSETS_ATTEMPTS + 1):
                try:
                    client.send_offsets_to_transaction(positions, metadata, 30)
                    return
                except KafkaException as exc:
                    # As quixstreams' own retries: a retriable error (a timeout) again.
                    if not exc.args[0].retriable() or attempt == OFFSETS_ATTEMPTS:
                        raise

        def settle() -> list[TopicPartition] | None:
            """The offsets the worker sent for this checkpoint (its error raised)."""
            future, positions = sent.pop("future", None), sent.pop("positions", None)
            if future is not None:
                future.result()
            return positions

        def early_commit_checkpoint(force: bool = False, revoking: bool = False) -> None:
            cp = ctx.checkpoint
            # The condition under which ProcessingContext.commit_checkpoint commits.
            if (force or cp.expired()) and not cp.empty() and cp._tp_offsets:
                positions = [
                    TopicPartition(topic, partition, offset + 1)
                    for (topic, partition), offset in cp._tp_offsets.items()
                ]
                sent["positions"] = positions
                sent["future"] = worker.submit(
                    send_offsets, positions, consumer.consumer_group_metadata()
                )
            try:
                commit_checkpoint(force=force, revoking=revoking)
            finally:
                # A checkpoint that ended early or failed: the worker is done before the
                # next transactional call (its error is the checkpoint's own by then).
                with contextlib.suppress(KafkaException):
                    settle()

        def commit_transaction(
            positions: list[TopicPartition], group_metadata: Any, timeout: float | None = None
        ) -> None:
            began = time.perf_counter()
            for sink in sinks.sinks:
                if isinstance(sink, RetryingBatchingSink):
                    sink.wait_flushed()
            observe("sinks", time.perf_counter() - began)
            began = time.perf_counter()
            done = settle()
            observe("offsets", time.perf_counter() - began)
            key = lambda tps: sorted((tp.topic, tp.partition, tp.offset) for tp in tps)  # noqa: E731
            if done is not None and key(done) == key(positions):
                positions = []  # sent already: only EndTxn is left
            commit(positions, group_metadata, timeout)

        def abort_transaction(timeout: float | None = None) -> None:
            with contextlib.suppress(KafkaException):
                settle()
            abort(timeout)

        ctx.commit_checkpoint = early_commit_checkpoint  # type: ignore[method-assign]
        producer.commit_transaction = commit_transaction  # type: ignore[method-assign]
        producer.abort_transaction = abort_transaction  # type: ignore[method-assign]

    def watch_partitions(self, watch: PartitionWatch, assignment: Assignment) -> None:
        """Check the input partitions for stalls (and export their lag) as it runs, and
        export which of them it holds (readiness)."""
        self._watch = watch
        self._assignment = assignment

    def watch_loop(self, watchdog: LoopWatchdog) -> None:
        """Beat ``watchdog`` on every turn of the loop; state recovery pauses it."""
        self._watchdog = watchdog
        manager = self._state_manager
        do_recovery = manager.do_recovery

        def recover() -> None:
            with watchdog.paused():
                do_recovery()

        manager.do_recovery = recover  # type: ignore[method-assign]

    def _on_assign(self, consumer: Any, topic_partitions: list[Any]) -> None:
        super()._on_assign(consumer, topic_partitions)
        if self._assignment is not None:
            self._assignment.assigned(topic_partitions)

    def _on_revoke(self, consumer: Any, topic_partitions: list[Any]) -> None:
        if self._assignment is not None:
            self._assignment.revoked(topic_partitions)
        super()._on_revoke(consumer, topic_partitions)

    def _on_lost(self, consumer: Any, topic_partitions: list[Any]) -> None:
        if self._assignment is not None:
            self._assignment.revoked(topic_partitions)
        super()._on_lost(consumer, topic_partitions)

    def _process_message(self, dataframe_composed: Any) -> None:
        tracker = self._run_tracker
        tracker.set_message_consumed(False)
        super()._process_message(dataframe_composed)
        context = self._processing_context
        if not tracker._message_consumed and not context.checkpoint.empty():
            context.commit_checkpoint(force=True)
        if self._watch is not None:
            self._watch.check(self._consumer)
        if self._watchdog is not None:
            self._watchdog.beat()


def application(settings: Settings, group: str) -> NaturalBatchingApplication:
    """A quixstreams application with the stage's settings, in consumer group ``group``."""
    cfg = settings.enrichment
    kafka = settings.kafka
    group_id = settings.topics.group(group)
    producer: dict[str, Any] = {
        "linger.ms": TRANSACTIONAL_LINGER_MS,
        "compression.type": "lz4",
        "transaction.timeout.ms": CHECKPOINT_TRANSACTION_TIMEOUT_MS,
        **TRANSACTIONAL_RETRY_BACKOFF,
    }
    consumer: dict[str, Any] = {"fetch.wait.max.ms": kafka.fetch_wait_max_ms}
    instance = settings.instance_name(group_id)
    if instance:
        producer["transactional.id"] = instance
        consumer.update(static_member_config(instance))
    return NaturalBatchingApplication(
        broker_address=ConnectionConfig.from_librdkafka_dict(kafka.client_config()),
        consumer_group=group_id,
        auto_offset_reset="earliest",
        commit_interval=cfg.commit_interval_s,
        consumer_poll_timeout=cfg.poll_timeout_ms / 1000.0,
        processing_guarantee=cfg.processing_guarantee,
        state_dir=str((cfg.state_dir or settings.home / "state") / group_id),
        producer_extra_config=producer,
        consumer_extra_config=consumer,
        loglevel=None,
    )


def _redis_writer(settings: Settings) -> OnlineFeatureWriter:
    client = settings.redis.client(
        socket_timeout=5.0,
        socket_connect_timeout=2.0,
        # redis-py's default retries turn one refused connection into ~12 s inside the
        # open Kafka transaction; a failed flush backpressures and is retried instead.
        retry=Retry(NoBackoff(), 0),
    )
    return OnlineFeatureWriter(client, online_layout(settings))


def transaction_record(
    settings: Settings, value: bytes, timestamp: int, headers: Any
) -> dict[str, Any]:
    """One ``transactions`` message as the record the stage carries (ids, amount, event
    time, stage timestamps, whether it only warms up, the original bytes), or ``error``,
    ``detail``, ``raw`` when it is invalid."""
    ingest_ms = timestamp
    warmup = False
    for name, hv in headers or ():
        if name == INGEST_HEADER:
            with contextlib.suppress(ValueError, TypeError):
                ingest_ms = int(hv)
        elif name == WARMUP_HEADER:
            warmup = True
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
        "warmup": warmup,
        "raw": value,
    }


class _RawValue(Serializer):
    """Writes a record's original bytes (dead letters and re-keyed copies); a record that
    had no value is written empty."""

    def __call__(self, *args: Any, **kwargs: Any) -> bytes:
        raw = args[0]["raw"]
        return b"" if raw is None else bytes(raw)


class _RawKey(Serializer):
    """Writes a key as the bytes it was read as (None stays None)."""

    def __call__(self, *args: Any, **kwargs: Any) -> bytes:
        key = args[0]
        return key if key is None else bytes(key)  # type: ignore[return-value]


# What an enriched event carries downstream (the record also holds internal fields).
ENRICHED_FIELDS = ("transaction_id", "customer_id", "terminal_id", "amount", "event_ms", "ts")


def _enriched_json(value: dict[str, Any]) -> bytes:
    out = {k: value[k] for k in ENRICHED_FIELDS}
    out["features"] = value["features"]  # per view: what was pushed for this very event
    return orjson.dumps(out)


def build_customer_app(
    settings: Settings, metrics: Metrics | None = None
) -> NaturalBatchingApplication:
    """The customer-window application (topology above); ``app.run()`` starts it.

    One linear chain with no branches: quixstreams copies a record (pickle) for every
    branch of a dataframe, which cost 12 % of the stage's time per message with the six
    branches of the previous topology (measured with py-spy). Each record gets a ``kind``
    (``ok``, ``dlq``, ``rekey``, ``skip``) and a topic chosen from it.
    """
    metrics = metrics or build_metrics()
    cfg = settings.enrichment
    topics = settings.topics
    grace = cfg.grace_ms
    app = application(settings, cfg.consumer_group)

    # Read, and written by re-keyed copies: the original bytes both ways.
    tx_name = topics.name("transactions")
    tx_topic = app.topic(
        tx_name,
        value_deserializer="bytes",
        key_deserializer="bytes",
        value_serializer=_RawValue(),
        key_serializer=_RawKey(),
    )
    tx_dlq = app.topic(topics.dlq(tx_name), value_serializer=_RawValue(), key_serializer=_RawKey())
    enriched = app.topic(
        topics.name("enriched"),
        value_serializer=JSONSerializer(dumps=_enriched_json),
        key_serializer="string",
    )
    outputs = {"ok": enriched, "dlq": tx_dlq, "rekey": tx_topic}
    writer = _redis_writer(settings)
    n_partitions = input_partitions(settings, tx_name)
    horizon = cfg.dedup_horizon_ms
    check_horizon(horizon, grace)
    messages_in = metrics.messages_in.labels(STAGE)
    messages_out = metrics.messages_out.labels(STAGE, enriched.name)
    latency = metrics.stage_latency.labels(STAGE)
    duplicates = metrics.duplicates.labels(STAGE)

    def dead_letter(value: bytes, key: Any, reason: str, detail: str) -> dict[str, Any]:
        metrics.dlq.labels(STAGE, reason).inc()
        ctx = message_context()
        where = f"{ctx.topic}[{ctx.partition}]@{ctx.offset}"
        logger.warning("dead letter %s: %s: %s", where, reason, detail)
        return {
            "kind": "dlq",
            "raw": value,
            "key": key,
            "headers": [
                (DLQ_REASON, reason.encode()),
                (DLQ_DETAIL, detail[:1000].encode("utf-8", "replace")),
                (DLQ_SOURCE, where.encode()),
            ],
        }

    def step(value: bytes, key: Any, timestamp: int, headers: Any, state: State) -> Any:
        messages_in.inc()
        rec = transaction_record(settings, value, timestamp, headers)
        if "error" in rec:
            return dead_letter(value, key, rec["error"], rec["detail"])
        # The customer is the payload's: its state is the one keyed (and partitioned) by
        # the canonical key. Anything else is re-produced under that key first (the state
        # of this message's key is not touched).
        part = message_context().partition
        cid = rec["customer_id"]
        verdict = route(key, part, n_partitions, cid, rekeyed_reason(headers) is not None)
        if verdict.action == "dlq":
            detail = describe_placement(key, part, n_partitions, cid)
            return dead_letter(value, key, str(verdict.reason), detail)
        if verdict.action == "rekey":
            metrics.rekeyed.labels(tx_name, verdict.reason).inc()
            return {
                "kind": "rekey",
                "raw": value,
                "key": canonical_key(cid),
                "headers": rekey_headers(headers, verdict.reason),  # type: ignore[arg-type]
            }
        stored = state.get("w")
        cs = CustomerState.from_state(stored)
        dedup = DedupState.from_state(stored.get("dedup") if stored else None, horizon)
        tx_id, event_ms = rec["transaction_id"], rec["event_ms"]
        fp = content_fingerprint(tx_id, cid, rec["terminal_id"], rec["amount"], event_ms)
        seen = check_duplicate(dedup, tx_id, fp, event_ms)
        if seen == "duplicate":
            duplicates.inc()
            return {"kind": "skip"}
        if seen == "conflict":
            detail = f"transaction {tx_id} was seen before with other content"
            return dead_letter(value, key, CONFLICT_REASON, detail)
        remember(dedup, tx_id, fp, event_ms)
        try:
            rec["features"] = customer_features(
                cs, event_ms, rec["amount"], rec["terminal_id"], grace
            )
        except InvalidMessage as err:
            rec = dead_letter(value, key, err.reason, err.detail)
        # Remembered even when late: a retry of it is a duplicate, not a second outcome.
        kept = cs.to_state()
        kept["dedup"] = dedup.to_state()
        state.set("w", kept)
        if rec.get("kind") == "dlq":
            return rec
        if rec["warmup"]:  # fills the windows only: not pushed, scored or routed
            return {"kind": "skip"}
        now = int(time.time() * 1000)
        rec["ts"]["enriched_ms"] = now
        rec["kind"] = "ok"
        messages_out.inc()
        latency.observe(max(0.0, (now - (rec["ts"].get("ingest_ms") or event_ms)) / 1000.0))
        return rec

    def headers_of(value: dict[str, Any], key: Any, timestamp: int, headers: Any) -> Any:
        return value.get("headers", headers)

    def key_of(value: dict[str, Any]) -> Any:
        return str(value["transaction_id"]) if value["kind"] == "ok" else value["key"]

    # Overlapped with the checkpoint's producer flush when the commit is a transaction,
    # which waits for it (at-least-once commits the consumer's offsets instead: not hooked).
    overlap = settings.kafka.overlap_commit and cfg.processing_guarantee == "exactly-once"
    sink = FeastOnlineSink(writer, pushed_views(settings), "customer_id", overlap=overlap)
    commit_phase = metrics.commit_phase
    app.time_commits(lambda phase, seconds: commit_phase.labels(STAGE, phase).observe(seconds))
    if overlap:
        app.overlap_commits()
    (
        app.dataframe(tx_topic)
        .apply(step, stateful=True, metadata=True)
        .filter(lambda v: v["kind"] != "skip")
        .set_headers(headers_of)
        .to_topic(lambda v, k, t, h: outputs[v["kind"]], key=key_of)
        # The enriched events' rows, flushed to Redis before the checkpoint commits.
        .filter(lambda v: v["kind"] == "ok")
        .sink(sink)
    )
    app.watch_partitions(
        PartitionWatch({tx_name}, metrics, settings.stall_timeout_s, lambda: sink.total_retries),
        Assignment(metrics, STAGE, settings.topics.group(cfg.consumer_group), [tx_name]),
    )
    return app


def input_partitions(settings: Settings, topic: str) -> int:
    """The partition count of ``topic`` (created if missing), which the canonical
    placement of a key depends on."""
    ensure_topics(settings.kafka, settings.topics, [topic])
    admin = AdminClient(settings.kafka.client_config())
    return len(admin.list_topics(topic, timeout=10).topics[topic].partitions)
