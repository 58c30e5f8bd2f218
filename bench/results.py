"""Pure parts of the benchmark: repeated-trial medians, ratios, the goal check and the
Markdown results table. Unit-tested without Kafka or Redis (tests/unit/test_bench.py).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

# Whether a bigger or a smaller "ours" is better for a line.
Better = Literal["higher", "lower"]


def median(values: Sequence[float]) -> float:
    """Median of repeated trials; NaN when there are none."""
    return float(statistics.median(values)) if values else float("nan")


def time_trials(fn: Callable[[int], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls ``fn(i)`` after ``warmup`` unrecorded calls."""
    for i in range(warmup):
        fn(-1 - i)
    out = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out


def interleaved(fns: Mapping[str, Callable[[int], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of ``repeats`` trials of each contender, taking turns trial by trial so that
    noise on a shared machine hits them alike; one unrecorded warm-up call each (``i=-1``)."""
    for fn in fns.values():
        fn(-1)
    out: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(i)
            out[name].append(time.perf_counter() - start)
    return out


def ratio(ours: float, baseline: float, better: Better = "higher") -> float:
    """How many times better ours is than the baseline (>1 = ours better), for rates
    (``higher``) or durations (``lower``). NaN when either side is missing or zero."""
    if not (ours > 0 and baseline > 0):
        return float("nan")
    return ours / baseline if better == "higher" else baseline / ours


@dataclass(frozen=True)
class Versus:
    """Events/s of ours against a baseline's, each the median of ``trials`` runs over
    its number of events."""

    ours_eps: float
    baseline_eps: float
    ours_events: int
    baseline_events: int
    trials: int

    def row(self, what: str, note: str, goal: Goal | None = None) -> Row:
        """The results line of this comparison (events/s, higher is better)."""
        return Row(what, self.ours_eps, self.baseline_eps, "ev/s", goal=goal or NO_GOAL, note=note)


@dataclass(frozen=True)
class Goal:
    """A goal on a line's ratio (``min_ratio``) or on ``ours`` itself (``max_ours`` or
    ``min_ours``)."""

    text: str
    min_ratio: float | None = None
    max_ours: float | None = None
    min_ours: float | None = None

    def met(self, ours: float, r: float) -> bool | None:
        """True/False, or None when the line has no goal or no number."""
        if self.min_ratio is not None:
            return None if r != r else r >= self.min_ratio
        if self.max_ours is not None:
            return None if ours != ours else ours <= self.max_ours
        if self.min_ours is not None:
            return None if ours != ours else ours >= self.min_ours
        return None


NO_GOAL = Goal("")


@dataclass(frozen=True)
class Row:
    """One line of the results table: what, ours, baseline, ratio, goal, met?"""

    what: str
    ours: float
    baseline: float | None
    unit: str
    better: Better = "higher"
    goal: Goal = NO_GOAL
    note: str = ""

    @property
    def ratio(self) -> float:
        if self.baseline is None:
            return float("nan")
        return ratio(self.ours, self.baseline, self.better)

    @property
    def met(self) -> bool | None:
        return self.goal.met(self.ours, self.ratio)


def fmt_number(value: float | None, unit: str = "") -> str:
    """Readable number: thousands separators, 3 significant digits below 100."""
    if value is None or value != value:
        return "n/a"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def fmt_ratio(r: float) -> str:
    if r != r:
        return "n/a"
    return f"{r:.2f}x" if r < 10 else f"{r:,.0f}x"


def fmt_met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[met]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Row]) -> str:
    """The results as a Markdown table (one line per row)."""
    lines = [
        "| what | ours | baseline | ratio | goal | met? |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        what = r.what + (f" ({r.note})" if r.note else "")
        lines.append(
            "| "
            + " | ".join(
                _cell(c)
                for c in (
                    what,
                    fmt_number(r.ours, r.unit),
                    fmt_number(r.baseline, r.unit) if r.baseline is not None else "-",
                    fmt_ratio(r.ratio),
                    r.goal.text or "-",
                    fmt_met(r.met),
                )
            )
            + " |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Machine:
    cores: int
    memory_gb: float
    load_avg: tuple[float, float, float]
    python: str
    platform: str

    def describe(self) -> str:
        l1, l5, l15 = self.load_avg
        return (
            f"{self.cores} cores, {self.memory_gb:.1f} GB RAM, load average at start "
            f"{l1:.2f} / {l5:.2f} / {l15:.2f} (1/5/15 min), Python {self.python}, {self.platform}"
        )


def _memory_gb(meminfo: str) -> float:
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def machine() -> Machine:
    """Cores, memory and load average now."""
    try:
        with open("/proc/meminfo") as fh:
            mem = _memory_gb(fh.read())
    except OSError:
        mem = float("nan")
    load = os.getloadavg()
    return Machine(
        cores=os.cpu_count() or 0,
        memory_gb=mem,
        load_avg=(load[0], load[1], load[2]),
        python=platform.python_version(),
        platform=platform.platform(terse=True),
    )


@dataclass
class Results:
    """Everything one run measured, in the order the table shows it."""

    command: str
    machine: Machine
    rows: list[Row] = field(default_factory=list)
    sections: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def markdown(self) -> str:
        met = [r.met for r in self.rows if r.met is not None]
        parts = [
            "# rtpipe bench results",
            "",
            f"Command: `{self.command}`  ",
            f"Machine: {self.machine.describe()}  ",
            f"Run time: {self.seconds:.0f} s. Goals met: {sum(met)} of {len(met)}.",
            "",
            "Medians of repeated trials, ours and the baseline measured side by side in the "
            "same run. Ratio > 1 means ours is better (faster, or more events/s). The machine "
            "is shared and noisy: compare ratios, not absolute numbers across runs.",
            "",
            markdown_table(self.rows),
        ]
        for title, body in self.sections.items():
            parts += ["", f"## {title}", "", body.rstrip()]
        return "\n".join(parts) + "\n"
