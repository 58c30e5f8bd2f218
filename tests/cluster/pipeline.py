"""What the cluster pipeline tests share: isolated settings on the cluster stack (topics on
three replicas), the replay window, the checks every run ends with (each transaction exactly one
outcome; served features equal to the batch definitions) and the longest time without
decisions."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from stages.ops.audit import AuditReport, audit, read_topic
from stages.ops.harness.outcomes import drain
from stages.ops.harness.processes import StageProcess, start_stage, start_stages, stop_stages
from stages.ops.harness.readiness import wait_until_ready
from stages.ops.harness.sandbox import isolated_settings as support_isolated_settings
from stages.ops.replay import ReplayPlan, replay
from stages.shared.schemas import MODEL_FEATURES
from stages.shared.settings import Settings, TopicSettings
from stages.shared.topology import PIPELINE_STAGES
from training.features import compute_features

REPO = Path(__file__).resolve().parents[2]
REPLAY_START = pd.Timestamp("2018-05-05", tz="UTC")


def isolated_settings(base: Settings, tmp: Path) -> Settings:
    """:func:`tests.support.isolated_settings` with topics and groups of their own, the
    topics replicated on the three brokers (min.insync.replicas 2)."""
    settings = support_isolated_settings(base, tmp)
    return settings.model_copy(
        update={
            "topics": TopicSettings(prefix=f"t{uuid.uuid4().hex[:10]}.", replication_factor=3),
            "prediction": base.prediction.model_copy(update={"reload_interval_s": 0.5}),
        }
    )


def replay_plan(days: float) -> ReplayPlan:
    """``days`` from :data:`REPLAY_START`, with 30 days of warm-up history."""
    return ReplayPlan(REPLAY_START, REPLAY_START + pd.Timedelta(days=days), history_days=30)


def wait_for_outcomes(
    settings: Settings, expected: list[int], procs: list[StageProcess], timeout_s: float
) -> AuditReport:
    """Audit until every transaction has an outcome, the timeout passes or a stage dies
    (which fails the test, unless every transaction had its outcome)."""
    report = drain(settings, expected, procs, timeout_s, every_s=2.0)
    dead = [f"{sp.name}.{sp.replica}" for sp in procs if sp.proc.poll() is not None]
    assert not (report.lost and dead), (
        f"stage replica(s) died: {dead}; logs in {procs[0].log.parent}"
    )
    return report


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


def longest_decision_gap(settings: Settings, since_ms: int = 0, until_ms: int | None = None) -> Gap:
    """From the ``ts.routed_ms`` the routing stage stamps on every decision (its Kafka
    timestamp is the event time), over the decisions routed at or after ``since_ms``;
    ``until_ms`` (a run that did not drain) counts the time after the last one too."""
    routed = []
    for topic in settings.topics.decision_topics():
        for _, value, _ in read_topic(settings, topic):
            ms = (orjson.loads(value).get("ts") or {}).get("routed_ms") if value else None
            if isinstance(ms, int) and ms >= since_ms:
                routed.append(ms)
    n = len(routed)
    if until_ms is not None:
        routed.append(until_ms)
    if len(routed) < 2:
        return Gap(0.0, routed[0] if routed else 0, n)
    arr = np.sort(np.asarray(routed, dtype=np.int64))
    gaps = np.diff(arr)
    i = int(np.argmax(gaps))
    return Gap(float(gaps[i]) / 1000.0, int(arr[i]), n)


# -- faults ---------------------------------------------------------------------------------

_LEADER = re.compile(r"\[RaftManager id=(\d+)\] Completed transition to Leader\(.*?epoch=(\d+)")
_FOLLOWER = re.compile(
    r"Completed transition to FollowerState\(fetchTimeoutMs=\d+, epoch=(\d+), leader=(\d+)"
)


def active_controller(stack_settings: Settings) -> int:
    """The KRaft quorum's leader (the active controller), from the nodes' Raft logs: the
    leader of the newest epoch any node has logged. (A KRaft broker's metadata answer names
    a random broker as "controller", and the quorum tool is not in the jars the stack
    fetches.)"""
    from infra import stack

    best: tuple[int, int] | None = None
    for node in stack.kafka_nodes(stack_settings):
        text = node.log.read_text(errors="replace") if node.log.is_file() else ""
        for m in _LEADER.finditer(text):
            cand = (int(m.group(2)), int(m.group(1)))
            best = cand if best is None or cand > best else best
        for m in _FOLLOWER.finditer(text):
            cand = (int(m.group(1)), int(m.group(2)))
            best = cand if best is None or cand > best else best
    assert best is not None, "no Raft leader in the Kafka logs"
    return best[1]


def node_pid(stack_settings: Settings, name: str) -> int:
    """The PID of the cluster stack's node ``name`` (``kafka-2``, ``redis-30701``)."""
    return int((stack_settings.run_dir / f"{name}.pid").read_text().split()[0])


def kill9(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (the stack's nodes each lead their own
    session) and wait until it is gone (or a zombie, for its parent to reap)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still alive 10 s after SIGKILL")


def redis_masters(stack_settings: Settings, exclude: tuple[int, ...] = ()) -> list[int]:
    """Ports of the Redis Cluster's masters not flagged failed, as the first node that
    answers (and is not in ``exclude``) sees them."""
    import redis

    from infra import stack

    for node in stack.redis_nodes(stack_settings):
        if node.port in exclude:
            continue
        try:
            client = redis.Redis(port=node.port, socket_timeout=2, socket_connect_timeout=1)
            nodes = client.execute_command("CLUSTER", "NODES")
        except redis.RedisError:
            continue
        text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
        out = []
        for line in text.splitlines():
            parts = line.split()
            if "master" in parts[2] and "fail" not in parts[2] and len(parts) > 8:
                out.append(int(parts[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(out)
    raise AssertionError("no Redis Cluster node answers")


def wait_failover(stack_settings: Settings, dead: int, timeout_s: float = 60) -> float:
    """Wait until a replica has replaced the dead master ``dead`` (no longer a master for
    the other nodes, as many masters as before) and every other node reports
    ``cluster_state:ok``; returns the wait. (Right after the kill the state is still ok:
    the nodes mark a master failed only after ``cluster-node-timeout``, 5 s.)"""
    from infra import stack
    from infra.stack.health import cluster_info

    others = [n.port for n in stack.redis_nodes(stack_settings) if n.port != dead]
    masters = stack_settings.stack.redis_cluster_masters
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        now = redis_masters(stack_settings, exclude=(dead,))
        ok = all(cluster_info(stack_settings, p).get("cluster_state") == "ok" for p in others)
        if ok and dead not in now and len(now) == masters:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"no failover of Redis master {dead} within {timeout_s:.0f}s")


def wait_serving(settings: Settings, name: str, replica: int, timeout_s: float = 120) -> float:
    """Wait until every process of a stage replica serves /metrics (the stages serve it
    once their clients are built and their loop runs: their readiness signal)."""
    import urllib.error
    import urllib.request

    from stages.ops.harness.processes import replica_settings

    ports = replica_settings(settings, replica).metrics.ports(name)  # type: ignore[arg-type]
    started = time.monotonic()
    for port in ports:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() - started < timeout_s, f"{name}.{replica} not serving"
                time.sleep(0.2)
    return time.monotonic() - started


class StreamRun:
    """The pipeline (``replicas`` processes of each stage) under a rate-limited replay in a
    thread, so that a fault lands mid-stream; then drain, stop and the checks."""

    def __init__(
        self, settings: Settings, tx: pd.DataFrame, plan: ReplayPlan, rate: float, replicas: int
    ) -> None:
        self.settings = settings
        self.tx = tx
        self.plan = plan
        self.rate = rate
        self.expected = plan.transaction_ids(tx)
        self.procs: dict[tuple[str, int], StageProcess] = {}
        self.replicas = replicas
        self.events: list[str] = []
        self.started = time.monotonic()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.stream_start_ms = 0
        self._watch: Any = None

    def log(self, what: str) -> None:
        self.events.append(f"{time.monotonic() - self.started:6.1f}s {what}")

    def start(self, names: tuple[str, ...] = PIPELINE_STAGES) -> None:
        for sp in start_stages(self.settings, names, replicas=self.replicas):
            self.procs[(sp.name, sp.replica)] = sp
        waited = wait_until_ready(self.settings, list(self.procs.values()), timeout_s=150)
        self.log(f"stages ready after {waited:.1f}s")

        def work() -> None:
            try:
                replay(self.settings, self.tx, self.plan, rate=self.rate)
            except BaseException as exc:  # reported by finish()
                self._error = exc

        self.stream_start_ms = int(time.time() * 1000)
        self._thread = threading.Thread(target=work, name="cluster-replay", daemon=True)
        self._thread.start()
        self.log(f"replay of {len(self.expected)} transactions at {self.rate:.0f}/s")

    def decided(self) -> int:
        """Records in the decision topics (watermarks; transaction markers included)."""
        from confluent_kafka import Consumer, KafkaException, TopicPartition

        if self._watch is None:
            self._watch = Consumer(
                {**self.settings.kafka.client_config(), "group.id": f"w-{uuid.uuid4().hex}"}
            )
        total = 0
        for topic in self.settings.topics.decision_topics():
            for p in range(self.settings.topics.partitions):
                try:
                    low, high = self._watch.get_watermark_offsets(
                        TopicPartition(topic, p), timeout=5
                    )
                except KafkaException:
                    return total
                total += high - low
        return total

    def wait_decided(self, fraction: float, timeout_s: float = 180) -> None:
        target = fraction * len(self.expected)
        deadline = time.monotonic() + timeout_s
        while self.decided() < target:
            assert time.monotonic() < deadline, f"not {fraction:.0%} decided in {timeout_s}s"
            time.sleep(0.2)
        self.log(f"{fraction:.0%} decided")

    def restart(self, name: str, replica: int) -> StageProcess:
        sp = start_stage(self.settings, name, replica)
        self.procs[(name, replica)] = sp
        return sp

    def finish(self, drain_timeout_s: float = 240) -> AuditReport:
        """Wait for the replay and every outcome, stop the stages (SIGTERM), audit."""
        assert self._thread is not None
        self._thread.join(timeout=len(self.expected) / self.rate + 180)
        assert not self._thread.is_alive() and self._error is None, f"replay: {self._error}"
        self.log("replay done")
        running = [sp for sp in self.procs.values() if sp.proc.poll() is None]
        report = wait_for_outcomes(self.settings, self.expected, running, drain_timeout_s)
        self.log(f"drained: {len(report.lost)} without outcome")
        if self._watch is not None:
            self._watch.close()
        self.stop()
        return audit(self.settings, self.expected)

    def stop(self) -> None:
        running = [sp for sp in self.procs.values() if sp.proc.poll() is None]
        if running:
            stop_stages(running)
