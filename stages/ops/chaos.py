"""``rtpipe chaos``: fault injection against the real local stack, each fault followed by an
audit (lost = 0, duplicated = 0 over every transaction id, read_committed) and a check that
the online features equal the batch recomputation.

Each fault runs on its own topics (a prefix), consumer groups, Feast project, registry and
state, with the three stages as separate ``rtpipe run`` processes and a rate-limited replay of
a few thousand simulated transactions, so that the fault lands mid-stream:

=================  =============================================================================
kill-enrichment    ``kill -9`` of the stage at random moments (3 times), restarted each time
kill-prediction    the same for the prediction stage
kill-routing       the same for the routing stage
rebalance          two prediction replicas in one group; one is killed mid-stream
redis-pause        Redis stopped for 30 s, ``on_features_unavailable=pause`` (backpressure)
redis-review       the same with ``on_features_unavailable=review`` (decisions.review,
                   reason features_unavailable)
redis-pause-short  Redis stopped for 3 s (pause): a blip inside one checkpoint's retries
redis-review-short the same in review mode
kafka-restart      the Kafka broker stopped and started again mid-stream
bad-model          a version failing its sha256, then one that does not load, promoted in turn
=================  =============================================================================

The outages start at a random point of the stream, so they land at a checkpoint or between
two. The full set (``rtpipe chaos``) runs each Redis and broker fault ``repeats`` times in a
row (3), the last time while another process keeps a core busy (``cpu_load_last``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import pandas as pd

from stages.ops.audit import AuditReport, FeatureCheck, audit, check_online_features
from stages.ops.harness.outcomes import drain
from stages.ops.harness.processes import (
    StageProcess,
    exited,
    kill9,
    start_stage,
    start_stages,
    stop_stages,
)
from stages.ops.harness.sandbox import isolated_settings, provision
from stages.ops.replay import ReplayPlan, replay
from stages.shared.settings import Settings
from training.simulate import SimulatorConfig

logger = logging.getLogger(__name__)

Fault = Literal[
    "kill-enrichment",
    "kill-prediction",
    "kill-routing",
    "rebalance",
    "redis-pause",
    "redis-review",
    "redis-pause-short",
    "redis-review-short",
    "kafka-restart",
    "bad-model",
]
FAULTS: tuple[Fault, ...] = get_args(Fault)
# Faults of the Redis and Kafka servers: repeated in the full set, the last time under load.
REPEATED: frozenset[str] = frozenset(
    {"redis-pause", "redis-review", "redis-pause-short", "redis-review-short", "kafka-restart"}
)

REPO = Path(__file__).resolve().parents[2]


# Few customers over more days: as many transactions, but fewer of the labels that the
# replay sends first (five weeks of them, for complete terminal windows).
CHAOS_DATA = SimulatorConfig(n_customers=500, n_terminals=1_000, nb_days=48, seed=11)


@dataclass(frozen=True)
class ChaosConfig:
    """Size and pace of each scenario (small, so that all faults run in minutes)."""

    data: SimulatorConfig = CHAOS_DATA
    replay_start: str = "2018-05-05"
    replay_days: float = 3.0
    # Transactions per second: a few thousand last ~20 s, so the stages work on a stream.
    rate: float = 150.0
    kills: int = 3
    redis_outage_s: float = 30.0
    short_outage_s: float = 3.0
    kafka_down_s: float = 5.0
    # Runs of each fault in REPEATED, and whether the last runs beside a CPU-bound process.
    repeats: int = 3
    cpu_load_last: bool = True
    drain_timeout_s: float = 300.0
    seed: int = 0


@dataclass
class FaultResult:
    """What one fault did and what the audit found afterwards."""

    fault: str
    transactions: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    features_checked: dict[str, int] = field(default_factory=dict)
    features_missing: dict[str, int] = field(default_factory=dict)
    features_mismatched: dict[str, int] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    # Seconds from starting the stages to the first decision (start-up, join, first event).
    first_decision_s: float | None = None
    # The longest time between two consecutive decisions while the replay ran (seconds).
    longest_gap_s: float | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.transactions > 0
            and self.lost == 0
            and self.duplicated == 0
            and not any(self.features_missing.values())
            and not any(self.features_mismatched.values())
            and all(self.checks.values())
        )


@dataclass
class ChaosReport:
    """Every fault's result; ``ok`` when all passed."""

    results: list[FaultResult]
    seconds: float

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "results": [{**asdict(r), "ok": r.ok} for r in self.results],
        }

    def lines(self) -> list[str]:
        """One line per fault, for the console."""
        out = []
        for r in self.results:
            feats = ", ".join(
                f"{v}: {r.features_checked.get(v, 0)} checked, "
                f"{r.features_mismatched.get(v, 0)} mismatched, "
                f"{r.features_missing.get(v, 0)} missing"
                for v in r.features_checked
            )
            failed = [k for k, v in r.checks.items() if not v]
            timing = (
                f"first decision {r.first_decision_s:.1f}s  longest gap {r.longest_gap_s:.1f}s  "
                if r.first_decision_s is not None and r.longest_gap_s is not None
                else ""
            )
            out.append(
                f"{'PASS' if r.ok else 'FAIL'} {r.fault:<16} tx {r.transactions:>5}  "
                f"lost {r.lost}  duplicated {r.duplicated}  {timing}[{feats}]  {r.seconds:.0f}s"
                + (f"  failed checks: {failed}" if failed else "")
                + (f"  error: {r.error}" if r.error else "")
            )
        out.append(f"{'PASS' if self.ok else 'FAIL'} all faults in {self.seconds:.0f}s")
        return out


# -- set-up ---------------------------------------------------------------------------------


def _isolated(base: Settings, root: Path, name: str, **prediction: object) -> Settings:
    """Own topics, groups, Feast project, feature repo copy, registry and state."""
    home = root / name
    s = isolated_settings(base, home, name="chaos", home=home, own_topics=True)
    return s.model_copy(
        update={
            "prediction": s.prediction.model_copy(update={"reload_interval_s": 0.5, **prediction})
        }
    )


class _Run:
    """One fault scenario: stages, a replay in a thread, the fault, drain, audit."""

    def __init__(
        self,
        settings: Settings,
        stack_settings: Settings,
        tx: pd.DataFrame,
        cfg: ChaosConfig,
        result: FaultResult,
    ) -> None:
        self.settings = settings
        # The stack's own settings (its run dir holds the Kafka and Redis PID files).
        self.stack_settings = stack_settings
        self.tx = tx
        self.cfg = cfg
        self.result = result
        begin = pd.Timestamp(cfg.replay_start, tz="UTC")
        self.plan = ReplayPlan(begin, begin + pd.Timedelta(days=cfg.replay_days))
        self.expected = self.plan.transaction_ids(tx)
        self.procs: dict[str, list[StageProcess]] = {}
        self.started = time.monotonic()
        # Wall-clock ms when the first stage was started (the start-up measure's origin).
        self.stages_started_ms: int | None = None
        self.report: AuditReport | None = None
        self._replay_error: BaseException | None = None
        self._watermarks: Any = None
        self._replay_thread: threading.Thread | None = None

    @property
    def replay_s(self) -> float:
        """Expected duration of the rate-limited replay."""
        return len(self.expected) / self.cfg.rate

    def produced(self, topics: list[str]) -> int:
        """Records in ``topics`` (high minus low watermarks, transaction markers included):
        cheap, and close enough to say how far a stage has got."""
        from confluent_kafka import Consumer, KafkaException, TopicPartition

        if self._watermarks is None:
            self._watermarks = Consumer(
                {**self.settings.kafka.client_config(), "group.id": f"chaos-{uuid.uuid4().hex}"}
            )
        total = 0
        for topic in topics:
            for p in range(self.settings.topics.partitions):
                try:
                    low, high = self._watermarks.get_watermark_offsets(
                        TopicPartition(topic, p), timeout=2
                    )
                except KafkaException:  # broker down (kafka-restart): no progress to report
                    return 0
                total += high - low
        return total

    def wait_progress(self, topics: list[str], fraction: float, timeout_s: float = 180) -> None:
        """Block until ``topics`` hold ``fraction`` of the expected transactions: a fault
        timed this way lands while the stage is working, whatever the start-up took."""
        target = fraction * len(self.expected)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.produced(topics) >= target:
                return
            time.sleep(0.2)
        self.log(f"no progress to {fraction:.0%} of {topics} within {timeout_s:.0f}s")

    def output_topics(self, stage: str) -> list[str]:
        t = self.settings.topics
        if stage == "enrichment":
            return [t.name("enriched")]
        if stage == "prediction":
            return [t.name("predictions")]
        return list(t.decision_topics())

    def log(self, what: str) -> None:
        line = f"{time.monotonic() - self.started:6.1f}s {what}"
        self.result.events.append(line)
        logger.info("chaos %s: %s", self.result.fault, line)

    def start(self, name: str, settings: Settings | None = None) -> StageProcess:
        if self.stages_started_ms is None:
            self.stages_started_ms = int(time.time() * 1000)
        sp = start_stages(settings or self.settings, (name,))[0]
        self.procs.setdefault(name, []).append(sp)
        return sp

    def all_procs(self) -> list[StageProcess]:
        return [sp for group in self.procs.values() for sp in group]

    def running(self) -> list[StageProcess]:
        return [sp for sp in self.all_procs() if sp.proc.poll() is None]

    def start_replay(self) -> None:
        def work() -> None:
            try:
                replay(self.settings, self.tx, self.plan, rate=self.cfg.rate)
            except BaseException as exc:  # reported by finish_replay
                self._replay_error = exc

        self._replay_thread = threading.Thread(target=work, name="chaos-replay", daemon=True)
        self._replay_thread.start()
        self.log(f"replay of {len(self.expected)} transactions at {self.cfg.rate:.0f}/s")

    def finish_replay(self) -> None:
        assert self._replay_thread is not None
        self._replay_thread.join(timeout=self.replay_s + 180)
        if self._replay_thread.is_alive() or self._replay_error is not None:
            raise RuntimeError(f"replay failed: {self._replay_error or 'timed out'}")
        self.log("replay done")

    def drain(self) -> AuditReport:
        """Poll the audit until every transaction has an outcome (or the timeout, or a
        stage died)."""
        return drain(
            self.settings,
            self.expected,
            self.running_expected(),
            self.cfg.drain_timeout_s,
            every_s=3.0,
        )

    def running_expected(self) -> list[StageProcess]:
        """The newest process of each stage name, which should be running."""
        return [group[-1] for group in self.procs.values()]

    def conclude(self) -> None:
        """Stop the stages (SIGTERM), audit and check the online features."""
        self.result.checks["stages_alive_until_drained"] = not exited(self.running_expected())
        if self._watermarks is not None:
            self._watermarks.close()
            self._watermarks = None
        codes = stop_stages(self.running())
        self.result.checks["graceful_shutdown"] = all(c == 0 for c in codes.values())
        self.log(f"stopped stages: {codes}")
        report = audit(self.settings, self.expected)
        r = self.result
        r.transactions = report.expected
        r.lost = len(report.lost)
        r.duplicated = len(report.duplicated)
        r.unexpected = len(report.unexpected)
        r.reasons = {
            f"{topic.removeprefix(self.settings.topics.prefix)}:{reason}": n
            for topic, rec in report.per_topic.items()
            for reason, n in rec.reasons.items()
        }
        self.report = report
        times = report.decision_times_ms()
        if len(times) and self.stages_started_ms is not None:
            r.first_decision_s = (int(times[0]) - self.stages_started_ms) / 1000.0
            r.longest_gap_s = report.longest_gap_s()
        fc: FeatureCheck = check_online_features(
            self.settings, self.tx, self.plan.start, self.plan.end
        )
        r.features_checked = fc.entities
        r.features_missing = {v: len(ids) for v, ids in fc.missing.items()}
        r.features_mismatched = {v: len(ids) for v, ids in fc.mismatched.items()}
        self.log(
            f"audit: lost {r.lost}, duplicated {r.duplicated}; features {r.features_mismatched}"
        )
        # Which ones (the first few): where to look in the topics and the stage logs.
        if report.lost:
            self.log(f"lost transaction ids: {sorted(report.lost)[:10]}")
        if report.duplicated:
            self.log(f"duplicated transaction ids: {sorted(report.duplicated)[:10]}")
        for view, ids in fc.mismatched.items():
            if ids:
                self.log(f"{view} rows that differ, entity ids: {sorted(ids)[:10]}")
        if r.lost or r.duplicated or not all(r.checks.values()):
            # What the stages said, in the report itself: a failure in CI is diagnosable
            # from its output alone (the logs stay in the run dir).
            for sp in self.all_procs():
                for line in log_digest(sp.log):
                    r.events.append(f"  [{sp.log.name}] {line}")

    def begin(self, names: tuple[str, ...] = ("enrichment", "prediction", "routing")) -> None:
        for name in names:
            self.start(name)
        self.start_replay()


_DIGEST = re.compile(
    r"(ERROR|WARNING|CRITICAL) (stages|quixstreams)\.|^Traceback|^Thread 0x|^Current thread"
    r"|^  File |Error: "
)
# librdkafka's connection chatter, forwarded by quixstreams' client loggers.
_CHATTER = re.compile(r"rdkafka#|brokers are down|Kafka (producer|consumer) error: ")


def log_digest(path: Path, max_lines: int = 30) -> list[str]:
    """The last ``max_lines`` lines of a stage log that say something went wrong: the
    stages' and quixstreams' warnings and errors, tracebacks and faulthandler stacks
    (librdkafka's own connection chatter left out)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return [f"unreadable: {exc}"]
    picked = [
        line[:300]
        for line in text.splitlines()
        if _DIGEST.search(line) and not _CHATTER.search(line)
    ]
    return picked[-max_lines:]


# -- the faults -----------------------------------------------------------------------------


def _random_fractions(rng: random.Random, n: int, span: float = 0.85) -> list[float]:
    """``n`` increasing progress fractions in ``(0, span)``: one random point per slice."""
    width = span / n
    return [i * width + rng.uniform(0.1, 0.9) * width for i in range(n)]


def _kill_stage(run: _Run, stage: str, rng: random.Random) -> None:
    run.begin()
    for fraction in _random_fractions(rng, run.cfg.kills):
        # Killed once its output reaches a random point of the stream: mid-batch, mid-
        # transaction or mid-checkpoint, wherever it happens to be.
        run.wait_progress(run.output_topics(stage), fraction)
        kill9(run.procs[stage][-1])
        run.log(f"kill -9 {stage} (pid {run.procs[stage][-1].proc.pid}) at {fraction:.0%}")
        time.sleep(rng.uniform(0.2, 2.0))
        sp = run.start(stage)
        run.log(f"restarted {stage} (pid {sp.proc.pid})")
    run.finish_replay()


def _rebalance(run: _Run, rng: random.Random) -> None:
    run.start("enrichment")
    run.start("routing")
    first = run.start("prediction")
    replica = start_stage(run.settings, "prediction", replica=1)
    run.procs["prediction-2"] = [replica]
    run.start_replay()
    run.wait_progress(run.output_topics("prediction"), rng.uniform(0.2, 0.5))
    victim = rng.choice([first, replica])
    kill9(victim)
    run.log(f"kill -9 one of two prediction replicas (pid {victim.proc.pid})")
    # The survivor must take over the victim's partitions; the victim stays dead.
    for name, group in run.procs.items():
        if victim in group:
            group.remove(victim)
            run.procs[name] = group or []
    run.procs = {k: v for k, v in run.procs.items() if v}
    run.finish_replay()


def _redis_outage(run: _Run, rng: random.Random, short: bool = False) -> None:
    from infra import stack

    ss = run.stack_settings
    if stack.status(ss)["redis"].pid is None:
        raise RuntimeError(f"Redis is not managed from {ss.run_dir}: cannot stop it")
    run.begin()
    run.wait_progress(run.output_topics("prediction"), rng.uniform(0.1, 0.25))
    prediction = run.procs["prediction"][-1]
    # A short pause of the prediction stage leaves it a backlog of enriched events to face
    # while Redis is down (the enrichment stage stalls too: its sink needs Redis).
    os.killpg(prediction.proc.pid, signal.SIGSTOP)
    time.sleep(3.0)
    stack.down(ss, only=["redis"])
    os.killpg(prediction.proc.pid, signal.SIGCONT)
    run.log("Redis stopped (prediction paused 3 s before, to face a backlog)")
    outage_s = run.cfg.short_outage_s if short else run.cfg.redis_outage_s
    time.sleep(outage_s)
    run.result.checks["stages_alive_during_outage"] = not exited(run.running_expected())
    stack.up(ss, components=("redis",))
    run.log(f"Redis started again after {outage_s:.0f}s")
    run.finish_replay()


def _kafka_restart(run: _Run, rng: random.Random) -> None:
    from infra import stack

    ss = run.stack_settings
    if stack.status(ss)["kafka"].pid is None:
        raise RuntimeError(f"Kafka is not managed from {ss.run_dir}: cannot stop it")
    run.begin()
    run.wait_progress(run.output_topics("prediction"), rng.uniform(0.15, 0.4))
    stack.down(ss, only=["kafka"])
    run.log("Kafka stopped")
    time.sleep(run.cfg.kafka_down_s)
    stack.up(ss, components=("kafka",))
    run.log("Kafka started again")
    run.finish_replay()


def _metric(settings: Settings, name: str, labels: dict[str, str]) -> float:
    """A sample of the prediction stage's /metrics (0 if absent)."""
    url = f"http://{settings.metrics.host}:{settings.metrics.prediction_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
        if got == want:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _bad_model(run: _Run, rng: random.Random, good_version: str) -> None:
    from training import registry

    s = run.settings
    name = s.prediction.model_name
    run.begin()
    run.wait_progress(run.output_topics("prediction"), rng.uniform(0.1, 0.25))
    # 1. A version whose model.txt no longer matches its recorded sha256.
    good = registry.get_version(s.registry_dir, name, good_version)
    tampered = registry.register(
        s.registry_dir, name, good.model_path.read_text(), dict(good.metadata)
    )
    with tampered.model_path.open("a") as fh:
        fh.write("\n# altered\n")
    registry.promote(s.registry_dir, name, tampered.version)
    run.log(f"promoted {tampered.version} (model.txt altered after registration)")
    time.sleep(3.0)
    # 2. A version with a valid checksum that LightGBM cannot load.
    broken = registry.register(s.registry_dir, name, "tree\nnot a model\n", dict(good.metadata))
    registry.promote(s.registry_dir, name, broken.version)
    run.log(f"promoted {broken.version} (checksum fine, not a model)")
    time.sleep(3.0)
    labels = {"model": name}
    run.result.checks["integrity_failure_counted"] = (
        _metric(s, "rtpipe_model_load_failures_total", {**labels, "reason": "integrity"}) >= 1
    )
    run.result.checks["load_failure_counted"] = (
        _metric(s, "rtpipe_model_load_failures_total", {**labels, "reason": "load"}) >= 1
    )
    serving = {**labels, "model_version": good_version}
    serving["feature_service"] = str(good.metadata["feature_service"])
    run.result.checks["still_serving_good_version"] = _metric(s, "rtpipe_model_info", serving) == 1
    run.finish_replay()


def _served_versions(run: _Run) -> set[str]:
    from stages.ops.audit import read_topic

    versions = set()
    for topic in run.settings.topics.decision_topics():
        for _k, value, _h in read_topic(run.settings, topic):
            if value:
                versions.add(str(json.loads(value).get("model_version")))
    return versions


def _cpu_burner() -> subprocess.Popen[bytes]:
    """A process that keeps one core busy until killed (the machine under load)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


# -- entry point ----------------------------------------------------------------------------


def run_chaos(
    settings: Settings,
    faults: list[str] | None = None,
    out: Path | None = None,
    config: ChaosConfig | None = None,
    progress: Callable[[FaultResult], None] | None = None,
) -> ChaosReport:
    """Run fault scenarios against the local stack and audit each one.

    Args:
        settings: the stack to use (Kafka and Redis are started if they are not running;
            the Kafka and Redis faults need them to be managed from ``settings.run_dir``).
        faults: names from ``FAULTS``; None runs them all.
        out: write the report here as JSON (and keep the stage logs next to it).
        config: scenario sizes and pacing.
        progress: called with each fault's result as soon as it is known.

    Returns:
        The report; ``report.ok`` is True when every fault passed.

    Raises:
        ValueError: an unknown fault name.
    """
    from infra import stack
    from training.simulate import simulate

    cfg = config or ChaosConfig()
    chosen = list(FAULTS) if faults is None else faults
    unknown = [f for f in chosen if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown faults {unknown}; choose from {list(FAULTS)}")
    started_at = time.monotonic()
    stack.up(settings, components=("kafka", "redis"))
    root = (settings.home / "chaos" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    base = settings.model_copy(update={"feature_repo": settings.feature_repo.resolve()})
    tx = simulate(cfg.data, progress=False)
    rng = random.Random(cfg.seed)
    results: list[FaultResult] = []
    runs: list[tuple[str, str, bool]] = []
    for fault in chosen:
        n = cfg.repeats if fault in REPEATED else 1
        for k in range(n):
            loaded = cfg.cpu_load_last and n > 1 and k == n - 1
            label = fault if n == 1 else f"{fault}#{k + 1}" + (" (CPU load)" if loaded else "")
            runs.append((fault, label, loaded))
    for fault, label, loaded in runs:
        burner = _cpu_burner() if loaded else None
        result = FaultResult(label)
        t0 = time.monotonic()
        extra: dict[str, object] = {}
        if fault.startswith("redis-review"):
            extra["on_features_unavailable"] = "review"
        elif fault.startswith("redis-pause"):
            extra["on_features_unavailable"] = "pause"
        s = _isolated(base, root, label.replace("#", "-").split(" ")[0], **extra)
        run = _Run(s, settings, tx, cfg, result)
        try:
            version = provision(s, tx[tx["tx_datetime"] < run.plan.start])
            if fault.startswith("kill-"):
                _kill_stage(run, fault.removeprefix("kill-"), rng)
            elif fault == "rebalance":
                _rebalance(run, rng)
            elif fault.startswith("redis-"):
                _redis_outage(run, rng, short=fault.endswith("-short"))
            elif fault == "kafka-restart":
                _kafka_restart(run, rng)
            elif fault == "bad-model":
                _bad_model(run, rng, version)
            drained = run.drain()
            run.log(f"drained: {len(drained.lost)} without outcome")
            run.conclude()
            assert run.report is not None
            reasons = run.report.per_topic[s.topics.name("review")].reasons
            if fault == "redis-review":
                result.checks["reviewed_features_unavailable"] = (
                    reasons.get("features_unavailable", 0) > 0
                )
            elif fault.startswith("redis-pause"):
                result.checks["no_features_unavailable"] = "features_unavailable" not in reasons
            if fault == "bad-model":
                result.checks["only_good_version_served"] = _served_versions(run) == {version}
        except Exception as exc:
            logger.exception("chaos %s failed", fault)
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            if burner is not None:
                burner.kill()
                burner.wait()
            leftover = run.running()
            if leftover:
                stop_stages(leftover)
            # A fault must not leave the stack down for the next one.
            stack.up(settings, components=("kafka", "redis"))
        result.seconds = time.monotonic() - t0
        results.append(result)
        if progress:
            progress(result)
    report = ChaosReport(results, time.monotonic() - started_at)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**report.to_dict(), "work_dir": str(root)}, indent=2))
    return report
