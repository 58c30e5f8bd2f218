"""The Grafana dashboard (infra/grafana/dashboards/rtpipe.json) queries only metrics the
stages export (stages/shared/metrics.py), with the label names those metrics carry."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

from stages.shared.metrics import build_metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "infra/grafana/dashboards/rtpipe.json"
SUFFIXES = ("_total", "_sum", "_count", "_bucket", "_created")


def _exported() -> dict[str, set[str]]:
    """Sample name -> label names, of every metric the stages register."""
    metrics = build_metrics()
    out: dict[str, set[str]] = {}
    for field in fields(metrics):
        metric = getattr(metrics, field.name)
        if field.name == "registry":
            continue
        name, labels = metric._name, set(metric._labelnames)
        for sample in [name, *(name + s for s in SUFFIXES)]:
            out[sample] = labels
    return out


def test_every_panel_queries_exported_metrics_by_their_labels() -> None:
    exported = _exported()
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    queried = set()
    for panel in panels:
        for target in panel["targets"]:
            expr = target["expr"]
            names = re.findall(r"\brtpipe_[a-z_]+", expr)
            assert names, expr
            for name in names:
                assert name in exported, f"{panel['title']}: {name} is not exported"
                queried.add(name)
            for group in re.findall(r"by \(([^)]*)\)", expr):
                used = {g.strip() for g in group.split(",")} - {"le"}
                assert any(used <= exported[n] for n in names), (panel["title"], used)
    assert "rtpipe_commit_phase_seconds_sum" in queried
