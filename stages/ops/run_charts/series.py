"""Time series from sampled frames: per-second rates of counters, gauges, and the quantiles
of a histogram's observations between consecutive scrapes (Prometheus' ``histogram_quantile``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from stages.ops.run_charts.sampling import Frame


def _by_stage(frames: Sequence[Frame], name: str) -> dict[str, list[Frame]]:
    """Per stage, in time order, the frames that hold samples of ``name``."""
    out: dict[str, list[Frame]] = {}
    for f in sorted(frames, key=lambda f: f.t):
        if f.up and any(n == name for n, _ in f.samples):
            out.setdefault(f.stage, []).append(f)
    return out


def _total(f: Frame, name: str) -> float:
    return sum(v for (n, _), v in f.samples.items() if n == name)


def _increase(prev: float, cur: float) -> float:
    """Counter increase between two scrapes; a drop means the process restarted."""
    return cur if cur < prev else cur - prev


def rate_series(
    frames: Sequence[Frame], name: str, t0: float
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per stage: (seconds since ``t0``, per-second rate of the counter ``name`` summed over
    its labels), one point per pair of consecutive scrapes."""
    out = {}
    for stage, fs in _by_stage(frames, name).items():
        ts, rates = [], []
        for a, b in itertools.pairwise(fs):
            dt = b.t - a.t
            if dt <= 0:
                continue
            ts.append(b.t - t0)
            rates.append(_increase(_total(a, name), _total(b, name)) / dt)
        if ts:
            out[stage] = (np.asarray(ts), np.asarray(rates))
    return out


def gauge_series(
    frames: Sequence[Frame], name: str, t0: float
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per stage: (seconds since ``t0``, the gauge ``name`` summed over its labels)."""
    out = {}
    for stage, fs in _by_stage(frames, name).items():
        pts = [(f.t - t0, _total(f, name)) for f in fs]
        if pts:
            out[stage] = (np.asarray([p[0] for p in pts]), np.asarray([p[1] for p in pts]))
    return out


def _buckets(f: Frame, name: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for (n, labels), v in f.samples.items():
        if n == name:
            le = dict(labels).get("le")
            if le is not None:
                bound = float("inf") if le in ("+Inf", "inf") else float(le)
                out[bound] = out.get(bound, 0.0) + v
    return out


def top_bound(frames: Sequence[Frame], name: str) -> float | None:
    for f in frames:
        finite = [b for b in _buckets(f, name) if np.isfinite(b)]
        if finite:
            return max(finite)
    return None


def histogram_quantile(q: float, bounds: np.ndarray, cumulative: np.ndarray) -> float:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket holding the
    rank; NaN without observations; the highest finite bound if the rank is in ``+Inf``."""
    total = cumulative[-1] if len(cumulative) else 0.0
    if total <= 0:
        return float("nan")
    rank = q * total
    i = int(np.searchsorted(cumulative, rank, side="left"))
    i = min(i, len(bounds) - 1)
    if np.isinf(bounds[i]):
        return float(bounds[i - 1]) if i > 0 else float("nan")
    lo_bound = bounds[i - 1] if i > 0 else 0.0
    lo_count = cumulative[i - 1] if i > 0 else 0.0
    in_bucket = cumulative[i] - lo_count
    if in_bucket <= 0:
        return float(bounds[i])
    return float(lo_bound + (bounds[i] - lo_bound) * (rank - lo_count) / in_bucket)


def quantile_series(
    frames: Sequence[Frame],
    name: str,
    quantiles: Sequence[float],
    t0: float,
    stage: str = "routing",
) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """Quantiles of a histogram's observations *between* consecutive scrapes of one stage."""
    fs = _by_stage(frames, name).get(stage, [])
    ts: list[float] = []
    values: dict[float, list[float]] = {q: [] for q in quantiles}
    for a, b in itertools.pairwise(fs):
        ba, bb = _buckets(a, name), _buckets(b, name)
        if not bb:
            continue
        bounds = np.asarray(sorted(bb))
        cum = np.asarray([_increase(ba.get(k, 0.0), bb[k]) for k in bounds])
        cum = np.maximum.accumulate(cum)
        if cum[-1] <= 0:
            continue
        ts.append(b.t - t0)
        for q in quantiles:
            values[q].append(histogram_quantile(q, bounds, cum))
    return np.asarray(ts), {q: np.asarray(v) for q, v in values.items()}
