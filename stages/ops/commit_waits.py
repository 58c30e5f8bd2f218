"""Where the stages' loops wait in their exactly-once commits, from their own metrics.

Each stage process times the steps of every commit it waits for
(``rtpipe_commit_phase_seconds{stage, phase}``, stages/shared/metrics.COMMIT_PHASES). Read
from the processes' ``/metrics`` before and after a stretch of traffic, the difference of
each step's sum over the stretch's wall time is the share of that time the stage's loop
spent waiting for it, and over its count the mean wait per commit. A share near 1 for a
stage is a stage whose loop mostly waits for the broker, not one that computes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from stages.ops.scrape import family_samples
from stages.shared.settings import Settings
from stages.shared.topology import PIPELINE_STAGES

PHASE_METRIC = "rtpipe_commit_phase_seconds"

# (stage label, phase) -> (seconds waited in total, commits), as a process reports them.
Totals = dict[tuple[str, str], tuple[float, float]]


def read_totals(host: str, ports: Iterable[int], timeout_s: float = 2.0) -> Totals:
    """The commit-step totals of the processes serving metrics on ``ports``, summed (a
    process not serving is skipped: it has waited for nothing yet)."""
    totals: Totals = {}
    for sample in family_samples(host, ports, PHASE_METRIC, timeout_s):
        kind = sample.name.removeprefix(PHASE_METRIC)
        if kind not in ("_sum", "_count"):
            continue
        key = (sample.labels.get("stage", ""), sample.labels.get("phase", ""))
        seconds, count = totals.get(key, (0.0, 0.0))
        if kind == "_sum":
            seconds += sample.value
        else:
            count += sample.value
        totals[key] = (seconds, count)
    return totals


def pipeline_ports(settings: Settings) -> list[int]:
    """The metrics ports of the pipeline's stage processes (one replica each, the
    enrichment stage's labels process included)."""
    return [p for stage in PIPELINE_STAGES for p in settings.metrics.ports(stage)]


@dataclass(frozen=True, slots=True)
class CommitWait:
    """One stage's wait for one commit step over a stretch of wall time."""

    share: float  # of the stretch's wall time, 0..1
    mean_ms: float  # per commit (NaN without commits)
    commits: int


def waits_between(
    before: Totals, after: Totals, seconds: float
) -> dict[tuple[str, str], CommitWait]:
    """Each (stage, phase)'s wait between two readings ``seconds`` apart.

    Raises:
        ValueError: for a stretch that is not positive.
    """
    if seconds <= 0:
        raise ValueError(f"a stretch of {seconds} s has no wall time to share")
    out: dict[tuple[str, str], CommitWait] = {}
    for key, (total, count) in after.items():
        total0, count0 = before.get(key, (0.0, 0.0))
        waited, commits = total - total0, round(count - count0)
        mean = 1000.0 * waited / commits if commits > 0 else float("nan")
        out[key] = CommitWait(waited / seconds, mean, commits)
    return out


def stage_shares(waits: Mapping[tuple[str, str], CommitWait]) -> dict[str, float]:
    """Per stage, the share of the stretch its loop waited in any commit step."""
    shares: dict[str, float] = {}
    for (stage, _), w in waits.items():
        shares[stage] = shares.get(stage, 0.0) + w.share
    return shares
