"""Prediction stage wiring: micro-batches from ``transactions.enriched``, one batched online
feature read (customer rows from Feast's layout, terminal windows counted over the label
index for each event's own time), one LightGBM call per batch, predictions out in the same
Kafka transaction as the input offsets.

Each model is served with its own feature service (``stages/prediction/models.py``): the
batch read covers the union of the services of the promoted, shadow and canary models (one
round trip whatever the mix), each model's matrix takes its own columns, and a prediction
record names the promoted model's service and the feature ages of that service's views only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from confluent_kafka import IsolationLevel, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from redis.backoff import NoBackoff
from redis.retry import Retry

from stages.prediction.logic import (
    EnrichedBatch,
    ScoredBatch,
    assemble_matrix,
    decode_enriched,
    point_in_time,
    prediction_records,
    request_features,
    stable_fraction,
    unscored_records,
)
from stages.prediction.models import (
    ModelCheck,
    ModelHolder,
    ServingModel,
    UnservableModelError,
)
from stages.shared.batch_loop import LoopStats, RetryBatch
from stages.shared.claims import TransactionClaims
from stages.shared.kafka import Output, StopFlag, dead_letter, ensure_topics, where
from stages.shared.labels import LabelIndex, exact_mask
from stages.shared.metrics import Metrics, build_metrics
from stages.shared.online.layout import OnlineLayout, online_layout
from stages.shared.online.reader import OnlineBatch, OnlineFeatureReader
from stages.shared.online.transport import RedisClient
from stages.shared.records import CONFLICT_REASON, content_fingerprint
from stages.shared.schemas import REQUEST_FEATURES, TERMINAL_FEATURES, TERMINAL_VIEW
from stages.shared.settings import Settings, StageName
from stages.shared.stage_loop import stage_loop

logger = logging.getLogger(__name__)

STAGE: StageName = "prediction"


def union_service(layout: OnlineLayout, services: Iterable[str]) -> tuple[OnlineLayout, str]:
    """A layout whose service ``name`` serves every feature of ``services`` (each view once,
    its features in first-seen order), and that name; a single service is returned as is.

    Raises:
        UnservableModelError: a service the layout does not have.
    """
    names = sorted(set(services))
    for name in names:
        if name not in layout.services:
            raise UnservableModelError(
                "(any)", name, f"no such feature service in project {layout.project}"
            )
    if len(names) == 1:
        return layout, names[0]
    merged: dict[str, list[str]] = {}
    for name in names:
        for view, features in layout.services[name]:
            have = merged.setdefault(view, [])
            have.extend(f for f in features if f not in have)
    union = "+".join(names)
    projections = tuple((v, tuple(f)) for v, f in merged.items())
    return dataclasses.replace(layout, services={**layout.services, union: projections}), union


def model_check(layout: OnlineLayout) -> ModelCheck:
    """The load-time check of a model against the online layout (``models.ModelCheck``)."""

    def check(model: ServingModel) -> None:
        views = layout.services.get(model.feature_service)
        if views is None:
            raise UnservableModelError(
                model.version,
                model.feature_service,
                f"no such feature service in project {layout.project} "
                f"(known: {sorted(layout.services)}; run `rtpipe feast apply`?)",
            )
        served = {*REQUEST_FEATURES, *(f for _, features in views for f in features)}
        missing = [f for f in model.features if f not in served]
        if missing:
            raise UnservableModelError(
                model.version, model.feature_service, f"the service does not serve {missing}"
            )

    return check


@dataclass
class PredictionStage:
    """Everything the batch handler needs, built once per process."""

    settings: Settings
    # The reader of the services served at start-up; others are built as models change.
    reader: OnlineFeatureReader
    models: ModelHolder
    metrics: Metrics
    # Set when a feature service serves the terminal view: its windows come from here.
    labels: LabelIndex | None = None
    admin: AdminClient | None = None
    # One outcome per transaction id (stages/shared/claims.py); None turns the check off.
    claims: TransactionClaims | None = None
    # For the readers of other service mixes (None: only ``reader``'s can be served).
    client: RedisClient | None = None

    def __post_init__(self) -> None:
        topics = self.settings.topics
        self._out_topic = topics.name("predictions")
        self._dlq_topic = topics.dlq(topics.name("enriched"))
        self._labels_topic = topics.name("labels")
        self._label_partitions: list[TopicPartition] = []
        self._layout = self.reader.layout
        self._readers = {self.reader.feature_service_name: self.reader}

    def _reader_for(self, services: Sequence[str]) -> OnlineFeatureReader:
        """The reader of the union of ``services`` (built once per mix)."""
        key = "+".join(sorted(set(services)))
        reader = self._readers.get(key)
        if reader is None:
            if self.client is None:
                raise RuntimeError(f"no Redis client to read feature services {key}")
            layout, name = union_service(self._layout, services)
            reader = OnlineFeatureReader(self.client, layout, name, exclude_views=(TERMINAL_VIEW,))
            self._readers[key] = reader
            logger.info("serving feature services %s", key)
        return reader

    def _views(self, service: str) -> list[str]:
        return [view for view, _ in self._layout.services[service]]

    def handle(self, msgs: list[Message]) -> list[Output]:
        """Score one micro-batch; returns predictions and dead letters."""
        self.models.maybe_reload()
        self.metrics.messages_in.labels(STAGE).inc(len(msgs))
        self.metrics.batch_size.labels(STAGE).observe(len(msgs))
        batch, bad = decode_enriched([m.value() for m in msgs])
        outputs: list[Output] = []
        for i, err in bad:
            logger.warning("dead letter %s: %s", where(msgs[i]), err)
            self.metrics.dlq.labels(STAGE, err.reason).inc()
            outputs.append(dead_letter(self._dlq_topic, msgs[i], err.reason, err.detail))
        if len(batch):
            outputs.extend(self._score(batch, msgs, outputs))
        return outputs

    def _fingerprints(self, batch: EnrichedBatch) -> list[int]:
        return [
            content_fingerprint(t, c, k, a, e)
            for t, c, k, a, e in zip(
                batch.transaction_id.tolist(),
                batch.customer_id.tolist(),
                batch.terminal_id.tolist(),
                batch.amount.tolist(),
                batch.event_ms.tolist(),
                strict=True,
            )
        ]

    def _copies(
        self,
        batch: EnrichedBatch,
        fps: list[int],
        conflict: np.ndarray,
        msgs: list[Message],
        outputs: list[Output],
    ) -> np.ndarray:
        """Which rows to score: not the copies of an id this batch or an earlier one
        already scored with other content (dead-lettered ``conflicting_duplicate``) or with
        the same (counted)."""
        seen: set[tuple[int, int]] = set()
        keep = ~conflict
        for j, (tid, fp) in enumerate(zip(batch.transaction_id.tolist(), fps, strict=True)):
            if conflict[j]:
                m = msgs[int(batch.index[j])]
                detail = f"transaction {tid} was scored before with other content"
                logger.warning("dead letter %s: %s", where(m), detail)
                self.metrics.dlq.labels(STAGE, CONFLICT_REASON).inc()
                outputs.append(dead_letter(self._dlq_topic, m, CONFLICT_REASON, detail))
            elif (tid, fp) in seen:
                keep[j] = False
                self.metrics.duplicates.labels(STAGE).inc()
            else:
                seen.add((tid, fp))
        return keep

    def _score(self, batch: EnrichedBatch, msgs: list[Message], dead: list[Output]) -> list[Output]:
        entity = {"customer_id": batch.customer_id, "terminal_id": batch.terminal_id}
        fps = self._fingerprints(batch) if self.claims is not None else []
        services = [m.feature_service for m in self.models.serving]
        reader = self._reader_for(services)
        windows = self.labels is not None and any(TERMINAL_VIEW in self._views(s) for s in services)
        try:
            # Asked first, answered while Redis is read: where the labels are now.
            stable = self._stable_label_offsets() if windows else None
            online = reader.read(entity)
            conflict = np.zeros(len(batch), dtype=bool)
            if windows:
                # The claims travel in the label index's round trip.
                claims = (
                    self.claims.commands(batch.transaction_id, fps)
                    if self.claims is not None
                    else []
                )
                online, replies = self._with_terminal_windows(batch, online, stable, claims)
                if self.claims is not None:
                    conflict = self.claims.conflicts(replies, fps)
            elif self.claims is not None:
                conflict = self.claims.claim(batch.transaction_id, fps)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if self.settings.prediction.on_features_unavailable == "pause":
                raise RetryBatch(f"features_unavailable: {exc}", retry_after_s=1.0) from None
            return self._unavailable(batch, str(exc))
        if self.claims is not None:
            keep = self._copies(batch, fps, conflict, msgs, dead)
            if not keep.all():
                batch, online = batch.take(keep), online.take(keep)
                if not len(batch):
                    return []
        replaced = point_in_time(
            online.values, online.event_ts_ms, online.found, online.feature_names, batch
        )
        for view, n in replaced.items():
            self.metrics.feature_source.labels(view, "event").inc(n)
            self.metrics.feature_source.labels(view, "online").inc(
                int(online.found[view].sum()) - n
            )
        request = request_features(batch.amount, batch.event_ms)
        model = self.models.current
        matrix = assemble_matrix(model.features, request, online.values, online.feature_names)
        scores = model.predict(matrix)
        versions = self._canary(batch, model, matrix, scores, request, online)
        shadow = None
        if self.models.shadow is not None:
            sm = self.models.shadow
            sx = (
                matrix
                if sm.features == model.features
                else assemble_matrix(sm.features, request, online.values, online.feature_names)
            )
            shadow = (sm.version, sm.predict(sx))
            self.metrics.shadow_abs_diff.labels(sm.version).observe(
                float(np.mean(np.abs(shadow[1] - scores)))
            )
        now_ms = int(time.time() * 1000)
        for view in online.found:
            found = online.found[view]
            self.metrics.feature_missing.labels(view).inc(int((~found).sum()))
            ages = (batch.event_ms[found] - online.event_ts_ms[view][found]) / 1000.0
            hist = self.metrics.feature_age.labels(view)
            for age in ages[:: max(1, len(ages) // 50)]:  # a sample per batch is enough
                hist.observe(float(age))
        score_hist = self.metrics.score.labels(model.version)
        for s in scores[:: max(1, len(scores) // 50)]:
            score_hist.observe(float(s))
        if versions is None:
            self.metrics.predictions.labels(model.name, model.version).inc(len(batch))
        else:
            for v, n in zip(*np.unique(versions, return_counts=True), strict=True):
                self.metrics.predictions.labels(model.name, str(v)).inc(int(n))
        views = [v for v in self._views(model.feature_service) if v in online.event_ts_ms]
        scored = ScoredBatch(
            scores,
            matrix,
            model.features,
            {v: online.event_ts_ms[v] for v in views},
            {v: online.found[v] for v in views},
            model=model.name,
            model_version=model.version,
            feature_service=model.feature_service,
            shadow=shadow,
            versions=versions,
        )
        records = prediction_records(batch, scored, now_ms)
        keys = [str(t).encode() for t in batch.transaction_id.tolist()]
        self.metrics.messages_out.labels(STAGE, self._out_topic).inc(len(records))
        return [
            Output(self._out_topic, k, v, timestamp_ms=int(ts))
            for k, v, ts in zip(keys, records, batch.event_ms.tolist(), strict=True)
        ]

    def _stable_label_offsets(self) -> Any:
        """Start reading the ``labels`` partitions' last stable offsets (one request)."""
        assert self.admin is not None
        if not self._label_partitions:
            try:
                meta = self.admin.list_topics(self._labels_topic, timeout=10)
            except KafkaException as exc:  # the broker is down or restarting: retry later
                raise RetryBatch(f"labels metadata unavailable: {exc}", 1.0) from None
            parts = meta.topics[self._labels_topic].partitions
            self._label_partitions = [TopicPartition(self._labels_topic, p) for p in parts]
        return self.admin.list_offsets(
            {tp: OffsetSpec.latest() for tp in self._label_partitions},
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=10,
        )

    def _with_terminal_windows(
        self,
        batch: EnrichedBatch,
        online: OnlineBatch,
        stable: Any,
        tail: list[tuple[bytes, ...]],
    ) -> tuple[OnlineBatch, list[Any]]:
        """``online`` with the terminal view's columns, counted over the label index for
        each event's own time once the index has every label the events may need; and the
        replies to ``tail``, commands sent in the first read's round trip."""
        assert self.labels is not None
        try:
            offsets = {tp.partition: fut.result().offset for tp, fut in stable.items()}
        except KafkaException as exc:
            # Without the offsets the wait cannot be bounded: retry the batch, with a new
            # admin client. After a broker restart the old one kept answering
            # FENCED_LEADER_EPOCH from its cached metadata until its next refresh (5
            # minutes without decisions in the kafka-restart chaos run).
            self.admin = AdminClient(self.settings.kafka.client_config())
            self._label_partitions = []
            raise RetryBatch(f"labels offsets unavailable: {exc}", retry_after_s=0.5) from None
        started = time.monotonic()
        deadline = started + self.settings.prediction.label_wait_max_ms / 1000.0
        values, progress = self.labels.terminal_features(
            batch.terminal_id, batch.event_ms, with_progress=True, tail=tail
        )
        replies = self.labels.last_tail_replies
        while True:
            exact = exact_mask(batch.event_ms, progress or {}, offsets)
            if exact.all():
                break
            if time.monotonic() >= deadline:
                n = int((~exact).sum())
                self.metrics.inexact_windows.labels(TERMINAL_VIEW).inc(n)
                logger.warning(
                    "label index behind for %.1fs: %d events served with the labels so far",
                    time.monotonic() - started,
                    n,
                )
                break
            time.sleep(0.001)
            values, progress = self.labels.terminal_features(
                batch.terminal_id, batch.event_ms, with_progress=True
            )
        self.metrics.label_wait.observe(time.monotonic() - started)
        n = len(batch)
        joined = OnlineBatch(
            values=np.concatenate([online.values, values], axis=1),
            event_ts_ms={**online.event_ts_ms, TERMINAL_VIEW: batch.event_ms.copy()},
            found={**online.found, TERMINAL_VIEW: np.ones(n, dtype=bool)},
            feature_names=(*online.feature_names, *TERMINAL_FEATURES),
        )
        return joined, replies

    def _canary(
        self,
        batch: EnrichedBatch,
        model: ServingModel,
        matrix: np.ndarray,
        scores: np.ndarray,
        request: np.ndarray,
        online: OnlineBatch,
    ) -> list[str] | None:
        """Score the canary slice on the candidate model, in place; per-row versions."""
        canary = self.models.canary
        fraction = self.settings.prediction.canary_fraction
        if canary is None or fraction <= 0.0:
            return None
        mask = stable_fraction(batch.transaction_id) < fraction
        if not mask.any():
            return None
        cx = (
            matrix
            if canary.features == model.features
            else assemble_matrix(canary.features, request, online.values, online.feature_names)
        )
        scores[mask] = canary.predict(cx[mask])
        return np.where(mask, canary.version, model.version).tolist()

    def _unavailable(self, batch: EnrichedBatch, detail: str) -> list[Output]:
        """Redis is down and the policy is to review: predictions without a score."""
        model = self.models.current
        records = unscored_records(
            batch,
            "features_unavailable",
            detail,
            model.name,
            model.version,
            int(time.time() * 1000),
        )
        return [
            Output(self._out_topic, str(t).encode(), rec, timestamp_ms=int(ts))
            for t, rec, ts in zip(
                batch.transaction_id.tolist(), records, batch.event_ms.tolist(), strict=True
            )
        ]


def build_stage(settings: Settings, metrics: Metrics | None = None) -> PredictionStage:
    """Read the online layout, open the Redis client and load the current model."""
    metrics = metrics or build_metrics()
    layout = online_layout(settings)
    models = ModelHolder(settings, metrics, model_check(layout))
    models.load_initial()
    client = settings.redis.client(
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        # No client-side retries: redis-py's default (3, exponential backoff up to 10 s)
        # held a batch for 19 s against a stopped Redis (measured), which hid a 15 s outage
        # from the review policy; the batch loop retries (pause) or reviews instead.
        retry=Retry(NoBackoff(), 0),
    )
    union, service = union_service(layout, [m.feature_service for m in models.serving])
    reader = OnlineFeatureReader(client, union, service, exclude_views=(TERMINAL_VIEW,))
    # Any service of the layout with the terminal view (a model may switch to it later).
    on_demand = any(view == TERMINAL_VIEW for s in layout.services.values() for view, _ in s)
    labels = admin = None
    if on_demand:
        labels = LabelIndex.from_settings(settings, client)
        admin = AdminClient(settings.kafka.client_config())
    claims = TransactionClaims(
        client, settings.feast_project, settings.enrichment.dedup_horizon_ms // 1000
    )
    return PredictionStage(
        settings=settings,
        reader=reader,
        models=models,
        metrics=metrics,
        labels=labels,
        admin=admin,
        claims=claims,
        client=client,
    )


def run(
    settings: Settings,
    stop: StopFlag,
    metrics: Metrics | None = None,
    *,
    max_idle_s: float | None = None,
) -> LoopStats:
    """Run the prediction stage until ``stop`` is set."""
    stage = build_stage(settings, metrics)
    ensure_topics(settings.kafka, settings.topics)
    # A promoted model is loaded (or rejected) while no events flow, not on the next one.
    loop = stage_loop(
        settings,
        stage.metrics,
        STAGE,
        stage.handle,
        settings.prediction,
        on_idle=stage.models.maybe_reload,
    )
    return loop.run(stop, max_idle_s=max_idle_s)
