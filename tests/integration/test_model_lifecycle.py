"""Model lifecycle against the real stack: hot-swap on promotion without a restart (no event
lost or scored twice, each decision records its version), shadow scoring, canary slices."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from stages.ops.audit import read_topic
from stages.ops.harness.outcomes import drain
from stages.ops.harness.processes import start_stages, stop_stages
from stages.ops.harness.sandbox import isolated_settings, register_tiny_model
from stages.ops.replay import ReplayPlan, replay
from stages.prediction.logic import stable_fraction
from stages.shared.feast_store import apply_repo
from stages.shared.kafka import ensure_topics
from stages.shared.settings import Settings
from training import registry
from training.simulate import SimulatorConfig, simulate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tx() -> pd.DataFrame:
    return simulate(
        SimulatorConfig(n_customers=120, n_terminals=250, nb_days=45, seed=11), progress=False
    )


def _prepare(base: Settings, tmp: Path, tx: pd.DataFrame, **prediction: object) -> Settings:
    settings = isolated_settings(base, tmp)
    settings = settings.model_copy(
        update={
            "prediction": settings.prediction.model_copy(
                update={"reload_interval_s": 0.2, "max_wait_ms": 5, **prediction}
            )
        }
    )
    apply_repo(settings)
    ensure_topics(settings.kafka, settings.topics)
    return settings


def _run(
    settings: Settings,
    tx: pd.DataFrame,
    plan: ReplayPlan,
    rate: float | None,
    then: tuple[Callable[[], None], ReplayPlan] | None = None,
) -> tuple[list[int], list[dict[str, object]]]:
    """Replay ``plan`` through the three stages and wait until every transaction is decided;
    with ``then``, call its function and replay its plan after that."""

    expected = plan.transaction_ids(tx)
    procs = start_stages(settings)
    try:
        replay(settings, tx, plan, rate=rate)
        report = drain(settings, expected)
        if then is not None:
            between, second = then
            between()
            replay(settings, tx, second, rate=rate)
            expected += second.transaction_ids(tx)
            report = drain(settings, expected)
    finally:
        codes = stop_stages(procs)
    assert codes == {"enrichment": 0, "prediction": 0, "routing": 0}
    assert report.lost == [] and report.duplicated == []
    decisions = [
        orjson.loads(v)
        for t in settings.topics.decision_topics()
        for _, v, _ in read_topic(settings, t)
    ]
    return expected, decisions


def test_promotion_is_hot_swapped_between_batches(
    unique_topics: Settings, tx: pd.DataFrame, tmp_path: Path
) -> None:
    settings = _prepare(unique_topics, tmp_path, tx)
    v1 = register_tiny_model(settings, tx, num_trees=10, seed=1)
    v2 = register_tiny_model(settings, tx, promote=False, num_trees=30, seed=2)
    name = settings.prediction.model_name
    start = pd.Timestamp("2018-05-01", tz="UTC")
    first = ReplayPlan(start, start + pd.Timedelta(days=1))
    second = ReplayPlan(first.end, first.end + pd.Timedelta(days=1), label_lookback_days=0)

    def promote() -> None:
        # Mid-stream: the first day is decided, the stage keeps running; the second day
        # follows once the stage has had time to notice (reload interval 0.2 s).
        registry.promote(settings.registry_dir, name, v2)
        time.sleep(2.0)

    _, decisions = _run(settings, tx, first, rate=150.0, then=(promote, second))
    by_time = sorted(decisions, key=lambda d: d["ts"]["predicted_ms"])  # type: ignore[index]
    versions = [d["model_version"] for d in by_time]
    assert set(versions) == {v1, v2}
    # One prediction process: once v2 serves, v1 never serves again.
    first_v2 = versions.index(v2)
    assert all(v == v2 for v in versions[first_v2:])


def test_shadow_scores_every_row_and_canary_takes_a_stable_slice(
    unique_topics: Settings, tx: pd.DataFrame, tmp_path: Path
) -> None:
    settings = _prepare(
        unique_topics,
        tmp_path,
        tx,
        shadow_version="v0002",
        canary_version="v0002",
        canary_fraction=0.3,
    )
    v1 = register_tiny_model(settings, tx, num_trees=10, seed=1)
    v2 = register_tiny_model(settings, tx, promote=False, num_trees=30, seed=2)
    assert (v1, v2) == ("v0001", "v0002")
    start = pd.Timestamp("2018-05-01", tz="UTC")
    plan = ReplayPlan(start, start + pd.Timedelta(days=2))
    _, decisions = _run(settings, tx, plan, rate=None)

    ids = np.array([d["transaction_id"] for d in decisions], dtype=np.int64)
    in_canary = stable_fraction(ids) < 0.3
    versions = np.array([d["model_version"] for d in decisions])
    assert (versions[in_canary] == v2).all()
    assert (versions[~in_canary] == v1).all()
    assert 0.2 < in_canary.mean() < 0.4
    for d in decisions:
        shadow = d["shadow"]
        assert shadow["model_version"] == v2  # type: ignore[index]
        if d["model_version"] == v2:
            # A canary row is scored by the candidate: its shadow score is the same model.
            assert shadow["score"] == pytest.approx(d["score"])  # type: ignore[index]
