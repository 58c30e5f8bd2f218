"""Prometheus metrics of every stage, defined once; each stage process serves its own endpoint.

Names follow Prometheus conventions: ``rtpipe_<what>_total`` for counters, ``_seconds`` for
durations; the stage is a label so one dashboard query covers all stages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_AGE_BUCKETS = (1, 10, 60, 300, 1800, 3600, 6 * 3600, 86_400, 7 * 86_400, 31 * 86_400)
_SCORE_BUCKETS = tuple(i / 20 for i in range(1, 21))
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
# The steps of an exactly-once commit that rtpipe_commit_phase_seconds times, as the loop
# waits for them: "offsets" the input offsets sent to the transaction (AddOffsetsToTxn,
# TxnOffsetCommit; overlapped with the work, only what is left is waited for), "sinks" the
# enrichment checkpoint's online-store write (overlapped with the flush), "flush" the
# transaction's outputs acknowledged by the broker (Produce; the enrichment checkpoint's state
# changelogs too), "end_txn" commit_transaction (EndTxn; with KafkaSettings.overlap_commit off,
# the enrichment checkpoint's offsets too). Their rate over a minute is the share of the
# loop's time spent waiting for the broker.
COMMIT_PHASES = ("offsets", "sinks", "flush", "end_txn")


@dataclass
class Metrics:
    """All metrics, registered on one registry (a fresh one per process or per test)."""

    registry: CollectorRegistry
    messages_in: Counter
    messages_out: Counter
    dlq: Counter
    batch_size: Histogram
    batch_seconds: Histogram
    commit_phase: Histogram
    consumer_lag: Gauge
    rebalances: Counter
    stage_latency: Histogram
    event_to_decision: Histogram
    decisions: Counter
    feature_age: Histogram
    feature_missing: Counter
    inexact_windows: Counter
    feature_source: Counter
    score: Histogram
    predictions: Counter
    model_info: Gauge
    shadow_abs_diff: Histogram
    model_load_failures: Counter
    rekeyed: Counter
    duplicates: Counter
    label_wait: Histogram
    partition_stalled: Counter
    consumer_position: Gauge
    assigned_partitions: Gauge

    def serve(self, host: str, port: int) -> None:
        """Expose ``/metrics`` on ``host:port`` (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)
        logger.info("metrics on http://%s:%d/metrics", host, port)


def build_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Create every metric on ``registry`` (a new one by default)."""
    reg = registry or CollectorRegistry()
    return Metrics(
        registry=reg,
        messages_in=Counter("rtpipe_messages_in", "Messages consumed", ["stage"], registry=reg),
        messages_out=Counter(
            "rtpipe_messages_out", "Messages produced", ["stage", "topic"], registry=reg
        ),
        dlq=Counter(
            "rtpipe_dlq", "Messages sent to a dead-letter topic", ["stage", "reason"], registry=reg
        ),
        batch_size=Histogram(
            "rtpipe_batch_size",
            "Messages per micro-batch",
            ["stage"],
            buckets=_BATCH_BUCKETS,
            registry=reg,
        ),
        batch_seconds=Histogram(
            "rtpipe_batch_processing_seconds",
            "Processing time per micro-batch",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        ),
        commit_phase=Histogram(
            "rtpipe_commit_phase_seconds",
            "Time a stage's loop waits in each step of its exactly-once commit (COMMIT_PHASES)",
            ["stage", "phase"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        ),
        consumer_lag=Gauge(
            "rtpipe_consumer_lag_messages",
            "Consumer lag per partition",
            ["stage", "topic", "partition"],
            registry=reg,
        ),
        rebalances=Counter(
            "rtpipe_rebalances",
            "Partition assignments and revocations",
            ["stage", "kind"],
            registry=reg,
        ),
        stage_latency=Histogram(
            "rtpipe_stage_latency_seconds",
            "Event time to this stage's output",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        ),
        event_to_decision=Histogram(
            "rtpipe_event_to_decision_seconds",
            "Kafka event timestamp of the transaction to its routed decision",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        ),
        decisions=Counter(
            "rtpipe_decisions", "Routed decisions", ["decision", "reason"], registry=reg
        ),
        feature_age=Histogram(
            "rtpipe_feature_age_seconds",
            "Event time minus the feature row's event timestamp",
            ["view"],
            buckets=_AGE_BUCKETS,
            registry=reg,
        ),
        feature_missing=Counter(
            "rtpipe_feature_missing",
            "Entity rows not found in the online store",
            ["view"],
            registry=reg,
        ),
        inexact_windows=Counter(
            "rtpipe_enrichment_inexact_windows",
            "Events whose windows may be incomplete (arrived later than the state keeps)",
            ["view"],
            registry=reg,
        ),
        feature_source=Counter(
            "rtpipe_feature_source",
            "Served feature rows by source: the online store, or "
            "the event's own aggregates when the store already holds a later row",
            ["view", "source"],
            registry=reg,
        ),
        score=Histogram(
            "rtpipe_prediction_score",
            "Model scores",
            ["model_version"],
            buckets=_SCORE_BUCKETS,
            registry=reg,
        ),
        predictions=Counter(
            "rtpipe_predictions",
            "Predictions per model version",
            ["model", "model_version"],
            registry=reg,
        ),
        model_info=Gauge(
            "rtpipe_model_info",
            "1 for the model version in use",
            ["model", "model_version", "feature_service"],
            registry=reg,
        ),
        shadow_abs_diff=Histogram(
            "rtpipe_shadow_abs_diff",
            "Mean |shadow score - served score| per batch",
            ["shadow_version"],
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=reg,
        ),
        model_load_failures=Counter(
            "rtpipe_model_load_failures",
            "Model versions that failed to verify or load",
            ["model", "reason"],
            registry=reg,
        ),
        rekeyed=Counter(
            "rtpipe_rekeyed",
            "Records whose key or partition did not match the entity in their payload, "
            "re-keyed by that entity",
            ["topic", "reason"],
            registry=reg,
        ),
        duplicates=Counter(
            "rtpipe_duplicates",
            "Records of a transaction id already seen (same content): not counted again",
            ["stage"],
            registry=reg,
        ),
        label_wait=Histogram(
            "rtpipe_label_wait_seconds",
            "Time a prediction batch waited for the label index to reach its events' time",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        ),
        partition_stalled=Counter(
            "rtpipe_partition_stalled",
            "Times an assigned partition had lag and made no progress for the stall timeout",
            ["stage", "topic", "partition"],
            registry=reg,
        ),
        consumer_position=Gauge(
            "rtpipe_consumer_position",
            "Next offset to consume per assigned partition (with the lag: stall alerts)",
            ["stage", "topic", "partition"],
            registry=reg,
        ),
        assigned_partitions=Gauge(
            "rtpipe_assigned_partitions",
            "Input partitions this process holds in its consumer group (readiness: a group "
            "is serving when its members hold every partition of its inputs)",
            ["stage", "group"],
            registry=reg,
        ),
    )


class Assignment:
    """The input partitions one consumer holds, kept from its rebalance callbacks (eager or
    cooperative: a set, so a repeated or incremental callback counts right) and exported
    as ``rtpipe_assigned_partitions``."""

    def __init__(self, metrics: Metrics, stage: str, group: str, topics: Iterable[str]) -> None:
        self._gauge = metrics.assigned_partitions.labels(stage, group)
        self._topics = frozenset(topics)
        self._held: set[tuple[str, int]] = set()
        self._gauge.set(0)

    def assigned(self, partitions: Iterable[Any]) -> None:
        self._held |= {(p.topic, p.partition) for p in partitions if p.topic in self._topics}
        self._gauge.set(len(self._held))

    def revoked(self, partitions: Iterable[Any]) -> None:
        self._held -= {(p.topic, p.partition) for p in partitions}
        self._gauge.set(len(self._held))

    def clear(self) -> None:
        """The consumer is gone (closed, or replaced after a fatal error)."""
        self._held.clear()
        self._gauge.set(0)
