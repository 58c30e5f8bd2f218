"""The stage table (stages/shared/topology.py): every entry point exists with the one
runner signature, and the groups and topics it names are the ones the settings define."""

from __future__ import annotations

import inspect
import itertools

import pytest

from stages.shared.settings import Settings, TopicSettings
from stages.shared.topology import (
    PIPELINE_STAGES,
    STAGE_TABLE,
    STAGES,
    retrain_requests_topic,
    single_group,
    stage_groups,
    stage_outputs,
)


@pytest.fixture
def settings() -> Settings:
    return Settings().model_copy(update={"topics": TopicSettings(prefix="x.")})


@pytest.mark.parametrize("stage", STAGES)
def test_entry_point_has_the_runner_signature(stage: str) -> None:
    runner = STAGE_TABLE[stage].load()  # type: ignore[index]
    params = list(inspect.signature(runner).parameters.values())
    assert [p.name for p in params[:3]] == ["settings", "stop", "metrics"]
    assert params[2].default is None
    # Anything after the three is optional, so the CLI's call works for every stage.
    assert all(p.default is not inspect.Parameter.empty for p in params[2:])


def test_order_and_decision_path() -> None:
    assert STAGES == ("enrichment", "prediction", "routing", "evaluation")
    assert PIPELINE_STAGES == ("enrichment", "prediction", "routing")


def test_each_stage_reads_what_the_one_before_writes(settings: Settings) -> None:
    for upstream, downstream in itertools.pairwise(PIPELINE_STAGES):
        _, inputs = single_group(settings, downstream)
        assert set(inputs) <= set(stage_outputs(settings, upstream)), (upstream, downstream)
    # Evaluation joins the predictions with the labels the enrichment stage also reads.
    [(_, evaluated)] = stage_groups(settings, "evaluation").items()
    assert set(evaluated) == {"x.predictions", "x.labels"}


def test_names_come_from_the_settings(settings: Settings) -> None:
    groups = stage_groups(settings, "enrichment")
    assert groups == {
        settings.topics.group(settings.enrichment.consumer_group): ("x.transactions",),
        settings.topics.group(settings.enrichment.labels_consumer_group): ("x.labels",),
    }
    assert single_group(settings, "routing") == (
        settings.topics.group(settings.routing.consumer_group),
        ("x.predictions",),
    )
    assert set(settings.topics.decision_topics()) <= set(stage_outputs(settings, "routing"))
    assert retrain_requests_topic(settings) == f"x.{settings.evaluation.retrain_topic}"
    assert stage_outputs(settings, "evaluation") == (retrain_requests_topic(settings),)


def test_single_group_refuses_a_stage_with_two() -> None:
    with pytest.raises(ValueError):
        single_group(Settings(), "enrichment")
