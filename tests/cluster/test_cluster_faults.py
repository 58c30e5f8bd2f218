"""Faults on the cluster stack under a rate-limited replay, two replicas of every pipeline
stage, each run audited: no transaction lost or duplicated (read_committed, every id), every
served feature equal to the batch definitions. Each run records the longest time without
decisions (wall clock between consecutive ``ts.routed_ms``, from the stream's start; for a
run that does not drain, up to its end) in ``.rtpipe/cluster-30100/faults.jsonl``.

Default suite: one replica of each stage killed with SIGKILL. With
``RTPIPE_CLUSTER_FULL=1``: a Redis master killed (its replica takes over), a rolling restart
of every replica, and a broker killed and restarted, either one that is not the active
controller or the active controller.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from infra import stack
from stages.ops.harness.processes import kill9 as kill9_stage
from stages.ops.harness.readiness import wait_until_ready
from stages.ops.harness.sandbox import register_tiny_model
from stages.shared.feast_store import apply_repo
from stages.shared.kafka import ensure_topics
from stages.shared.schemas import MODEL_FEATURES
from stages.shared.settings import Settings
from stages.shared.topology import PIPELINE_STAGES
from tests.cluster.pipeline import (
    Gap,
    StreamRun,
    active_controller,
    isolated_settings,
    kill9,
    longest_decision_gap,
    node_pid,
    redis_masters,
    replay_plan,
    served_feature_mismatches,
    wait_failover,
    wait_serving,
)
from tests.support import CLUSTER_FULL as FULL
from tests.support import CLUSTER_HOME

pytestmark = pytest.mark.integration

REPLICAS = 2
# Where each run's numbers are appended (one JSON line per fault).
RESULTS = CLUSTER_HOME / "faults.jsonl"


@pytest.fixture
def cluster(kafka_cluster: Settings, redis_cluster: Settings) -> Settings:
    """The stack's own settings (its run dir holds the nodes' PID files)."""
    return kafka_cluster


def run_fault(
    stack_settings: Settings,
    tx: pd.DataFrame,
    tmp: Path,
    name: str,
    fault: Callable[[StreamRun], None],
    *,
    days: float = 3.0,
    rate: float = 30.0,
) -> tuple[StreamRun, Gap]:
    """A stream with ``fault`` injected once a quarter of it is decided; audited."""
    settings = isolated_settings(stack_settings, tmp)
    apply_repo(settings)
    register_tiny_model(settings, tx)
    ensure_topics(settings.kafka, settings.topics)
    run = StreamRun(settings, tx, replay_plan(days), rate, REPLICAS)
    started = time.monotonic()
    try:
        run.start()
        run.wait_decided(0.25)
        fault(run)
        report = run.finish()
    finally:
        run.stop()
        # A fault must not leave the stack down for the next test.
        stack.up(stack_settings, components=("kafka", "redis"))
    # A run that did not drain: the time from its last decision to the end counts too.
    gap = longest_decision_gap(
        settings, run.stream_start_ms, int(time.time() * 1000) if report.lost else None
    )
    mismatches = served_feature_mismatches(settings, tx)
    record = {
        "fault": name,
        "transactions": len(run.expected),
        "lost": len(report.lost),
        "duplicated": len(report.duplicated),
        "feature_mismatches": sum(mismatches.values()),
        "longest_without_decisions_s": round(gap.seconds, 2),
        "seconds": round(time.monotonic() - started, 1),
        "events": run.events,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=1))
    explain = "\n".join(run.events)
    assert report.lost == [], explain
    assert report.duplicated == [], explain
    assert report.unexpected == []
    assert mismatches == dict.fromkeys(MODEL_FEATURES, 0), explain
    # Every replica still running (or restarted) stopped cleanly on SIGTERM.
    codes = {k: sp.proc.returncode for k, sp in run.procs.items()}
    assert all(c in (0, -9) for c in codes.values()), codes
    return run, gap


def kill_and_restart_broker(stack_settings: Settings, node_id: int, down_s: float = 5.0):
    def fault(run: StreamRun) -> None:
        node = stack.kafka_nodes(stack_settings)[node_id - 1]
        kill9(node_pid(stack_settings, node.name))
        run.log(f"kill -9 {node.name}")
        time.sleep(down_s)
        t0 = time.monotonic()
        stack.up(stack_settings, components=("kafka",))
        run.log(f"{node.name} restarted, cluster healthy after {time.monotonic() - t0:.1f}s")

    return fault


@pytest.mark.skipif(not FULL, reason="long variant: RTPIPE_CLUSTER_FULL=1")
def test_broker_killed_and_restarted(cluster: Settings, small_tx: pd.DataFrame, tmp_path: Path):
    """SIGKILL of a broker that is not the active controller, restarted 5 s later."""
    controller = active_controller(cluster)
    victim = next(n for n in (1, 2, 3) if n != controller)
    _, gap = run_fault(
        cluster,
        small_tx,
        tmp_path,
        f"kill -9 broker {victim} (controller {controller})",
        kill_and_restart_broker(cluster, victim),
    )
    assert gap.seconds < 60


@pytest.mark.skipif(not FULL, reason="long variant: RTPIPE_CLUSTER_FULL=1")
def test_active_controller_killed_and_restarted(
    cluster: Settings, small_tx: pd.DataFrame, tmp_path: Path
) -> None:
    controller = active_controller(cluster)
    run, gap = run_fault(
        cluster,
        small_tx,
        tmp_path,
        f"kill -9 active controller {controller}",
        kill_and_restart_broker(cluster, controller),
    )
    assert active_controller(cluster) != controller or any("restarted" in e for e in run.events)
    assert gap.seconds < 60


@pytest.mark.skipif(not FULL, reason="long variant: RTPIPE_CLUSTER_FULL=1")
def test_redis_master_killed_replica_takes_over(
    cluster: Settings, small_tx: pd.DataFrame, tmp_path: Path
) -> None:
    masters_before = redis_masters(cluster)
    victim = masters_before[0]

    def fault(run: StreamRun) -> None:
        kill9(node_pid(cluster, f"redis-{victim}"))
        run.log(f"kill -9 Redis master {victim}")
        waited = wait_failover(cluster, victim)
        masters = redis_masters(cluster, exclude=(victim,))
        run.log(f"replica promoted, cluster_state ok after {waited:.1f}s, masters {masters}")
        time.sleep(3.0)
        stack.up(cluster, components=("redis",))
        run.log(f"redis-{victim} restarted (rejoins as a replica)")

    _, gap = run_fault(cluster, small_tx, tmp_path, f"kill -9 Redis master {victim}", fault)
    masters_after = redis_masters(cluster)
    assert victim not in masters_after and len(masters_after) == 3, masters_after
    assert gap.seconds < 60


def test_one_replica_of_each_stage_killed(
    cluster: Settings, small_tx: pd.DataFrame, tmp_path: Path
) -> None:
    """The survivors take the partitions over (after the static members' 6 s session
    timeout); the killed replicas stay dead."""

    def fault(run: StreamRun) -> None:
        for i, name in enumerate(PIPELINE_STAGES):
            sp = run.procs[(name, i % REPLICAS)]
            kill9_stage(sp)
            run.log(f"kill -9 {name} replica {sp.replica}")

    _, gap = run_fault(cluster, small_tx, tmp_path, "kill -9 one replica of each stage", fault)
    assert gap.seconds < 60


@pytest.mark.skipif(not FULL, reason="long variant: RTPIPE_CLUSTER_FULL=1")
def test_rolling_restart_of_every_replica(
    cluster: Settings, small_tx: pd.DataFrame, tmp_path: Path
) -> None:
    """SIGTERM, restart with the same instance id, wait until its groups are stable, next."""

    def fault(run: StreamRun) -> None:
        for name in PIPELINE_STAGES:
            for replica in range(REPLICAS):
                old = run.procs[(name, replica)]
                old.proc.terminate()
                code = old.proc.wait(60)
                run.restart(name, replica)
                waited = wait_serving(run.settings, name, replica)
                # Its groups are whole again: every input partition held, summed over the
                # replicas (one replica alone holds only its share).
                waited += wait_until_ready(run.settings, list(run.procs.values()))
                run.log(f"{name} replica {replica} restarted (exit {code}), ready {waited:.1f}s")
                assert code == 0

    _, gap = run_fault(cluster, small_tx, tmp_path, "rolling restart", fault, days=4.0, rate=12.0)
    assert gap.seconds < 60
