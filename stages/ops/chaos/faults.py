"""The faults, each acting on a :class:`~stages.ops.chaos.run.FaultRun` while its replay
streams: stage kills, a rebalance, Redis and Kafka outages, bad model versions; and the CPU
burner that loads the machine for the last run of a repeated fault."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request

from stages.ops.chaos.run import FaultRun
from stages.ops.harness.processes import exited, kill9, start_stage
from stages.shared.settings import Settings


def _random_fractions(rng: random.Random, n: int, span: float = 0.85) -> list[float]:
    """``n`` increasing progress fractions in ``(0, span)``: one random point per slice."""
    width = span / n
    return [i * width + rng.uniform(0.1, 0.9) * width for i in range(n)]


def kill_stage(run: FaultRun, stage: str, rng: random.Random) -> None:
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


def rebalance(run: FaultRun, rng: random.Random) -> None:
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


def redis_outage(run: FaultRun, rng: random.Random, short: bool = False) -> None:
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


def kafka_restart(run: FaultRun, rng: random.Random) -> None:
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


def bad_model(run: FaultRun, rng: random.Random, good_version: str) -> None:
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


def served_versions(run: FaultRun) -> set[str]:
    from stages.ops.audit import read_topic

    versions = set()
    for topic in run.settings.topics.decision_topics():
        for _k, value, _h in read_topic(run.settings, topic):
            if value:
                versions.add(str(json.loads(value).get("model_version")))
    return versions


def cpu_burner() -> subprocess.Popen[bytes]:
    """A process that keeps one core busy until killed (the machine under load)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])
