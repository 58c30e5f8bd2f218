"""The entry point of ``rtpipe chaos``: the chosen faults in turn (the Redis and Kafka ones
repeated, the last time under CPU load), each on its own sandbox, and the report."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

from stages.ops.chaos.faults import (
    bad_model,
    cpu_burner,
    kafka_restart,
    kill_stage,
    rebalance,
    redis_outage,
    served_versions,
)
from stages.ops.chaos.report import ChaosConfig, ChaosReport, FaultResult
from stages.ops.chaos.run import FaultRun, fault_settings
from stages.ops.harness.processes import stop_stages
from stages.ops.harness.sandbox import provision
from stages.shared.settings import Settings

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
        burner = cpu_burner() if loaded else None
        result = FaultResult(label)
        t0 = time.monotonic()
        extra: dict[str, object] = {}
        if fault.startswith("redis-review"):
            extra["on_features_unavailable"] = "review"
        elif fault.startswith("redis-pause"):
            extra["on_features_unavailable"] = "pause"
        s = fault_settings(base, root, label.replace("#", "-").split(" ")[0], **extra)
        run = FaultRun(s, settings, tx, cfg, result)
        try:
            version = provision(s, tx[tx["tx_datetime"] < run.plan.start])
            if fault.startswith("kill-"):
                kill_stage(run, fault.removeprefix("kill-"), rng)
            elif fault == "rebalance":
                rebalance(run, rng)
            elif fault.startswith("redis-"):
                redis_outage(run, rng, short=fault.endswith("-short"))
            elif fault == "kafka-restart":
                kafka_restart(run, rng)
            elif fault == "bad-model":
                bad_model(run, rng, version)
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
                result.checks["only_good_version_served"] = served_versions(run) == {version}
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
