"""The ``rtpipe`` command line. Every subcommand builds one ``Settings`` (env ``RTPIPE_*``)
and passes it down; heavy imports happen inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from infra.cli import stack_app
from stages.shared.settings import Settings
from stages.shared.topology import STAGE_TABLE, STAGES

app = typer.Typer(
    name="rtpipe",
    help="Real-time ML prediction pipeline on Kafka, Feast and LightGBM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(stack_app, name="stack")
feast_app = typer.Typer(
    help="Feast feature repo: apply definitions, materialise.", no_args_is_help=True
)
app.add_typer(feast_app, name="feast")
model_app = typer.Typer(help="Model registry: list, promote, roll back.", no_args_is_help=True)
app.add_typer(model_app, name="model")

console = Console(stderr=True)
logger = logging.getLogger("rtpipe")


def _settings() -> Settings:
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("quixstreams").setLevel(logging.WARNING)
    return settings


def _check_credentials(settings: Settings, kafka: bool = True, redis: bool = True) -> None:
    """Fail at once, in one line (exit 2), when Kafka or Redis refuse the configured
    credentials or certificates, instead of retrying for ever."""
    from stages.shared.connectivity import CredentialsError, check_kafka, check_redis

    try:
        if kafka:
            check_kafka(settings.kafka)
        if redis:
            check_redis(settings.redis)
    except CredentialsError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _day(value: str) -> date:
    return datetime.strptime(value, "%Y-%m-%d").date()


@app.command()
def simulate(
    customers: Annotated[int, typer.Option(help="Number of customers.")] = 5_000,
    terminals: Annotated[int, typer.Option(help="Number of terminals.")] = 10_000,
    days: Annotated[int, typer.Option(help="Number of days from --start.")] = 183,
    start: Annotated[str, typer.Option(help="First day, YYYY-MM-DD.")] = "2018-04-01",
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data).")] = 0,
) -> None:
    """Generate the reference transaction data set (SIMULATOR.md) as Parquet."""
    from training.simulate import SimulatorConfig, write_dataset
    from training.simulate import simulate as run_sim

    settings = _settings()
    cfg = SimulatorConfig(
        n_customers=customers, n_terminals=terminals, nb_days=days, start_date=start, seed=seed
    )
    df = run_sim(cfg, progress=True)
    path = write_dataset(df, settings.data_dir)
    console.print(f"{len(df):,} transactions, fraud rate {df['is_fraud'].mean():.3%} -> {path}")


@app.command()
def backfill() -> None:
    """Compute every feature in batch from the raw data; replace Feast's offline store."""
    from stages.ops.offline import backfill as run_backfill
    from training.simulate import read_dataset

    settings = _settings()
    run_backfill(settings, read_dataset(settings.data_dir))
    console.print(f"offline store rewritten under {settings.offline_dir}")


@feast_app.command("apply")
def feast_apply() -> None:
    """Register entities, feature views and services (like ``feast apply``)."""
    from stages.shared.feast_store import apply_repo

    settings = _settings()
    apply_repo(settings)
    console.print(f"applied {settings.feature_repo}")


@feast_app.command("materialize")
def feast_materialize(
    start: Annotated[str, typer.Argument(help="Start, YYYY-MM-DD.")],
    end: Annotated[str, typer.Argument(help="End, YYYY-MM-DD.")],
) -> None:
    """Load the offline store's latest rows in [start, end) into the online store."""
    from stages.shared.feast_store import materialize

    settings = _settings()
    to_dt = lambda s: datetime.combine(_day(s), datetime.min.time(), UTC)  # noqa: E731
    materialize(settings, to_dt(start), to_dt(end))


@app.command()
def train(
    train_start: Annotated[str, typer.Option(help="First training day.")] = "2018-07-25",
    train_days: Annotated[int, typer.Option(help="Training days.")] = 7,
    delay_days: Annotated[int, typer.Option(help="Gap between train and test (label delay).")] = 7,
    test_days: Annotated[int, typer.Option(help="Test days.")] = 7,
    predictions_out: Annotated[
        Path | None, typer.Option(help="Write test predictions here.")
    ] = None,
    feature_service: Annotated[
        str | None, typer.Option(help="Feature service (default: the prediction setting's).")
    ] = None,
    history_days: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated days of fitting history for the folds to choose from "
            "(default 7,14,28,42; the training days are always one)."
        ),
    ] = None,
) -> None:
    """Train LightGBM from the Feast offline store (point-in-time joins), evaluate, register."""
    from training.train import train as run_train

    lengths = None
    if history_days is not None:
        try:
            lengths = tuple(int(d) for d in history_days.split(",") if d.strip())
        except ValueError:
            raise typer.BadParameter(
                f"not a comma-separated list of days: {history_days!r}", param_hint="--history-days"
            ) from None
        if not lengths or min(lengths) < 1:
            raise typer.BadParameter(
                f"days must be >= 1: {history_days!r}", param_hint="--history-days"
            )

    settings = _settings()
    result = run_train(
        settings,
        _day(train_start),
        train_days=train_days,
        delay_days=delay_days,
        test_days=test_days,
        predictions_out=predictions_out,
        feature_service=feature_service,
        history_days=lengths,
    )
    console.print(result)


@app.command("run")
def run_stage(
    stage: Annotated[str, typer.Argument(help=f"One of: {', '.join(STAGES)}.")],
    part: Annotated[
        str | None,
        typer.Option(hidden=True, help="Enrichment only: run just its labels process."),
    ] = None,
) -> None:
    """Run one pipeline stage until SIGTERM (enrichment: in two processes)."""
    from stages.shared.kafka import StopFlag

    # First of all: a SIGTERM during the seconds of start-up ends the stage cleanly (exit 0)
    # instead of killing it half-started.
    stop = StopFlag()
    stop.install_signal_handlers()
    # SIGUSR1 prints every thread's stack to the stage's log, even while the main thread is
    # blocked in librdkafka: what stop_stages sends a stage that ignored SIGTERM, before
    # SIGKILL, so a hang says where it was.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    from stages.shared.procenv import drop_feast_prometheus_dirs

    # Before prometheus_client is imported: it picks its value store then.
    drop_feast_prometheus_dirs(os.environ)
    from stages.shared.metrics import build_metrics

    settings = _settings()
    if stage not in STAGE_TABLE:
        raise typer.BadParameter(f"unknown stage {stage!r}; choose from {STAGES}")
    _check_credentials(settings)
    metrics = build_metrics()
    # This process is the stage's own: a batch loop that stops turning restarts it.
    from stages.shared.watchdog import watch_loops_in_this_process

    watch_loops_in_this_process(settings.stage_watchdog_s)
    if part is not None:
        if (stage, part) != ("enrichment", "labels"):
            raise typer.BadParameter("--part labels is for the enrichment stage only")
        from stages.enrichment.supervise import run_labels_part

        metrics.serve(settings.metrics.host, settings.metrics.enrichment_labels_port)
        run_labels_part(settings, stop, metrics)
        return
    metrics.serve(settings.metrics.host, settings.metrics.port(stage))
    # The stage's own preload (StageSpec.preload) runs before its modules are imported.
    stats = STAGE_TABLE[stage].load()(settings, stop, metrics)
    logger.info("%s stopped%s", stage, f": {stats}" if stats is not None else "")


@app.command()
def retrain(
    request: Annotated[
        bool, typer.Option("--request", help="Send one retraining request and exit.")
    ] = False,
    labels_known: Annotated[
        str | None,
        typer.Option(help="With --request: labels are known before this time (ISO, UTC)."),
    ] = None,
) -> None:
    """The retrain job until SIGTERM: requests on model.retrain_requests (group retrain), a
    candidate trained on the latest window, served as shadow, promoted by the gate."""
    from stages.shared.kafka import StopFlag

    stop = StopFlag()
    stop.install_signal_handlers()
    settings = _settings()
    _check_credentials(settings, redis=not request)
    if request:
        import time as _time

        import pandas as pd
        from confluent_kafka import Producer

        from stages.retrain.logic import request_payload
        from stages.shared.kafka import ensure_topics, producer_config
        from stages.shared.topology import retrain_requests_topic

        known = None if labels_known is None else pd.Timestamp(labels_known, tz="UTC")
        topic = retrain_requests_topic(settings)
        ensure_topics(settings.kafka, settings.topics, [topic])
        producer = Producer(producer_config(settings.kafka))
        name = settings.prediction.model_name
        known_ms = None if known is None else int(known.value // 1_000_000)
        producer.produce(
            topic,
            request_payload(name, "manual", known_ms, int(_time.time() * 1000)),
            name.encode(),
        )
        producer.flush(30)
        console.print(f"retraining of {name} requested on {topic}")
        return
    from stages.retrain.app import run as run_retrain

    job = run_retrain(settings, stop)
    logger.info("retrain stopped: %d requests, promoted %s", job.requests, job.promoted)


@app.command()
def replay(
    start: Annotated[str, typer.Option(help="First day replayed, YYYY-MM-DD.")] = "2018-08-08",
    days: Annotated[float, typer.Option(help="Days of transactions to replay.")] = 7,
    rate: Annotated[float, typer.Option(help="Transactions per second; 0 = max speed.")] = 0,
    history_days: Annotated[
        int, typer.Option(help="Days before --start sent to the history topic (warm-up).")
    ] = 0,
) -> None:
    """Produce transactions and their delayed labels to Kafka in event-time order."""
    import pandas as pd

    from stages.ops.replay import ReplayPlan
    from stages.ops.replay import replay as run_replay
    from stages.shared.kafka import ensure_topics
    from training.simulate import read_dataset

    settings = _settings()
    _check_credentials(settings, redis=False)
    ensure_topics(settings.kafka, settings.topics)
    begin = pd.Timestamp(start, tz="UTC")
    plan = ReplayPlan(begin, begin + pd.Timedelta(days=days), history_days=history_days)
    result = run_replay(settings, read_dataset(settings.data_dir), plan, rate=rate or None)
    console.print(
        f"replayed {result.transactions:,} transactions and {result.labels:,} labels "
        f"in {result.seconds:.1f}s ({result.rate:,.0f} msg/s)"
    )


@app.command()
def audit(
    start: Annotated[str, typer.Option(help="First replayed day.")] = "2018-08-08",
    days: Annotated[float, typer.Option(help="Days replayed.")] = 7,
) -> None:
    """Check that every replayed transaction has exactly one outcome (read_committed)."""
    import pandas as pd

    from stages.ops.audit import audit as run_audit
    from training.simulate import read_dataset

    settings = _settings()
    _check_credentials(settings)
    tx = read_dataset(settings.data_dir)
    begin = pd.Timestamp(start, tz="UTC")
    sel = (tx["tx_datetime"] >= begin) & (tx["tx_datetime"] < begin + pd.Timedelta(days=days))
    report = run_audit(settings, tx.loc[sel, "transaction_id"].tolist())
    table = Table("topic", "records", "reasons")
    for name, rec in report.per_topic.items():
        table.add_row(
            name, f"{rec.count:,}", ", ".join(f"{k}={v}" for k, v in rec.reasons.most_common(4))
        )
    Console().print(table)
    Console().print(
        f"expected {report.expected:,}  lost {len(report.lost)}  "
        f"duplicated {len(report.duplicated)}  unexpected {len(report.unexpected)}"
    )
    if report.lost or report.duplicated:
        raise typer.Exit(1)


@app.command()
def backtest(
    start: Annotated[str, typer.Option(help="First day, YYYY-MM-DD.")] = "2018-08-08",
    days: Annotated[int, typer.Option(help="Days to backtest.")] = 7,
    version: Annotated[str | None, typer.Option(help="Model version (default: promoted).")] = None,
) -> None:
    """Replay an offline period through the prediction code path; the training metrics."""
    import json

    from stages.ops.backtest import backtest as run_backtest

    settings = _settings()
    result = run_backtest(settings, start, days, model_version=version)
    Console().print_json(json.dumps(result.summary(), default=str))


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="Smaller sizes, fewer trials (~3 min).")] = False,
    out: Annotated[Path, typer.Option(help="Where to write the results table.")] = Path(
        "bench/RESULTS.md"
    ),
    only: Annotated[
        list[str] | None,
        typer.Option(help="Run just this part: online, prediction, enrichment or pipeline."),
    ] = None,
) -> None:
    """Benchmarks side by side (ratios of medians): online I/O, prediction, pipeline."""
    from bench.run import main as run_bench

    settings = _settings()
    run_bench(settings, quick, out, frozenset(only) if only else None)


@app.command("check-skew")
def check_skew_cmd(
    prefix: Annotated[str, typer.Option(help="Topic prefix of the run (the demo prints it).")] = "",
    start: Annotated[str, typer.Option(help="First replayed day.")] = "2018-08-08",
    days: Annotated[float, typer.Option(help="Days replayed.")] = 7,
    offline: Annotated[bool, typer.Option(help="Also compare Feast's offline join.")] = True,
    history_days: Annotated[int, typer.Option(help="History days the replay sent.")] = 30,
) -> None:
    """Recompute every feature from the raw data and compare with what was served online
    (prediction records) and what Feast's point-in-time join returns."""
    from stages.ops.offline import skew_check

    settings = _settings()
    if prefix:
        settings = settings.model_copy(
            update={"topics": settings.topics.model_copy(update={"prefix": prefix})}
        )
    report = skew_check(settings, start, days, offline=offline, history_days=history_days)
    Console().print(str(report))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def chaos(
    fault: Annotated[
        list[str] | None, typer.Option(help="Fault to run (repeat); default all.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write the report (JSON) here.")] = None,
) -> None:
    """Inject faults into the running pipeline (kills, rebalance, Redis and broker outages,
    a bad model) and audit each: lost and duplicated must be 0."""
    from stages.ops.chaos import run_chaos

    settings = _settings()
    report = run_chaos(
        settings,
        fault,
        out,
        progress=lambda r: Console().print(
            f"{r.fault}: lost {r.lost}, duplicated {r.duplicated} ({r.seconds:.0f}s)"
        ),
    )
    for line in report.lines():
        Console().print(line)
    if not report.ok:
        raise typer.Exit(1)


@model_app.command("list")
def model_list() -> None:
    """List registered versions (the promoted one and the shadow are marked) and the
    lifecycle steps the retrain job recorded (request, candidate, shadow, gate, promotion)."""
    from training import registry

    settings = _settings()
    name = settings.prediction.model_name
    current = registry.current_version(settings.registry_dir, name)
    shadow = registry.shadow_version(settings.registry_dir, name)
    events = registry.events(settings.registry_dir, name)
    last_step = {e["version"]: e for e in events if e.get("version")}
    table = Table("version", "created", "metrics", "current", "last step")
    for v in registry.list_versions(settings.registry_dir, name):
        found = v.card.metrics or {}
        metrics = ", ".join(f"{k}={val:.4f}" for k, val in found.items() if isinstance(val, float))
        ev = last_step.get(v.version)
        table.add_row(
            v.version,
            v.card.created_at.isoformat(),
            metrics,
            "*" if v.version == current else ("shadow" if v.version == shadow else ""),
            f"{ev['step']} {ev.get('detail', '')}".strip() if ev else "",
        )
    Console().print(table)
    if events:
        log = Table("at", "step", "version", "details", title="lifecycle")
        for e in events:
            rest = {k: v for k, v in e.items() if k not in ("at", "step", "version")}
            log.add_row(
                e["at"],
                e["step"],
                str(e.get("version") or ""),
                ", ".join(f"{k}={v}" for k, v in rest.items()),
            )
        Console().print(log)


@model_app.command("promote")
def model_promote(version: Annotated[str, typer.Argument(help="Version to serve.")]) -> None:
    """Make VERSION the one the prediction stage serves (hot-swapped, no restart)."""
    from training import registry

    settings = _settings()
    registry.promote(settings.registry_dir, settings.prediction.model_name, version)
    console.print(f"promoted {version}")


@model_app.command("rollback")
def model_rollback() -> None:
    """Serve the previously promoted version again."""
    from training import registry

    settings = _settings()
    mv = registry.rollback(settings.registry_dir, settings.prediction.model_name)
    console.print(f"rolled back to {mv.version}")


@app.command()
def demo(
    replay_start: Annotated[str, typer.Option(help="First replayed day.")] = "2018-08-08",
    replay_days: Annotated[float, typer.Option(help="Days replayed.")] = 7,
    fresh: Annotated[bool, typer.Option(help="Regenerate data and retrain.")] = False,
    history_days: Annotated[
        int, typer.Option(help="Days of earlier transactions that warm the windows up.")
    ] = 30,
    feature_service: Annotated[
        str, typer.Option(help="The served model's feature service (trained if needed).")
    ] = "fraud_model_v2",
) -> None:
    """The whole story: stack up, data, Feast, training, three stages, a replay, a summary."""
    from stages.ops.demo import run_demo

    settings = _settings()
    code = run_demo(
        settings,
        _day(replay_start),
        replay_days,
        fresh=fresh,
        history_days=history_days,
        feature_service=feature_service,
    )
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
