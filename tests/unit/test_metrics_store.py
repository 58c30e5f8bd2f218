"""Counters stay in this process's memory, one set per registry, even though Feast's metrics
module switches prometheus_client to its multiprocess files when it is imported first (what
made the evaluation stage's test fail after the retraining test in one pytest process: the
second run's counters started from the first's)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import REPO

PROBE = """
import training.train  # imports Feast (feast.feature_store -> feast.metrics) first
import feast.metrics
import prometheus_client.values as values
from stages.shared.metrics import build_metrics

first = build_metrics()
first.messages_in.labels("evaluation").inc(7)
second = build_metrics()
print(values.ValueClass.__name__, second.registry.get_sample_value(
    "rtpipe_messages_in_total", {"stage": "evaluation"}
))
"""


def test_two_registries_do_not_share_counters_after_feast_is_imported() -> None:
    env = {k: v for k, v in os.environ.items() if "PROMETHEUS" not in k.upper()}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    store, count = out.stdout.split()[-2:]
    assert store == "MutexValue"
    assert count == "None"  # the second registry's counter is new (unset), not 7
