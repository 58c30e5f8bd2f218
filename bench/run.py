"""``rtpipe bench``: every goal of issue #4 measured side by side in one run, on the bench's
own stack (Kafka and Redis on ports 35xxx, home ``.rtpipe/bench``), results to RESULTS.md.

    .venv/bin/python -m bench.run [--quick]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench import cluster, enrichment, online, pipeline, prediction
from bench.env import bench_settings, bench_stack, register_model, simulate_data, with_prefix
from bench.results import Goal, Results, Row, fmt_number, machine, median
from stages.ops.harness.sandbox import clear_online_store, feast_project
from stages.shared.metrics import COMMIT_PHASES
from stages.shared.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"


def online_rows(res: online.OnlineResults) -> list[Row]:
    def ms_row(what: str, ours_s: float, other_s: float, goal: Goal) -> Row:
        return Row(what, ours_s * 1000, other_s * 1000, "ms", better="lower", goal=goal)

    rows = [
        ms_row(
            f"online read, batch {r.batch:,}: OnlineFeatureReader vs Feast get_online_features",
            r.ours_s,
            r.feast_s,
            Goal(">= 10x", min_ratio=10.0) if r.batch == 500 else Goal(""),
        )
        for r in res.reads
    ]
    rows += [
        ms_row(
            f"online read, batch {r.batch:,}: OnlineFeatureReader vs bare pipelined HMGET",
            r.ours_s,
            r.bare_s,
            Goal("within 2x (>= 0.5x)", min_ratio=0.5),
        )
        for r in res.reads
    ]
    w = res.write
    rows.append(
        ms_row(
            f"online write, {w.batch} rows: OnlineFeatureWriter vs FeatureStore.push",
            w.ours_s,
            w.feast_s,
            Goal(">= 5x", min_ratio=5.0),
        )
    )
    return rows


def hop_table_header(first: str) -> list[str]:
    """The header and rule of a table whose first four columns are ``first`` (`` | ``
    separated) and whose others are the latency hops."""
    return [
        f"| {first} | " + " | ".join(h for h, _, _ in pipeline.HOPS) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(pipeline.HOPS),
    ]


def hop_cells(stats: dict[str, float]) -> list[str]:
    """``p50 / p99`` of every latency hop in ``stats``."""
    return [
        f"{fmt_number(stats.get(f'{h} p50'))} / {fmt_number(stats.get(f'{h} p99'))}"
        for h, _, _ in pipeline.HOPS
    ]


def checkpoint_rows(res: pipeline.PipelineResults) -> list[Row]:
    """The current enrichment checkpoint interval against the old one: max speed and the
    p99 at 1,000 events/s, medians over the sets of fresh processes."""
    old, new = pipeline.CHECKPOINT_INTERVALS_S
    sets_old, sets_new = res.checkpoint_sets.get(old, []), res.checkpoint_sets.get(new, [])
    if not sets_old or not sets_new:
        return []

    def values(sets: list[list[pipeline.Phase]], i: int, key: str) -> list[float]:
        """Phase ``i``'s ``key`` in each set."""
        return [ps[i].stats.get(key, float("nan")) for ps in sets]

    def each(sets: list[list[pipeline.Phase]], i: int, key: str) -> str:
        return ", ".join(fmt_number(v) for v in values(sets, i, key))

    label = f"enrichment checkpoint at most {new * 1000:.0f} ms vs {old * 1000:.0f} ms"

    eps_row = Row(
        f"whole pipeline events/s at max speed: {label}",
        median(values(sets_new, 0, "eps")),
        median(values(sets_old, 0, "eps")),
        "ev/s",
        note=f"fresh processes, {int(sets_new[0][0].stats.get('events', 0)):,} events, "
        f"median of {len(sets_new)}; each: {each(sets_new, 0, 'eps')} vs "
        f"{each(sets_old, 0, 'eps')}",
    )
    p99 = f"{pipeline.TOTAL} p99"
    p99_row = Row(
        f"event-to-decision p99 at 1,000 events/s: {label}",
        median(values(sets_new, 1, p99)),
        median(values(sets_old, 1, p99)),
        "ms",
        better="lower",
        note=f"median of {len(sets_new)}; each: {each(sets_new, 1, p99)} vs "
        f"{each(sets_old, 1, p99)}",
    )
    return [eps_row, p99_row]


def latency_rows(
    what: str, ours: pipeline.Phase, baseline: pipeline.Phase, note: str = ""
) -> list[Row]:
    """Event-to-decision p50 and p99 of two phases side by side (``what``: the rate and the
    comparison)."""
    return [
        Row(
            f"event-to-decision {q} at {what}",
            ours.stats.get(f"{pipeline.TOTAL} {q}", float("nan")),
            baseline.stats.get(f"{pipeline.TOTAL} {q}", float("nan")),
            "ms",
            better="lower",
            note=note,
        )
        for q in ("p50", "p99")
    ]


def warmup_rows(res: pipeline.PipelineResults) -> list[Row]:
    """The main sequence's fixed rates (broker warmed up) against the same rates in the
    warm-up's first pass (a broker fresh from its start, its JIT compiling)."""
    first = {ph.offered_eps: ph for ph in res.warmup if ph.name.split(", ")[1] == "pass 1"}
    rows = []
    for ph in res.phases:
        cold = first.get(ph.offered_eps) if ph.offered_eps else None
        if cold is None:
            continue
        ours_jit, cold_jit = (fmt_number(p.stats.get("broker jit cores")) for p in (ph, cold))
        jit = f"broker JIT {ours_jit} vs {cold_jit} cores"
        what = f"{ph.name}: broker warmed up vs fresh broker (warm-up pass 1)"
        rows += latency_rows(what, ph, cold, note=jit)
    return rows


def warmup_section(res: pipeline.PipelineResults) -> str:
    """Every phase of the broker warm-up and of the main sequence with the broker's cores."""
    lines = [
        "Before the main sequence the bench loads its fresh broker the way the measured phases "
        "will (bench.pipeline.broker_warmup: passes of max speed, 1,000 and "
        f"{pipeline.LOW_RATE:,.0f} events/s through stage processes and topics of their own, "
        "then the online store cleared). A production broker has long compiled its hot "
        "code; a fresh one spends much of a core in its JIT compiler threads (C1, C2) for "
        "minutes of load "
        "(infra.stack.broker_cpu reads them from /proc). Broker cores are of the machine's two.",
        "",
        "| phase | achieved ev/s | event-to-decision p50 / p99 ms | broker cores | of them JIT |",
        "|---|---:|---:|---:|---:|",
    ]
    for ph in [*res.warmup, *res.phases]:
        st = ph.stats
        lines.append(
            f"| {ph.name} | {fmt_number(st.get('eps'))} | "
            f"{fmt_number(st.get(f'{pipeline.TOTAL} p50'))} / "
            f"{fmt_number(st.get(f'{pipeline.TOTAL} p99'))} | "
            f"{fmt_number(st.get('broker cores'))} | {fmt_number(st.get('broker jit cores'))} |"
        )
    return "\n".join(lines)


def latency_section(res: pipeline.PipelineResults) -> str:
    lines = [
        "Per-stage latency from the timestamps every decision carries (ms; p50 / p99). "
        "`ingest` is stamped by the replay producer, `enriched` by the enrichment stage when "
        "it forwards (before its exactly-once commit), `predicted` and `routed` by the "
        "prediction and routing stages before their transactions commit; `visible` is when "
        "the bench's read_committed consumer received the decision (after routing's commit), "
        "so the total is what a downstream reader sees.",
        "",
        *hop_table_header("phase | offered ev/s | achieved ev/s | decisions"),
    ]
    checkpoint_phases = [p for sets in res.checkpoint_sets.values() for ps in sets for p in ps]
    overlap_phases = [p for on in (False, True) for p in res.commit_overlap.get(on, [])]
    for ph in [*res.phases, *overlap_phases, *checkpoint_phases]:
        st = ph.stats
        cells = hop_cells(st)
        offered = fmt_number(ph.offered_eps) if ph.offered_eps else "max"
        lines.append(
            f"| {ph.name} | {offered} | {fmt_number(st.get('eps'))} | "
            f"{int(st.get('events', 0)):,} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def commit_wait_section(res: pipeline.PipelineResults) -> str:
    """Per phase of the main sequence and per stage, the share of the phase's wall time the
    stage's loop waited in each step of its exactly-once commits, and the mean wait per
    commit (stages/ops/commit_waits.py)."""
    steps = COMMIT_PHASES
    lines = [
        "How much of each phase's wall time every stage's loop spent waiting in the steps of "
        "its exactly-once commits, from the stages' own `rtpipe_commit_phase_seconds` "
        "(stages/shared/metrics.py COMMIT_PHASES: `offsets` what was left to wait for of the "
        "offsets sent while the work ran, `sinks` the enrichment checkpoint's online-store "
        "write, `flush` the outputs and state changelogs acknowledged, `end_txn` EndTxn). "
        "Each cell: share of the wall time (mean ms per commit); `all` is their sum. A stage "
        "near 100 % is waiting for the broker, not computing.",
        "",
        "| phase | stage | " + " | ".join(steps) + " | all | commits |",
        "|---|---|" + "---:|" * (len(steps) + 2),
    ]
    prefix = pipeline.WAIT_PREFIX
    for ph in res.phases:
        st = ph.stats
        stages = sorted(
            {k[len(prefix) :].rsplit(" ", 2)[0] for k in st if k.startswith(prefix)},
        )
        for stage in stages:
            cells, total = [], 0.0
            for step in steps:
                share = st.get(f"{prefix}{stage} {step} share")
                if share is None:
                    cells.append("-")
                    continue
                total += share
                mean = st.get(f"{prefix}{stage} {step} ms", float("nan"))
                cells.append(f"{100 * share:.0f} % ({fmt_number(mean)})")
            # Every commit ends with EndTxn: its count is the number of commits.
            commits = int(st.get(f"{prefix}{stage} end_txn commits", 0))
            lines.append(
                f"| {ph.name} | {stage} | " + " | ".join(cells) + f" | {100 * total:.0f} % | "
                f"{commits:,} |"
            )
    return "\n".join(lines)


PARTS = ("online", "prediction", "enrichment", "pipeline", "cluster")


def scale_rows(runs: list[cluster.ScaleRun]) -> list[Row]:
    """Issue #12's comparisons: the cluster stack against the single node, and two processes
    per stage against one, side by side."""
    single = next(r for r in runs if r.name == "single node")
    by_n = {r.replicas: r for r in runs if r.name == "cluster"}
    rows = []
    for n, r in sorted(by_n.items()):
        rows.append(
            Row(
                f"cluster stack, {n} process(es) per stage vs single node: events/s at max "
                f"speed ({int(r.max_stats.get('events', 0)):,} events)",
                r.max_stats.get("eps", float("nan")),
                single.max_stats.get("eps", float("nan")),
                "ev/s",
            )
        )
        for q in ("p50", "p99"):
            rows.append(
                Row(
                    f"cluster stack, {n} process(es) per stage vs single node: "
                    f"event-to-decision {q} at {cluster.RATE:,.0f} events/s",
                    r.rate_stats.get(f"{pipeline.TOTAL} {q}", float("nan")),
                    single.rate_stats.get(f"{pipeline.TOTAL} {q}", float("nan")),
                    "ms",
                    better="lower",
                )
            )
    if 1 in by_n and 2 in by_n:
        rows.append(
            Row(
                "cluster stack, 2 processes per stage vs 1: events/s at max speed",
                by_n[2].max_stats.get("eps", float("nan")),
                by_n[1].max_stats.get("eps", float("nan")),
                "ev/s",
            )
        )
    return rows


def scale_section(runs: list[cluster.ScaleRun]) -> str:
    lines = [
        "Three brokers (replication factor 3, `min.insync.replicas` 2) and a Redis Cluster of "
        "three masters with a replica each, on the same two cores as the stages; the single "
        "node is the bench's own stack. Per hop p50 / p99 ms at the fixed rate.",
        "",
        *hop_table_header("layout | processes per stage | max speed ev/s | fixed rate"),
    ]
    for r in runs:
        st = r.rate_stats
        cells = hop_cells(st)
        lines.append(
            f"| {r.name} | {r.replicas} | {fmt_number(r.max_stats.get('eps'))} | "
            f"{cluster.RATE:,.0f} ev/s (achieved {fmt_number(st.get('eps'))}) | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(
    settings: Settings,
    quick: bool,
    out: Path = DEFAULT_OUT,
    only: frozenset[str] | None = None,
) -> Results:
    """Run the benchmark and write ``out`` (Markdown).

    Args:
        settings: base settings; the bench moves them onto its own ports and home and keeps
            the rest (stage tuning such as ``enrichment.commit_interval_s`` applies).
        quick: a smaller run (under 3 minutes) for a smoke check.
        out: where the results are written.
        only: run just these parts (of ``PARTS``); all of them by default.

    Returns:
        The results that were written.
    """
    unknown = set(only or ()) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown bench parts {sorted(unknown)}; choose from {PARTS}")
    parts = only or frozenset(PARTS)
    began = time.perf_counter()
    command = "rtpipe bench" + (" --quick" if quick else "")
    command += "".join(f" --only {p}" for p in PARTS if only and p in only)
    results = Results(command=command, machine=machine())
    bs = bench_settings(settings)
    logger.info(
        "bench: starting the stack (Kafka :%d, Redis :%d)", bs.stack.kafka_port, bs.stack.redis_port
    )
    with bench_stack(bs):
        data = simulate_data(quick)
        start = data.first_day + pd.Timedelta(days=8)
        logger.info("bench: %d simulated transactions", len(data.tx))
        with feast_project(bs, name="bench") as fs:
            register_model(fs, data.tx)

            if "online" in parts:
                logger.info("bench 1-2/6: online read and write")
                results.rows += online_rows(online.run(fs, quick))

            if "prediction" in parts:
                logger.info("bench 3/6: prediction stage vs naive consumer")
                clear_online_store(fs)
                tx_window = data.tx[data.tx["tx_datetime"] >= start]
                pr = prediction.run(with_prefix(fs, "pred"), tx_window, quick)
                results.rows.append(
                    pr.row(
                        "prediction events/s: stage (micro-batch) vs naive per-event consumer",
                        f"{pr.ours_events:,} vs {pr.baseline_events:,} events, "
                        f"median of {pr.trials}",
                        Goal(">= 100x", min_ratio=100.0),
                    )
                )

            if "enrichment" in parts:
                logger.info("bench 6/6: enrichment with and without windows")
                clear_online_store(fs)
                en = enrichment.run(with_prefix(fs, "enr"), data.tx, start, quick)
                results.rows.append(
                    en.row(
                        "enrichment events/s: all windows vs no windows (state cost)",
                        f"{en.ours_events:,} events, median of {en.trials}; no goal, ratio = "
                        "share of stateless speed kept",
                    )
                )

            if "pipeline" in parts:
                logger.info("bench 4-5/6: whole pipeline")
                clear_online_store(fs)
                pi = pipeline.run(with_prefix(fs, "pipe"), data.tx, start, quick)
                results.rows.append(
                    Row(
                        "whole pipeline events/s (3 stage processes) vs bare consume-produce",
                        pi.max_eps,
                        pi.passthrough_eps,
                        "ev/s",
                        goal=Goal(">= 20% (>= 0.2x)", min_ratio=0.2),
                    )
                )
                results.rows.append(
                    Row(
                        "whole pipeline events/s at max speed, sustained",
                        pi.max_eps,
                        None,
                        "ev/s",
                        goal=Goal(">= 5,000 ev/s", min_ours=5_000.0),
                    )
                )
                p99_goals = {1_000.0: 100.0, pipeline.LOW_RATE: 50.0}
                for ph in pi.phases[1:]:
                    limit = p99_goals.get(ph.offered_eps or 0.0)
                    results.rows.append(
                        Row(
                            f"event-to-decision p99 at {ph.name}",
                            ph.stats.get(f"{pipeline.TOTAL} p99", float("nan")),
                            None,
                            "ms",
                            better="lower",
                            goal=Goal(f"< {limit:.0f} ms", max_ours=limit) if limit else Goal(""),
                            note=f"p50 {fmt_number(ph.stats.get(f'{pipeline.TOTAL} p50'))}"
                            f" ms, achieved {fmt_number(ph.stats.get('eps'))} ev/s",
                        )
                    )
                for serial, overlapped in zip(
                    pi.commit_overlap.get(False, []), pi.commit_overlap.get(True, []), strict=True
                ):
                    rate = overlapped.name.rsplit(", ", 1)[0]
                    what = f"{rate}: commit round trips overlapped vs after the work"
                    results.rows += latency_rows(what, overlapped, serial)
                results.rows += checkpoint_rows(pi)
                results.rows += warmup_rows(pi)
                if pi.cold_starts_s:
                    results.rows.append(
                        Row(
                            "cold start: three stage processes started -> first decision "
                            f"visible (median of {len(pi.cold_starts_s)}; events waiting)",
                            float(np.median(pi.cold_starts_s)),
                            None,
                            "s",
                            better="lower",
                            goal=Goal("< 5 s", max_ours=5.0),
                            note="each: " + ", ".join(f"{c:.1f}" for c in pi.cold_starts_s),
                        )
                    )
                results.sections["Where the latency goes"] = latency_section(pi)
                results.sections["Where the stages wait in their commits"] = commit_wait_section(pi)
                if pi.warmup:
                    results.sections["Broker warm-up"] = warmup_section(pi)

            if "cluster" in parts:
                logger.info("bench 7/7: scale-out (cluster stack, 1 and 2 processes per stage)")
                runs = cluster.run(fs, bs, data.tx, start, quick)
                results.rows += scale_rows(runs)
                results.sections["Scale-out: cluster stack and processes per stage"] = (
                    scale_section(runs)
                )
    results.seconds = time.perf_counter() - began
    out.write_text(results.markdown())
    logger.info("bench: wrote %s in %.0fs", out, results.seconds)
    return results


def _cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller run, under 3 minutes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", action="append", choices=PARTS, help="run just this part")
    args = parser.parse_args()
    settings = Settings()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("quixstreams", "feast", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    main(settings, args.quick, args.out, frozenset(args.only) if args.only else None)


if __name__ == "__main__":
    _cli()
