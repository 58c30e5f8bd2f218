"""``rtpipe demo``: the local stack, the data set, Feast, a model, the three stages as
separate processes, a replay through Kafka and a summary of what came out.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import date

import numpy as np
import pandas as pd
from confluent_kafka import Consumer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from stages.ops.audit import AuditReport, audit
from stages.ops.harness.processes import StageProcess, exited, start_stages, stop_stages
from stages.ops.harness.readiness import wait_until_ready
from stages.ops.harness.sandbox import clear_online_store
from stages.ops.latency import HOPS, TOTAL, DecisionCollector, decision_stats, plans
from stages.ops.offline import backfill, skew_check
from stages.ops.replay import ReplayPlan, ReplayResult, replay, replay_producer
from stages.ops.run_charts import MetricsSampler, render_live_latency, render_run_report
from stages.shared.kafka import ensure_topics
from stages.shared.settings import Settings
from stages.shared.topology import STAGES

logger = logging.getLogger(__name__)
console = Console()

# The demo's live-rate phase, after the max-speed replay.
LIVE_RATE = 500.0
LIVE_SECONDS = 30.0
DEMO_STAGES = STAGES


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


def _progress(what: str) -> Progress:
    """A console progress bar named ``what``."""
    return Progress(
        TextColumn(f"[bold]{what}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def wait_for_outcomes(
    settings: Settings, expected: list[int], procs: list[StageProcess], timeout_s: float
) -> AuditReport:
    """Wait until there are as many outcomes as transactions (or a stage dies, or the
    timeout), then audit the topics once."""
    deadline = time.monotonic() + timeout_s
    watcher = OutcomeWatcher(settings)
    try:
        with _progress("decisions") as bar:
            task = bar.add_task("decisions", total=len(expected))
            while time.monotonic() < deadline:
                done = watcher.poll(1.0)
                bar.update(task, completed=min(done, len(expected)))
                if done >= len(expected):
                    break
                dead = exited(procs)
                if dead:
                    console.print(f"[red]stage(s) exited early: {dead}; see {procs[0].log.parent}")
                    break
    finally:
        watcher.close()
    return audit(settings, expected)


def print_live(rows: np.ndarray, offered: float, broker: dict[str, float] | None = None) -> None:
    """The live-rate phase's latency: what a read_committed reader of the decisions saw;
    and, when measured (``infra.stack.broker_cpu``), the cores the broker used meanwhile."""
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
    if broker:
        console.print(
            f"  broker meanwhile: {broker['broker cores']:.2f} cores, of them its JIT compiler "
            f"threads {broker['broker jit cores']:.2f} (a broker fresh from its start compiles "
            "its hot code through minutes of load; README, 'A fresh broker's JIT')"
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


def run_demo(
    settings: Settings,
    replay_start: date,
    replay_days: float,
    fresh: bool = False,
    history_days: int = 30,
    feature_service: str = "fraud_model_v2",
) -> int:
    """Run the demo; returns the process exit code (0 when nothing was lost or duplicated).

    The served model is trained on ``feature_service`` (unless the promoted one already is),
    so the skew check covers every feature of that service on the whole replay."""
    from infra import stack
    from infra.stack.broker_cpu import BrokerCpu, broker_probe
    from stages.shared.feast_store import apply_repo
    from training import registry
    from training.features import BACKFILL_VIEWS
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
    stale = (
        fresh
        or not marker.exists()
        or marker.stat().st_mtime < data_file.stat().st_mtime
        # A view added since (customer_behaviour, for fraud_model_v2) has no history yet.
        or not all(any((settings.offline_dir / v).glob("*.parquet")) for v in BACKFILL_VIEWS)
    )
    if stale:
        backfill(settings, tx)
        marker.write_text(f"{len(tx)} transactions\n")
    else:
        console.print(f"offline store already backfilled from {data_file}")

    console.rule("4/6 training from the offline store")
    name = settings.prediction.model_name
    current = registry.current_version(settings.registry_dir, name)
    if (
        fresh
        or current is None
        or registry.get_version(settings.registry_dir, name, current).card.feature_service
        != feature_service
    ):
        # The demo trains the tuned LightGBM on the reference split; the side-by-side with the
        # baselines and the full search is `rtpipe train` (minutes more on two cores).
        result = train(
            settings,
            date(2018, 7, 25),
            n_trials=2,
            baselines=(),
            plots=False,
            feature_service=feature_service,
        )
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
    broker: dict[str, float] = {}
    # Reading from the start: made at the live phase instead, it first had to read the whole
    # backlog's decisions and stamped the live phase's first ones late (live p99 957 ms with
    # 849 ms on the last hop, against 194 and 54 ms when it reads from the start).
    collector = DecisionCollector(settings)
    try:
        waited = wait_until_ready(settings, procs)
        console.print(f"stages ready after {waited:.1f}s: {', '.join(DEMO_STAGES)}")
        sampler.start()
        begin = pd.Timestamp(replay_start, tz="UTC")
        plan = ReplayPlan(begin, begin + pd.Timedelta(days=replay_days), history_days=history_days)
        expected = plan.transaction_ids(tx)
        with _progress("replay") as bar:
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
        report = wait_for_outcomes(settings, expected, procs, timeout_s=600)
        # The collector has read the backlog's decisions too: it is reading as they commit.
        # (Only decisions: a dead-lettered transaction never reaches it.)
        decision_topics = settings.topics.decision_topics()
        collector.wait_for(sorted(report.ids_on(decision_topics)), timeout_s=120)
        # The pipeline's own latency: the next hours of events at a fixed live rate.
        console.rule(f"live rate: {LIVE_SECONDS:.0f} s at {LIVE_RATE:,.0f} events/s")
        (live_plan,) = plans(tx, plan.end, [int(LIVE_RATE * LIVE_SECONDS)])
        live_ids = live_plan.transaction_ids(tx)
        probe = broker_probe(settings)
        before = probe.sample() if probe is not None else None
        replay(settings, tx, live_plan, rate=LIVE_RATE, producer=producer)
        # The broker through the live traffic only (the audit next reads every outcome).
        if probe is not None and before is not None:
            broker = BrokerCpu.cores(before, probe.sample())
        expected += live_ids
        report = wait_for_outcomes(settings, expected, procs, timeout_s=120)
        decided = report.ids_on(decision_topics)
        collector.wait_for([i for i in live_ids if i in decided], timeout_s=120)
        live_rows = collector.decisions.of(live_ids)
        # Let the evaluation stage see the last decisions before the stages stop.
        time.sleep(3.0)
    finally:
        collector.close()
        frames = sampler.stop()
        codes = stop_stages(procs)
    console.rule("6/6 summary")
    print_summary(settings, report, replayed)
    print_live(live_rows, LIVE_RATE, broker)
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
