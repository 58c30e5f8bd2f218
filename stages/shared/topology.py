"""The pipeline's stages in one table: each stage's entry point, consumer groups with their
input topics, output topics and whether it is on the decision path.

The CLI (``rtpipe run``), the ops harness (demo, chaos, bench: which stages to start, when
they are ready), the lag probes (stages/ops/run_charts/sampling.py), Prometheus' scrape config
and the stages themselves read their topology here, so a new stage or topic is named once.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from stages.shared.settings import StageName

if TYPE_CHECKING:
    from stages.shared.kafka import StopFlag
    from stages.shared.metrics import Metrics
    from stages.shared.settings import Settings


class StageRunner(Protocol):
    """A stage's entry point: runs until ``stop`` is set (SIGTERM/SIGINT)."""

    def __call__(
        self, settings: Settings, stop: StopFlag, metrics: Metrics | None = None
    ) -> object: ...


@dataclass(frozen=True)
class StageSpec:
    """One stage of the table."""

    name: StageName
    # "module:function" with the StageRunner signature; imported only when the stage runs
    # (the stages' imports are heavy and differ: quixstreams, LightGBM).
    entry: str
    # Consumer group (full id) -> its input topics (full names).
    groups: Callable[[Settings], dict[str, tuple[str, ...]]]
    outputs: Callable[[Settings], tuple[str, ...]]
    # Between an event and its decision (the demo, chaos and bench start these; evaluation
    # joins predictions with delayed labels beside that path).
    decision_path: bool
    # "module:function" called (without arguments) before the entry point is imported: a
    # set-up its imports depend on. The prediction stage imports LightGBM without the
    # scikit-learn it serves no estimator of (stages/shared/lgbm.py).
    preload: str | None = None

    def load(self) -> StageRunner:
        """The stage's runner, imported after its :attr:`preload` (if any) has run."""
        if self.preload is not None:
            _resolve(self.preload)()
        runner: StageRunner = _resolve(self.entry)
        return runner


def _resolve(target: str) -> Any:
    """The object a ``"module:name"`` string names (the module imported)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _enrichment_groups(s: Settings) -> dict[str, tuple[str, ...]]:
    t = s.topics
    return {
        t.group(s.enrichment.consumer_group): (t.name("transactions"),),
        t.group(s.enrichment.labels_consumer_group): (t.name("labels"),),
    }


def _enrichment_outputs(s: Settings) -> tuple[str, ...]:
    t = s.topics
    # Transactions keyed by something else than their customer go back to their own topic,
    # rekeyed (stages/enrichment/intake.py).
    return (
        t.name("enriched"),
        t.name("transactions"),
        t.dlq(t.name("transactions")),
        t.dlq(t.name("labels")),
    )


def _prediction_groups(s: Settings) -> dict[str, tuple[str, ...]]:
    return {s.topics.group(s.prediction.consumer_group): (s.topics.name("enriched"),)}


def _prediction_outputs(s: Settings) -> tuple[str, ...]:
    t = s.topics
    return (t.name("predictions"), t.dlq(t.name("enriched")))


def _routing_groups(s: Settings) -> dict[str, tuple[str, ...]]:
    return {s.topics.group(s.routing.consumer_group): (s.topics.name("predictions"),)}


def _routing_outputs(s: Settings) -> tuple[str, ...]:
    t = s.topics
    return (*t.decision_topics(), t.dlq(t.name("predictions")))


def _evaluation_groups(s: Settings) -> dict[str, tuple[str, ...]]:
    t = s.topics
    return {t.group(s.evaluation.consumer_group): (t.name("predictions"), t.name("labels"))}


def retrain_requests_topic(s: Settings) -> str:
    """Where the evaluation stage asks for retraining and the retrain job listens."""
    return f"{s.topics.prefix}{s.evaluation.retrain_topic}"


def _evaluation_outputs(s: Settings) -> tuple[str, ...]:
    return (retrain_requests_topic(s),)


STAGE_TABLE: dict[StageName, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            "enrichment",
            "stages.enrichment.supervise:run_stage",
            _enrichment_groups,
            _enrichment_outputs,
            decision_path=True,
        ),
        StageSpec(
            "prediction",
            "stages.prediction.app:run",
            _prediction_groups,
            _prediction_outputs,
            decision_path=True,
            preload="stages.shared.lgbm:import_lightgbm_without_sklearn",
        ),
        StageSpec(
            "routing",
            "stages.routing.app:run",
            _routing_groups,
            _routing_outputs,
            decision_path=True,
        ),
        StageSpec(
            "evaluation",
            "stages.evaluation.app:run",
            _evaluation_groups,
            _evaluation_outputs,
            decision_path=False,
        ),
    )
}

# Every stage, and those between an event and its decision, in pipeline order.
STAGES: tuple[StageName, ...] = tuple(STAGE_TABLE)
PIPELINE_STAGES: tuple[StageName, ...] = tuple(n for n, s in STAGE_TABLE.items() if s.decision_path)


def stage_groups(settings: Settings, stage: StageName) -> dict[str, tuple[str, ...]]:
    """Each consumer group of a stage (full id) with its input topics (full names)."""
    return STAGE_TABLE[stage].groups(settings)


def stage_outputs(settings: Settings, stage: StageName) -> tuple[str, ...]:
    """The topics a stage writes (full names), dead letters included."""
    return STAGE_TABLE[stage].outputs(settings)


def single_group(settings: Settings, stage: StageName) -> tuple[str, tuple[str, ...]]:
    """The consumer group and input topics of a stage that has one group."""
    [(group, topics)] = stage_groups(settings, stage).items()
    return group, topics
