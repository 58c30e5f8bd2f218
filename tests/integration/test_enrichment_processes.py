"""The enrichment stage runs as two processes (customer windows, and the label index in a
supervised child): the child is restarted when it dies, dies with the stage, and events keep
flowing through both consumer groups exactly once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import orjson
import pandas as pd
import pytest

from stages.ops.audit import read_topic
from stages.ops.harness.processes import start_stages, stop_stages
from stages.ops.harness.readiness import wait_until_ready
from stages.ops.harness.sandbox import isolated_settings
from stages.ops.replay import ReplayPlan, replay
from stages.shared.feast_store import apply_repo
from stages.shared.kafka import ensure_topics
from stages.shared.settings import Settings
from tests.support import wait_until

pytestmark = pytest.mark.integration


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_labels_process_is_restarted_and_dies_with_the_stage(
    unique_topics: Settings,
    small_tx: pd.DataFrame,
    tmp_path: Path,
) -> None:
    settings = isolated_settings(unique_topics, tmp_path)
    apply_repo(settings)
    ensure_topics(settings.kafka, settings.topics)
    (stage,) = start_stages(settings, ("enrichment",))
    try:
        first = wait_until("the labels process", lambda: _children(stage.proc.pid), 30)
        assert len(first) == 1
        wait_until_ready(settings, [stage])

        # A crash of the labels process: the stage starts a new one.
        os.kill(first[0], signal.SIGKILL)
        second = wait_until(
            "a new labels process",
            lambda: [c for c in _children(stage.proc.pid) if c not in first],
            30,
        )
        assert stage.proc.poll() is None

        # Both groups still work: every replayed transaction is enriched exactly once.
        start = pd.Timestamp("2018-05-05", tz="UTC")
        plan = ReplayPlan(start, start + pd.Timedelta(hours=12))
        result = replay(settings, small_tx, plan)
        assert result.transactions > 50

        def enriched() -> list[int] | None:
            records = read_topic(settings, settings.topics.name("enriched"))
            ids = [orjson.loads(value)["transaction_id"] for _, value, _ in records if value]
            return ids if len(ids) >= result.transactions else None

        ids = wait_until("every transaction enriched", enriched, 120)
        assert len(ids) == len(set(ids)) == result.transactions

        # The stage killed outright: its labels process does not outlive it.
        os.kill(stage.proc.pid, signal.SIGKILL)
        stage.proc.wait(10)
        wait_until("the orphaned labels process to exit", lambda: not _alive(second[0]), 30)
    finally:
        stop_stages([stage])


def test_sigterm_during_start_up_is_a_clean_exit(unique_topics: Settings, tmp_path: Path) -> None:
    # Stopped a second after launch: still importing, building its apps, or starting the
    # labels process. Every stage exits 0, and no labels process is left behind.
    settings = isolated_settings(unique_topics, tmp_path)
    apply_repo(settings)
    ensure_topics(settings.kafka, settings.topics)
    procs = start_stages(settings, ("enrichment", "routing"))
    time.sleep(1.0)
    children = _children(procs[0].proc.pid)
    assert stop_stages(procs) == {"enrichment": 0, "routing": 0}
    for child in children:
        wait_until("the labels process to exit", lambda c=child: not _alive(c), 30)
