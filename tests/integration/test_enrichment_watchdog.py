"""The enrichment stage's loop watchdog: a customer app whose loop stops turning (here: its
checkpoint blocked on a Redis that answers nothing, for longer than the watchdog allows)
makes the stage start again as a new process in place (same pid, same log), which resumes
from the committed offsets: every transaction enriched exactly once."""

from __future__ import annotations

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

pytestmark = pytest.mark.integration

RESTARTED = "the stage starts again as a new process"


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def test_stuck_loop_restarts_the_stage_process(
    unique_topics: Settings, small_tx: pd.DataFrame, tmp_path: Path
) -> None:
    base = isolated_settings(unique_topics, tmp_path)
    settings = base.model_copy(
        update={"enrichment": base.enrichment.model_copy(update={"loop_watchdog_s": 4.0})}
    )
    apply_repo(settings)
    ensure_topics(settings.kafka, settings.topics)
    (stage,) = start_stages(settings, ("enrichment",))
    redis = settings.redis.client()
    try:
        wait_until_ready(settings, [stage])
        labels_before = _children(stage.proc.pid)
        # Every Redis command now waits: the first checkpoint with rows to write blocks in
        # the Feast sink (retrying in place) for longer than the watchdog's 4 s.
        redis.execute_command("CLIENT", "PAUSE", 15_000, "ALL")
        start = pd.Timestamp("2018-05-05", tz="UTC")
        result = replay(settings, small_tx, ReplayPlan(start, start + pd.Timedelta(hours=6)))
        assert result.transactions > 20
        deadline = time.monotonic() + 60
        while RESTARTED not in stage.log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the watchdog did not restart the stage"
            assert stage.proc.poll() is None, "the stage exited instead of restarting"
            time.sleep(0.5)
        redis.execute_command("CLIENT", "UNPAUSE")

        deadline = time.monotonic() + 120
        while True:
            records = read_topic(settings, settings.topics.name("enriched"))
            ids = [orjson.loads(v)["transaction_id"] for _, v, _ in records if v]
            if len(ids) >= result.transactions or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert len(ids) == len(set(ids)) == result.transactions
        # The same process, with a new labels process of its own.
        assert stage.proc.poll() is None
        after = _children(stage.proc.pid)
        assert after and not after & labels_before
    finally:
        redis.execute_command("CLIENT", "UNPAUSE")
        codes = stop_stages([stage])
    assert codes == {"enrichment": 0}
