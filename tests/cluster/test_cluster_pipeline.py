"""The whole pipeline on the cluster stack (three KRaft brokers, topics on three replicas with
min.insync.replicas 2; Redis Cluster of three masters): two replicas of every stage (static
members, stable transactional ids), a replay with warm-up history, and the same audit as the
single-node pipeline test: every transaction exactly one outcome, served features equal to
the batch definitions for every feature. Also what else touches Redis: the evaluation
stage's join, ``rtpipe audit``, the skew check, clearing a project's online rows."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
import pandas as pd
import pytest
from confluent_kafka import Producer

from stages.ops.harness.processes import PIPELINE_STAGES, child_env, start_stages, stop_stages
from stages.ops.harness.readiness import wait_until_ready
from stages.ops.harness.sandbox import clear_online_store, register_tiny_model
from stages.ops.offline import skew_check
from stages.ops.replay import replay
from stages.shared.feast_store import apply_repo
from stages.shared.kafka import ensure_topics, producer_config
from stages.shared.schemas import DAY_MS, LABEL_DELAY_DAYS, MODEL_FEATURES
from stages.shared.settings import Settings
from tests.cluster.pipeline import (
    isolated_settings,
    replay_plan,
    served_feature_mismatches,
    wait_for_outcomes,
)
from training.features import event_ms
from training.simulate import write_dataset

pytestmark = pytest.mark.integration

REPLICAS = 2


def produce_window_labels(settings: Settings, tx: pd.DataFrame, ids: list[int]) -> None:
    """The labels of the replayed transactions, as they would arrive a week later: for the
    evaluation stage to join with their predictions."""
    rows = tx.set_index("transaction_id").loc[ids].reset_index()
    tx_ms = event_ms(rows["tx_datetime"])
    producer = Producer(producer_config(settings.kafka))
    topic = settings.topics.name("labels")
    for r, ms in zip(rows.itertuples(), tx_ms, strict=True):
        value = orjson.dumps(
            {
                "transaction_id": int(r.transaction_id),
                "customer_id": int(r.customer_id),
                "terminal_id": int(r.terminal_id),
                "tx_ms": int(ms),
                "is_fraud": int(r.is_fraud),
            }
        )
        producer.produce(
            topic,
            key=b"%d" % r.terminal_id,
            value=value,
            timestamp=int(ms) + LABEL_DELAY_DAYS * DAY_MS - 1,
        )
    assert producer.flush(30) == 0


def test_pipeline_on_the_cluster_with_two_replicas_per_stage(
    kafka_cluster: Settings, redis_cluster: Settings, small_tx: pd.DataFrame, tmp_path: Path
) -> None:
    started = time.monotonic()
    settings = isolated_settings(kafka_cluster, tmp_path)
    apply_repo(settings)
    register_tiny_model(settings, small_tx)
    ensure_topics(settings.kafka, settings.topics)
    plan = replay_plan(days=2)
    expected = plan.transaction_ids(small_tx)
    assert len(expected) > 300

    procs = start_stages(settings, (*PIPELINE_STAGES, "evaluation"), replicas=REPLICAS)
    try:
        ready_s = wait_until_ready(settings, procs, timeout_s=120)
        result = replay(settings, small_tx, plan)
        assert result.transactions == len(expected)
        report = wait_for_outcomes(settings, expected, procs, timeout_s=120)
        decided_s = time.monotonic() - started

        # The evaluation replicas join the labels that arrive a week later with their
        # predictions in the join store on the cluster (one hash-tagged slot).
        produce_window_labels(settings, small_tx, expected)
        client = settings.redis.client()
        window_key = f"rtpipe:eval:{{{settings.topics.group('evaluation')}}}:window"
        deadline = time.monotonic() + 60
        while client.llen(window_key) < len(expected) and time.monotonic() < deadline:
            time.sleep(1.0)
        joined = int(client.llen(window_key))
    finally:
        stop_stages(procs)

    assert report.lost == []
    assert report.duplicated == []
    assert report.unexpected == []
    decided = sum(report.per_topic[t].count for t in settings.topics.decision_topics())
    assert decided == len(expected)
    # Every replica exited 0 on SIGTERM.
    assert [sp.proc.returncode for sp in procs] == [0] * len(procs), [
        (sp.name, sp.replica, sp.proc.returncode) for sp in procs
    ]
    assert joined == len(expected)

    # Served features: equal to the batch definitions, every feature of every prediction
    # (customer rows read from the cluster, terminal windows counted over its label index).
    assert served_feature_mismatches(settings, small_tx) == dict.fromkeys(MODEL_FEATURES, 0)
    # What `rtpipe check-skew --no-offline` checks.
    skew = skew_check(settings, "2018-05-05", 2, offline=False, tx=small_tx, history_days=30)
    assert skew.ok, str(skew)

    # `rtpipe audit` from the command line, on the cluster settings.
    write_dataset(small_tx, settings.data_dir)
    cli = subprocess.run(
        [sys.executable, "-m", "stages.cli", "audit", "--start", "2018-05-05", "--days", "2"],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert f"expected {len(expected)}  lost 0  duplicated 0" in cli.stdout

    # The project's online rows and label index, spread over every primary, are cleared.
    assert clear_online_store(settings) > 0
    assert clear_online_store(settings) == 0
    print(
        f"cluster pipeline: {len(expected)} transactions, {REPLICAS} replicas per stage, "
        f"ready {ready_s:.1f}s, all decided {decided_s:.1f}s after start"
    )
