"""What the cluster pipeline tests share: isolated settings on the cluster stack (topics on
three replicas), the data set, the checks every run ends with (each transaction exactly one
outcome; served features equal to the batch definitions) and the longest time without
decisions."""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from stages.ops.audit import AuditReport, audit, read_topic
from stages.ops.demo import StageProcess
from stages.ops.replay import ReplayPlan
from stages.shared.schemas import MODEL_FEATURES
from stages.shared.settings import Settings, TopicSettings
from training.features import compute_features
from training.simulate import SimulatorConfig, simulate

REPO = Path(__file__).resolve().parents[2]
REPLAY_START = pd.Timestamp("2018-05-05", tz="UTC")


def small_data_set(n_customers: int = 150, n_terminals: int = 300) -> pd.DataFrame:
    """The simulated transactions the cluster runs replay (50 days)."""
    return simulate(
        SimulatorConfig(n_customers=n_customers, n_terminals=n_terminals, nb_days=50, seed=7),
        progress=False,
    )


def isolated_settings(base: Settings, tmp: Path) -> Settings:
    """Own feature repo copy, registry, state, Feast project, topics and groups (the topics
    replicated on the three brokers, min.insync.replicas 2)."""
    repo = tmp / "feature_repo"
    repo.mkdir()
    for f in REPO.joinpath("feature_repo").iterdir():
        if f.is_file():
            shutil.copy(f, repo / f.name)
    return base.model_copy(
        update={
            "home": tmp / "home",
            "feature_repo": repo,
            "feast_project": f"p{uuid.uuid4().hex[:8]}",
            "topics": TopicSettings(prefix=f"t{uuid.uuid4().hex[:10]}.", replication_factor=3),
            "prediction": base.prediction.model_copy(update={"reload_interval_s": 0.5}),
        }
    )


def replay_plan(days: float) -> ReplayPlan:
    """``days`` from :data:`REPLAY_START`, with 30 days of warm-up history."""
    return ReplayPlan(REPLAY_START, REPLAY_START + pd.Timedelta(days=days), history_days=30)


def expected_ids(tx: pd.DataFrame, plan: ReplayPlan) -> list[int]:
    sel = (tx["tx_datetime"] >= plan.start) & (tx["tx_datetime"] < plan.end)
    return tx.loc[sel, "transaction_id"].tolist()


def wait_for_outcomes(
    settings: Settings, expected: list[int], procs: list[StageProcess], timeout_s: float
) -> AuditReport:
    """Audit until every transaction has an outcome, the timeout passes or a stage dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        report = audit(settings, expected)
        if not report.lost or time.monotonic() > deadline:
            return report
        dead = [f"{sp.name}.{sp.replica}" for sp in procs if sp.proc.poll() is not None]
        assert not dead, f"stage replica(s) died: {dead}; logs in {procs[0].log.parent}"
        time.sleep(2.0)


def served_feature_mismatches(settings: Settings, tx: pd.DataFrame) -> dict[str, int]:
    """Per model feature, predictions whose served value differs from the batch definition
    (``training.features.compute_features`` over the whole history; the replay warmed the
    customer windows up and sent the labels of the 37 days before)."""
    preds = [
        orjson.loads(v) for _, v, _ in read_topic(settings, settings.topics.name("predictions"))
    ]
    ids = [p["transaction_id"] for p in preds]
    assert len(set(ids)) == len(ids), "a transaction was predicted twice (committed)"
    served = pd.DataFrame([p["features"] for p in preds], index=ids)
    full = compute_features(tx).set_index("transaction_id").loc[ids]
    out = {}
    for name in MODEL_FEATURES:
        got = served[name].to_numpy(np.float64)
        want = full[name].to_numpy(np.float64)
        out[name] = int((~np.isclose(got, want, rtol=0, atol=1e-9)).sum())
    return out


@dataclass(frozen=True)
class Gap:
    """The longest time between two consecutive routing decisions (wall clock)."""

    seconds: float
    after_ms: int  # the decision before the gap
    decisions: int


def longest_decision_gap(settings: Settings, since_ms: int = 0) -> Gap:
    """From the ``ts.routed_ms`` the routing stage stamps on every decision (its Kafka
    timestamp is the event time), over the decisions routed at or after ``since_ms``."""
    routed = []
    for topic in settings.topics.decision_topics():
        for _, value, _ in read_topic(settings, topic):
            ms = (orjson.loads(value).get("ts") or {}).get("routed_ms") if value else None
            if isinstance(ms, int) and ms >= since_ms:
                routed.append(ms)
    if len(routed) < 2:
        return Gap(0.0, routed[0] if routed else 0, len(routed))
    arr = np.sort(np.asarray(routed, dtype=np.int64))
    gaps = np.diff(arr)
    i = int(np.argmax(gaps))
    return Gap(float(gaps[i]) / 1000.0, int(arr[i]), len(arr))
