"""One fault's run (:class:`FaultRun`): its own sandbox, the stages as processes, a
rate-limited replay in a thread, then the drain, the audit and the online-feature check; and
the digest of a stage log that a failed run carries in its report."""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd

from stages.ops.audit import (
    AuditReport,
    FeatureCheck,
    audit,
    check_online_features,
    input_transaction_ids,
    pipeline_input,
    where_stopped,
)
from stages.ops.chaos.report import ChaosConfig, FaultResult
from stages.ops.harness.outcomes import drain
from stages.ops.harness.processes import StageProcess, exited, start_stages, stop_stages
from stages.ops.harness.readiness import wait_until_ready
from stages.ops.harness.sandbox import isolated_settings
from stages.ops.replay import ReplayPlan, build_events, replay
from stages.shared.settings import Settings

logger = logging.getLogger(__name__)


def fault_settings(base: Settings, root: Path, name: str, **prediction: object) -> Settings:
    """Own topics, groups, Feast project, feature repo copy, registry and state."""
    home = root / name
    s = isolated_settings(base, home, name="chaos", home=home, own_topics=True)
    return s.model_copy(
        update={
            "prediction": s.prediction.model_copy(update={"reload_interval_s": 0.5, **prediction})
        }
    )


class FaultRun:
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
        # What the pipeline was given: the expected ids found in its input topic once the
        # replay is done (see :meth:`drain`).
        self.delivered: list[int] = self.expected
        self.procs: dict[str, list[StageProcess]] = {}
        self.started = time.monotonic()
        # Wall-clock ms when the first stage was started (the start-up measure's origin).
        self.stages_started_ms: int | None = None
        # When the drain ended: with outcomes still missing, the time since the last
        # decision counts as time without decisions.
        self.drain_ended_ms: int | None = None
        # Replayed labels missing from the labels topic after the replay (see drain()).
        self.labels_lost: list[int] = []
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
        """Poll the audit until every transaction the input topic holds has an outcome (or
        the timeout, or a stage died). Replayed transactions missing from the input topic
        are logged as lost by the broker and left out of the pipeline's audit."""
        present = input_transaction_ids(self.settings, self.expected)
        self.delivered = [i for i in self.expected if i in present]
        missing = sorted(set(self.expected) - present)
        self.result.input_lost = len(missing)
        if missing:
            self.log(
                f"input lost by the broker: {len(missing)} acknowledged transactions are not in "
                f"{self.settings.topics.name('transactions')} (ids {missing[:10]})"
            )
        events = build_events(self.tx, self.plan)
        labels = events.loc[events["kind"] == 0, "transaction_id"].astype(int).tolist()
        self.labels_lost = sorted(
            set(labels) - input_transaction_ids(self.settings, labels, topic="labels")
        )
        self.result.labels_lost = len(self.labels_lost)
        if self.labels_lost:
            self.log(
                f"labels lost by the broker: {len(self.labels_lost)} acknowledged labels are not "
                f"in {self.settings.topics.name('labels')} (transaction ids "
                f"{self.labels_lost[:10]})"
            )
        report = drain(
            self.settings,
            self.delivered,
            self.running_expected(),
            self.cfg.drain_timeout_s,
            every_s=3.0,
        )
        self.drain_ended_ms = int(time.time() * 1000)
        return report

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
        report = audit(self.settings, self.delivered)
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
            r.longest_gap_s = report.longest_gap_s(
                until_ms=self.drain_ended_ms if report.lost else None
            )
        # The batch definitions over what the pipeline was given.
        given, inexpressible = pipeline_input(
            self.tx, self.plan.start, set(self.expected) - set(self.delivered), self.labels_lost
        )
        if inexpressible:
            self.log(
                f"lost labels of replayed transactions {inexpressible[:10]}: the batch "
                "recomputation still counts them as labelled"
            )
        fc: FeatureCheck = check_online_features(
            self.settings, given, self.plan.start, self.plan.end
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
            for line in where_stopped(self.settings, report.lost):
                self.log(f"without outcome, in {line}")
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
        """Start the stages and, once each holds its input partitions, the replay.

        Started beside the stages, the replay (985 transactions at 150/s: 6.6 s) was over
        before a slow start-up ended on a loaded machine (6.7 s in one CI run): the
        prediction stage then decided the whole backlog in three batches before the Redis
        outage began, which met no traffic at all. Each fault now lands during the replay
        whatever the start-up took (``first_decision_s`` still counts from the start).
        """
        for name in names:
            self.start(name)
        waited = wait_until_ready(self.settings, self.all_procs())
        self.log(f"stages ready after {waited:.1f}s")
        self.start_replay()


_DIGEST = re.compile(
    r"(ERROR|WARNING|CRITICAL) (stages|quixstreams)\.|^Traceback|^Thread 0x|^Current thread"
    r"|^  File |Error: "
    # When a stage process (re)started and its labels child came and went: whether a
    # watchdog restart took place, and when, is read from these.
    r"|INFO stages\.\S+: (metrics on |enrichment labels process )"
)
# librdkafka's connection chatter, forwarded by quixstreams' client loggers.
_CHATTER = re.compile(r"rdkafka#|brokers are down|Kafka (producer|consumer) error: ")
# A faulthandler stack lists each thread's innermost frames first; these say where it is.
STACK_FRAMES_KEPT = 3
_FRAME = re.compile(r'^  File "(?:.*/)?([^/"]+)", line (\d+) in (\S+)')


def log_digest(path: Path, max_lines: int = 30) -> list[str]:
    """The last ``max_lines`` lines of a stage log that say something went wrong: the
    stages' and quixstreams' warnings and errors, tracebacks, faulthandler stacks (a line
    per thread with its innermost ``STACK_FRAMES_KEPT`` frames, so one dump of every thread
    does not crowd out what was logged before it) and the lines that show a stage process
    starting (librdkafka's own connection chatter left out)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return [f"unreadable: {exc}"]
    picked: list[str] = []
    frames: int | None = None  # frames seen of the current faulthandler thread, if in one
    for line in text.splitlines():
        if not _DIGEST.search(line) or _CHATTER.search(line):
            frames = None
            continue
        frame = _FRAME.match(line)
        if line.startswith(("Thread 0x", "Current thread")):
            frames = 0
            picked.append(line.split(" (most recent call first)")[0] + ":")
            continue
        if frames is not None and frame is not None:
            frames += 1
            if frames <= STACK_FRAMES_KEPT:
                file, number, func = frame.groups()
                picked[-1] += f"{' <' if frames > 1 else ''} {func} ({file}:{number})"
            continue
        frames = None
        picked.append(line[:300])
    return picked[-max_lines:]
