"""The enrichment stage's labels process: ``labels`` into the label index (Redis), off the
event path.

    labels (any key) ─ parse ─┬─ bad, or contradicting a stored label ─► labels.dlq
                              └─ label index (per terminal, by transaction time) + progress

Its own consumer group (``enrichment-labels``) and process, started and supervised by
``rtpipe run enrichment``. Each micro-batch is written to Redis (idempotent: a label already
stored is a no-op) together with the partition progress the prediction stage aligns on, and
then its dead letters and input offsets commit in one Kafka transaction. A crash re-reads
from the committed offsets and re-writes the same labels, which changes nothing.

The terminal a label belongs to is the one in its payload, whatever its key: the index is
keyed by that id, so a label keyed by another terminal, or by nothing, is stored where it
belongs (counted as ``rtpipe_rekeyed_total{reason}``, nothing is lost).
"""

from __future__ import annotations

import logging
import time

import orjson
import redis
from confluent_kafka import Message
from redis.backoff import NoBackoff
from redis.retry import Retry

from stages.shared.batch_loop import LoopStats, RetryBatch
from stages.shared.kafka import Output, StopFlag, dead_letter, where
from stages.shared.labels import LabelIndex, PartitionProgress
from stages.shared.metrics import Metrics, build_metrics
from stages.shared.records import Label, parse_label
from stages.shared.schemas import InvalidMessage
from stages.shared.settings import Settings
from stages.shared.stage_loop import instrumented_loop

logger = logging.getLogger(__name__)

STAGE = "enrichment"
# How long a batch waits before it is retried while Redis is unreachable.
RETRY_AFTER_S = 0.5


def label_index(settings: Settings, **client_kwargs: object) -> LabelIndex:
    """The label index of ``settings``' Feast project and labels topic."""
    client = settings.redis.client(**client_kwargs)
    return LabelIndex.from_settings(settings, client)


def _key_terminal(key: bytes | None) -> int | None:
    if key is None:
        return None
    try:
        v = orjson.loads(key)
    except orjson.JSONDecodeError:
        return None
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class LabelsStage:
    """The batch handler: parse, index, dead-letter."""

    def __init__(self, settings: Settings, index: LabelIndex, metrics: Metrics) -> None:
        self._settings = settings
        self._index = index
        self._metrics = metrics
        self._dlq = settings.topics.dlq(settings.topics.name("labels"))
        # Newest label timestamp seen per partition (the progress' event-time half).
        self._max_ts: dict[int, int] = {}

    def handle(self, msgs: list[Message]) -> list[Output]:
        self._metrics.messages_in.labels(STAGE).inc(len(msgs))
        outputs: list[Output] = []
        labels: list[Label] = []
        sources: list[Message] = []
        progress: dict[int, PartitionProgress] = {}
        max_ts = dict(self._max_ts)
        max_bytes = self._settings.max_message_bytes
        for m in msgs:
            part = m.partition()
            _, ts = m.timestamp()
            max_ts[part] = max(max_ts.get(part, 0), ts)
            progress[part] = PartitionProgress(m.offset() + 1, max_ts[part])
            try:
                label = parse_label(m.value(), max_bytes)
            except InvalidMessage as err:
                outputs.append(self._dead_letter(m, err.reason, err.detail))
                continue
            key_term = _key_terminal(m.key())
            if key_term != label.terminal_id:
                self._metrics.rekeyed.labels(
                    "labels", "no_key" if m.key() is None else "key_mismatch"
                ).inc()
            labels.append(label)
            sources.append(m)
        try:
            conflicts = self._index.add(labels, progress)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RetryBatch(f"label index unavailable: {exc}", RETRY_AFTER_S) from None
        self._max_ts = max_ts
        for i in conflicts:
            lab = labels[i]
            outputs.append(
                self._dead_letter(
                    sources[i],
                    "conflicting_label",
                    f"transaction {lab.transaction_id} already has another label "
                    f"(this one: tx_ms {lab.tx_ms}, is_fraud {lab.is_fraud})",
                )
            )
        return outputs

    def _dead_letter(self, m: Message, reason: str, detail: str) -> Output:
        logger.warning("dead letter %s: %s: %s", where(m), reason, detail)
        self._metrics.dlq.labels(STAGE, reason).inc()
        return dead_letter(self._dlq, m, reason, detail)


def run(
    settings: Settings,
    stop: StopFlag,
    metrics: Metrics | None = None,
    max_idle_s: float | None = None,
) -> LoopStats:
    """Run the labels process until ``stop`` is set."""
    metrics = metrics or build_metrics()
    # No client-side retries (redis-py's default backs off for up to ~20 s): a failed batch
    # is retried by the loop.
    index = label_index(
        settings, socket_timeout=5.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0)
    )
    stage = LabelsStage(settings, index, metrics)
    cfg = settings.enrichment
    backoff_s = 1.0
    while not stop.is_set():
        try:
            loop = instrumented_loop(
                settings,
                metrics,
                stage="enrichment-labels",
                group_id=settings.topics.group(cfg.labels_consumer_group),
                input_topics=[settings.topics.name("labels")],
                handler=stage.handle,
                max_batch=cfg.labels_max_batch,
                max_wait_ms=0,
                # The index is written before the commit: the prediction stage waits for
                # Redis, not for this transaction, so several batches share one.
                commit_interval_ms=cfg.labels_commit_interval_ms,
            )
            return loop.run(stop, max_idle_s=max_idle_s)
        except Exception:
            logger.exception("enrichment labels failed; restarting in %.0fs", backoff_s)
        stop.wait(backoff_s)
        backoff_s = min(backoff_s * 2, 30.0)
    return LoopStats()


def wait_for_progress(index: LabelIndex, offsets: dict[int, int], timeout_s: float) -> bool:
    """Wait until the index holds every partition up to ``offsets`` (tests, the demo)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        progress = index.progress()
        if all(
            progress.get(p, PartitionProgress(0, 0)).next_offset >= o for p, o in offsets.items()
        ):
            return True
        time.sleep(0.05)
    return False
