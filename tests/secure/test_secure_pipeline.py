"""The pipeline end to end over the secure stack: every client on SASL_SSL (SCRAM-SHA-512)
or TLS with an ACL user, with what the stack wrote into its run dir and nothing else:
quixstreams' and the batch loops' consumers and transactional producers, the admin clients,
the raw RESP transport (feature reads and writes, the label index, the claims), Feast's own
client through its connection string. Every transaction gets exactly one outcome and the
served features equal the batch definitions. With ``RTPIPE_CLUSTER_FULL=1`` the same on the
secure cluster stack (three brokers, a Redis Cluster with TLS on its bus)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.ops.harness.processes import PIPELINE_STAGES, start_stages, stop_stages
from stages.ops.harness.readiness import wait_until_ready
from stages.ops.harness.sandbox import isolated_settings, provision
from stages.ops.replay import replay
from stages.shared.feast_store import open_feature_store
from stages.shared.online.transport import transport_for
from stages.shared.schemas import CUSTOMER_FEATURES, CUSTOMER_VIEW, MODEL_FEATURES
from stages.shared.settings import Settings
from tests.cluster.pipeline import replay_plan, served_feature_mismatches, wait_for_outcomes

pytestmark = pytest.mark.integration


def _run_pipeline(base: Settings, tx: pd.DataFrame, tmp: Path, replicas: int = 1) -> None:
    started = time.monotonic()
    settings = isolated_settings(base, tmp, own_topics=True)
    if base.stack.kafka_brokers > 1:
        settings = settings.model_copy(
            update={"topics": settings.topics.model_copy(update={"replication_factor": 3})}
        )
    assert settings.kafka.security_protocol == "SASL_SSL"
    assert settings.redis.ssl and settings.redis.username == "rtpipe"
    provision(settings, tx)
    # The fast path stays fast over TLS: raw RESP on redis-py's TLS connections.
    kind = "cluster" if base.redis.cluster else "raw"
    assert transport_for(settings.redis.client()).kind == kind
    plan = replay_plan(days=1)
    expected = plan.transaction_ids(tx)
    assert len(expected) > 100

    procs = start_stages(settings, PIPELINE_STAGES, replicas=replicas)
    try:
        ready_s = wait_until_ready(settings, procs, timeout_s=120)
        result = replay(settings, tx, plan)
        assert result.transactions == len(expected)
        report = wait_for_outcomes(settings, expected, procs, timeout_s=120)
    finally:
        codes = stop_stages(procs)

    assert report.lost == []
    assert report.duplicated == []
    assert report.unexpected == []
    decided = sum(report.per_topic[t].count for t in settings.topics.decision_topics())
    assert decided == len(expected)
    assert set(codes.values()) == {0}, codes
    assert served_feature_mismatches(settings, tx) == dict.fromkeys(MODEL_FEATURES, 0)

    # Feast's own client (its connection string: user, password, TLS, the stack's CA) reads
    # the rows the enrichment stage wrote.
    window = tx[(tx["tx_datetime"] >= plan.start) & (tx["tx_datetime"] < plan.end)]
    customers = sorted(window["customer_id"].unique().tolist())[:5]
    refs = [f"{CUSTOMER_VIEW}:{name}" for name in CUSTOMER_FEATURES]
    rows = (
        open_feature_store(settings)
        .get_online_features(features=refs, entity_rows=[{"customer_id": c} for c in customers])
        .to_dict()
    )
    counts = np.asarray(rows["customer_nb_tx_30d"], dtype=object)
    assert all(v is not None and v >= 1 for v in counts), rows
    print(
        f"secure pipeline: {len(expected)} transactions, ready {ready_s:.1f}s, "
        f"all checked {time.monotonic() - started:.1f}s after start"
    )


def test_pipeline_over_the_secure_stack(
    secure_stack: Settings, small_tx: pd.DataFrame, tmp_path: Path
) -> None:
    _run_pipeline(secure_stack, small_tx, tmp_path)


def test_pipeline_over_the_secure_cluster_stack(
    secure_cluster: Settings, small_tx: pd.DataFrame, tmp_path: Path
) -> None:
    _run_pipeline(secure_cluster, small_tx, tmp_path, replicas=2)
