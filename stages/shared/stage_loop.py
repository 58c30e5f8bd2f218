"""A stage's transactional batch loop wired to its metrics (rebalances, batch times, lag,
stalls, assigned partitions) and, for a stage with one consumer group, to the topology's
group and input topics (stages/shared/topology.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from stages.shared.batch_loop import BatchHandler, TransactionalBatchLoop
from stages.shared.metrics import Assignment, Metrics
from stages.shared.settings import Settings, StageName
from stages.shared.topology import single_group


def _export_lag(
    metrics: Metrics, stage: str, topic: str, partition: int, lag: int, position: int
) -> None:
    metrics.consumer_lag.labels(stage, topic, str(partition)).set(lag)
    metrics.consumer_position.labels(stage, topic, str(partition)).set(position)


def instrumented_loop(
    settings: Settings,
    metrics: Metrics,
    *,
    stage: str,
    group_id: str,
    input_topics: Sequence[str],
    handler: BatchHandler,
    max_batch: int,
    max_wait_ms: int,
    on_idle: Callable[[], None] | None = None,
    commit_interval_ms: int = 0,
) -> TransactionalBatchLoop:
    """A :class:`TransactionalBatchLoop` whose rebalances, batch and commit times and
    consumer lag are exported under ``stage``'s labels."""
    return TransactionalBatchLoop(
        settings,
        group_id=group_id,
        input_topics=input_topics,
        handler=handler,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        stage=stage,
        on_batch_done=lambda n, seconds: metrics.batch_seconds.labels(stage).observe(seconds),
        on_rebalance=lambda kind, parts: metrics.rebalances.labels(stage, kind).inc(),
        on_lag=lambda topic, part, lag, position: _export_lag(
            metrics, stage, topic, part, lag, position
        ),
        on_idle=on_idle,
        commit_interval_ms=commit_interval_ms,
        on_stall=lambda topic, part, offset: metrics.partition_stalled.labels(
            stage, topic, str(part)
        ).inc(),
        assignment=Assignment(metrics, stage, group_id, input_topics),
        on_commit_phase=lambda phase, seconds: metrics.commit_phase.labels(stage, phase).observe(
            seconds
        ),
    )


class Batching(Protocol):
    """A stage's micro-batch settings (PredictionSettings, RoutingSettings, ...)."""

    max_batch: int
    max_wait_ms: int


def stage_loop(
    settings: Settings,
    metrics: Metrics,
    stage: StageName,
    handler: BatchHandler,
    batching: Batching,
    on_idle: Callable[[], None] | None = None,
) -> TransactionalBatchLoop:
    """The instrumented loop of a stage with one consumer group, whose group and input
    topics are the topology's (stages/shared/topology.py)."""
    group_id, inputs = single_group(settings, stage)
    return instrumented_loop(
        settings,
        metrics,
        stage=stage,
        group_id=group_id,
        input_topics=list(inputs),
        handler=handler,
        max_batch=batching.max_batch,
        max_wait_ms=batching.max_wait_ms,
        on_idle=on_idle,
    )
