"""``rtpipe demo``: the local stack, the data set, Feast, a model, the three stages as
separate processes, a replay through Kafka and a summary of what came out.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
from confluent_kafka import Consumer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from stages.ops.audit import AuditReport, audit, read_topic
from stages.ops.latency import HOPS, TOTAL, DecisionCollector, decision_stats, ids_in, plans
from stages.ops.readiness import wait_until_ready
from stages.ops.replay import ReplayPlan, ReplayResult, replay, replay_producer
from stages.ops.report import MetricsSampler, render_live_latency, render_run_report
from stages.shared.kafka import ensure_topics
from stages.shared.procenv import drop_feast_prometheus_dirs
from stages.shared.schemas import CUSTOMER_VIEW, TERMINAL_VIEW
from stages.shared.settings import Settings, settings_to_env
from stages.shared.topology import PIPELINE_STAGES, STAGES
from training.skew import SkewReport

logger = logging.getLogger(__name__)
console = Console()

# The demo's live-rate phase, after the max-speed replay.
LIVE_RATE = 500.0
LIVE_SECONDS = 30.0
DEMO_STAGES = STAGES


@dataclass
class StageProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    # The replica's stable instance id (RTPIPE_INSTANCE_ID): a restart reuses it.
    replica: int = 0


def _env_for(settings: Settings) -> dict[str, str]:
    """Environment that rebuilds the same settings in a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTPIPE_")}
    drop_feast_prometheus_dirs(env)
    resolved = settings.model_copy(
        update={"home": settings.home.resolve(), "feature_repo": settings.feature_repo.resolve()}
    )
    env.update(settings_to_env(resolved))
    return env


def start_stage(settings: Settings, name: str, replica: int = 0) -> StageProcess:
    """Start one replica of a stage as its own ``rtpipe run STAGE`` process, logging to the
    run dir. Replica ``r`` is instance ``r`` of its consumer groups (static membership and a
    stable transactional id: restarted with the same number, it takes its partitions back
    at once and aborts what its predecessor left open) and serves metrics on its stage's
    ports plus ``100 * r``."""
    log_dir = settings.run_dir / "stages"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = _env_for(replica_settings(settings, replica))
    suffix = f".{replica}" if replica else ""
    log = log_dir / f"{settings.topics.prefix}{name}{suffix}.log"
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages.cli", "run", name],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return StageProcess(name, proc, log, replica)


def replica_settings(settings: Settings, replica: int) -> Settings:
    """``settings`` for replica ``replica`` of a stage (its instance id and metrics ports)."""
    m = settings.metrics
    step = 100 * replica
    return settings.model_copy(
        update={
            "instance_id": str(replica),
            "metrics": m.model_copy(
                update={
                    "enrichment_port": m.enrichment_port + step,
                    "prediction_port": m.prediction_port + step,
                    "routing_port": m.routing_port + step,
                    "evaluation_port": m.evaluation_port + step,
                    "enrichment_labels_port": m.enrichment_labels_port + step,
                }
            ),
        }
    )


def start_stages(
    settings: Settings, names: tuple[str, ...] = PIPELINE_STAGES, replicas: int = 1
) -> list[StageProcess]:
    """Start ``replicas`` processes of each stage (see :func:`start_stage`)."""
    return [start_stage(settings, name, r) for name in names for r in range(replicas)]


def stop_stages(procs: list[StageProcess], timeout_s: float = 30.0) -> dict[str, int | None]:
    """SIGTERM each stage, wait for a graceful exit, SIGKILL stragglers."""
    for sp in procs:
        if sp.proc.poll() is None:
            sp.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    codes: dict[str, int | None] = {}
    for sp in procs:
        try:
            codes[sp.name] = sp.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            # Its stacks into its log first (faulthandler, stages/cli.py): where it hung.
            sp.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
            sp.proc.kill()
            codes[sp.name] = sp.proc.wait()
            logger.error(
                "%s did not stop within %.0fs: killed (its stacks are in %s)",
                sp.name,
                timeout_s,
                sp.log,
            )
    return codes


def clear_online_store(settings: Settings) -> int:
    """Delete this project's online rows, so a replay starts from an empty online store
    (the writer never lets an older row replace a newer one left by an earlier run)."""
    client = settings.redis.client()
    deleted = 0
    project = settings.feast_project.encode()
    # Feast's rows end with the project; the label index's and the transaction claims'
    # keys start with it (stages/shared/labels.py, claims.py).
    patterns = (b"*" + project, b"{" + project + b":lbl:*", project + b":lbl:*")
    for pattern in (*patterns, b"{" + project + b":tx}:*"):
        batch = []
        for key in client.scan_iter(match=pattern, count=10_000):
            batch.append(key)
            if len(batch) >= 10_000:
                deleted += int(client.unlink(*batch))  # type: ignore[arg-type]
                batch.clear()
        if batch:
            deleted += int(client.unlink(*batch))  # type: ignore[arg-type]
    return deleted


class OutcomeWatcher:
    """Counts outcome records as they are committed, with one long-lived read_committed
    consumer (re-reading the topics on every poll would compete with the stages for CPU)."""

    def __init__(self, settings: Settings) -> None:
        t = settings.topics
        self._topics = [
            *t.decision_topics(),
            *(t.dlq(t.name(k)) for k in ("transactions", "enriched", "predictions")),
        ]
        self._consumer = Consumer(
            {
                **settings.kafka.client_config(),
                "group.id": f"rtpipe-watch-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
            }
        )
        self._consumer.subscribe(self._topics)
        self.count = 0

    def poll(self, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            for msg in self._consumer.consume(10_000, min(left, 0.5)):
                if msg.error() is None:
                    self.count += 1
        return self.count

    def close(self) -> None:
        self._consumer.close()


def wait_for_outcomes(
    settings: Settings, expected: list[int], procs: list[StageProcess], timeout_s: float
) -> AuditReport:
    """Wait until there are as many outcomes as transactions (or a stage dies, or the
    timeout), then audit the topics once."""
    deadline = time.monotonic() + timeout_s
    watcher = OutcomeWatcher(settings)
    try:
        with Progress(
            TextColumn("[bold]decisions"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("decisions", total=len(expected))
            while time.monotonic() < deadline:
                done = watcher.poll(1.0)
                bar.update(task, completed=min(done, len(expected)))
                if done >= len(expected):
                    break
                dead = [sp.name for sp in procs if sp.proc.poll() is not None]
                if dead:
                    console.print(f"[red]stage(s) exited early: {dead}; see {procs[0].log.parent}")
                    break
    finally:
        watcher.close()
    return audit(settings, expected)


def print_live(rows: np.ndarray, offered: float) -> None:
    """The live-rate phase's latency: what a read_committed reader of the decisions saw."""
    stats = decision_stats(rows)
    if not len(rows):
        console.print("live rate: no decisions")
        return
    console.print(
        f"live rate ({len(rows):,} transactions, {offered:,.0f}/s offered, "
        f"{stats['eps']:,.0f}/s decided): event-to-decision, visible to a read_committed "
        f"reader: p50 {stats[f'{TOTAL} p50']:.0f} ms, p99 {stats[f'{TOTAL} p99']:.0f} ms"
    )
    hops = [h for h, _, _ in HOPS if h != TOTAL]
    console.print(
        "  per hop (p50 / p99 ms): "
        + ", ".join(f"{h} {stats[f'{h} p50']:.0f} / {stats[f'{h} p99']:.0f}" for h in hops)
    )


def print_summary(settings: Settings, report: AuditReport, replayed: ReplayResult) -> None:
    table = Table(title="rtpipe demo summary", show_lines=False)
    table.add_column("outcome topic")
    table.add_column("records", justify="right")
    table.add_column("top reasons")
    for name, rec in report.per_topic.items():
        reasons = ", ".join(f"{k}={v:,}" for k, v in rec.reasons.most_common(3))
        table.add_row(name, f"{rec.count:,}", reasons)
    console.print(table)
    lat = report.latency_percentiles()
    tput = report.throughput()
    console.print(
        f"events in: {report.expected:,}   outcomes: {report.outcomes:,}   "
        f"lost: {len(report.lost)}   duplicated: {len(report.duplicated)}"
    )
    span = report.span_seconds()
    if tput and span:
        total = replayed.transactions + replayed.labels + replayed.history
        console.print(
            f"throughput (first ingest -> last decision, {span:,.0f}s): {tput:,.0f} decisions/s; "
            f"the enrichment stage consumed {total:,} messages ({replayed.transactions:,} "
            f"transactions, {replayed.labels:,} labels, {replayed.history:,} warm-up) = "
            f"{total / span:,.0f} messages/s; the replay producer took {replayed.seconds:.1f}s"
        )
    if lat:
        console.print(
            "event-to-decision latency over the whole run (ingest -> routed): "
            f"p50 {lat['p50_ms']:.0f} ms, p95 {lat['p95_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms"
            " (mostly a max-speed replay: queueing behind its backlog; the live-rate phase "
            "below is the pipeline's own latency)"
        )
    s = settings.stack
    m = settings.metrics
    console.print(
        f"Kafka      127.0.0.1:{s.kafka_port}   e.g. kcat -b 127.0.0.1:{s.kafka_port} -C "
        f"-t {settings.topics.name('action')} -c 3 -e\n"
        f"Redis      127.0.0.1:{s.redis_port}\n"
        f"Prometheus http://127.0.0.1:{s.prometheus_port}\n"
        f"Metrics    enrichment :{m.enrichment_port} (+ :{m.enrichment_labels_port})  "
        f"prediction :{m.prediction_port}  "
        f"routing :{m.routing_port}\n"
        f"Stop with  rtpipe stack down"
    )


def skew_check(
    settings: Settings,
    start: str | date,
    days: float,
    *,
    offline: bool = True,
    tx: pd.DataFrame | None = None,
    history_days: int = 0,
) -> SkewReport:
    """Skew check of a replay: served features (prediction records) and Feast's offline
    join, both against the batch definitions. The replay's customer windows start empty at
    ``start`` (the replay sends no earlier transactions), so that is the history start."""
    from training.simulate import read_dataset
    from training.skew import check_skew, predictions_frame

    tx = read_dataset(settings.data_dir) if tx is None else tx
    begin = pd.Timestamp(start, tz="UTC")
    sel = (tx["tx_datetime"] >= begin) & (tx["tx_datetime"] < begin + pd.Timedelta(days=days))
    topic = settings.topics.name("predictions")
    records = [orjson.loads(v) for _, v, _ in read_topic(settings, topic) if v is not None]
    return check_skew(
        settings,
        tx,
        predictions_frame(records),
        tx.loc[sel, "transaction_id"],
        history_start=begin - pd.Timedelta(days=history_days),
        offline=offline,
    )


def backfill(settings: Settings, tx: pd.DataFrame) -> None:
    """Replace the offline store's history with the batch features of ``tx``."""
    from training.features import backfill_offline_store

    for view in (CUSTOMER_VIEW, TERMINAL_VIEW):
        shutil.rmtree(settings.offline_dir / view, ignore_errors=True)
    backfill_offline_store(settings, tx)


def run_demo(
    settings: Settings,
    replay_start: date,
    replay_days: float,
    fresh: bool = False,
    history_days: int = 30,
) -> int:
    """Run the demo; returns the process exit code (0 when nothing was lost or duplicated)."""
    from infra import stack
    from stages.shared.feast_store import apply_repo
    from training import registry
    from training.simulate import SimulatorConfig, read_dataset, simulate, write_dataset
    from training.train import train

    console.rule("1/6 local stack")
    started = stack.up(settings)
    console.print(f"started: {started or 'nothing (already running)'}")

    console.rule("2/6 data set")
    data_file = settings.data_dir / "transactions.parquet"
    if fresh or not data_file.exists():
        tx = simulate(SimulatorConfig(), progress=True)
        write_dataset(tx, settings.data_dir)
    else:
        tx = read_dataset(settings.data_dir)
        console.print(f"reusing {data_file} ({len(tx):,} transactions)")

    console.rule("3/6 Feast: apply and backfill the offline store")
    apply_repo(settings)
    marker = settings.offline_dir / "BACKFILLED"
    if fresh or not marker.exists() or marker.stat().st_mtime < data_file.stat().st_mtime:
        backfill(settings, tx)
        marker.write_text(f"{len(tx)} transactions\n")
    else:
        console.print(f"offline store already backfilled from {data_file}")

    console.rule("4/6 training from the offline store")
    name = settings.prediction.model_name
    if fresh or registry.current_version(settings.registry_dir, name) is None:
        # The demo trains the tuned LightGBM on the reference split; the side-by-side with the
        # baselines and the full search is `rtpipe train` (minutes more on two cores).
        result = train(settings, date(2018, 7, 25), n_trials=2, baselines=(), plots=False)
        console.print(result)
    else:
        console.print(
            f"serving promoted version {registry.current_version(settings.registry_dir, name)}"
        )

    console.rule("5/6 three stages and a replay")
    run_id = time.strftime("%Y%m%d%H%M%S")
    settings = settings.model_copy(
        update={
            "topics": settings.topics.model_copy(
                update={"prefix": f"{settings.topics.prefix}demo{run_id}."}
            )
        }
    )
    ensure_topics(settings.kafka, settings.topics)
    cleared = clear_online_store(settings)
    logger.info("cleared %d online rows", cleared)
    procs = start_stages(settings, DEMO_STAGES)
    sampler = MetricsSampler.for_stages(settings, interval_s=1.0)
    try:
        waited = wait_until_ready(settings, procs)
        console.print(f"stages ready after {waited:.1f}s: {', '.join(DEMO_STAGES)}")
        sampler.start()
        begin = pd.Timestamp(replay_start, tz="UTC")
        plan = ReplayPlan(begin, begin + pd.Timedelta(days=replay_days), history_days=history_days)
        expected = tx.loc[
            (tx["tx_datetime"] >= plan.start) & (tx["tx_datetime"] < plan.end), "transaction_id"
        ].tolist()
        with Progress(
            TextColumn("[bold]replay"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("replay", total=len(expected))
            replayed = replay(settings, tx, plan, progress=lambda n: bar.advance(task, n))
        console.print(
            f"replayed {replayed.transactions:,} transactions, {replayed.labels:,} labels and "
            f"{replayed.history:,} history transactions in {replayed.seconds:.1f}s"
        )
        # Made now, the live phase's producer has its metadata and producer id (fetched in
        # the background) before its first event.
        producer = replay_producer(settings)
        producer.list_topics(timeout=10)
        wait_for_outcomes(settings, expected, procs, timeout_s=600)
        # The pipeline's own latency: the next hours of events at a fixed live rate.
        console.rule(f"live rate: {LIVE_SECONDS:.0f} s at {LIVE_RATE:,.0f} events/s")
        (live_plan,) = plans(tx, plan.end, [int(LIVE_RATE * LIVE_SECONDS)])
        live_ids = ids_in(tx, live_plan)
        collector = DecisionCollector(settings)
        try:
            replay(settings, tx, live_plan, rate=LIVE_RATE, producer=producer)
            collector.wait_for(live_ids, timeout_s=120)
            live_rows = collector.decisions.of(live_ids)
        finally:
            collector.close()
        expected += live_ids
        report = wait_for_outcomes(settings, expected, procs, timeout_s=120)
        # Let the evaluation stage see the last decisions before the stages stop.
        time.sleep(3.0)
    finally:
        frames = sampler.stop()
        codes = stop_stages(procs)
    console.rule("6/6 summary")
    print_summary(settings, report, replayed)
    print_live(live_rows, LIVE_RATE)
    console.rule("skew check: served and offline features vs the batch definitions")
    # Served features vs the batch definitions; `rtpipe check-skew` adds Feast's offline join.
    days = (live_plan.end - begin) / pd.Timedelta(days=1)
    skew = skew_check(settings, replay_start, days, tx=tx, history_days=history_days, offline=False)
    console.print(str(skew))
    out_dir = settings.home / "runs" / run_id
    pictures = render_run_report(settings, report, out_dir, frames, title=f"rtpipe demo {run_id}")
    pictures.append(render_live_latency(live_rows, out_dir, title=f"rtpipe demo {run_id} live"))
    console.print(f"pictures: {', '.join(str(p) for p in pictures)}")
    console.print(f"stage exit codes: {codes}; logs in {procs[0].log.parent}")
    console.print(
        f"topic prefix of this run: {settings.topics.prefix}  (e.g. rtpipe check-skew "
        f"--prefix {settings.topics.prefix})"
    )
    return 0 if not report.lost and not report.duplicated and skew.ok else 1
