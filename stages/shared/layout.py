"""The online layout for the stages, without importing Feast on every start.

Importing ``feast`` takes 3-9 s on this 2-core machine (most of a stage's start-up), and the
stages need only the layout their reader and writer derive from the registry. ``feast apply``
(``stages.shared.feast_store.apply_repo``) writes that layout next to the registry file; a
stage reads the snapshot when it was taken from the registry as it is now (same size and
modification time), and otherwise asks Feast (and refreshes the snapshot).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import orjson
import yaml

from stages.shared.online import OnlineLayout
from stages.shared.settings import Settings

logger = logging.getLogger(__name__)

YAML_FILE = "feature_store.yaml"


def registry_file(settings: Settings) -> Path | None:
    """The file registry of the repo (None for a registry that is not a local file)."""
    repo = settings.feature_repo.resolve()
    raw: Any = yaml.safe_load((repo / YAML_FILE).read_text())
    reg = raw.get("registry") if isinstance(raw, dict) else None
    path = reg.get("path") if isinstance(reg, dict) else reg
    if not isinstance(path, str) or "://" in path:
        return None
    p = Path(path)
    return p if p.is_absolute() else repo / p


def _snapshot_file(registry: Path, project: str) -> Path:
    return registry.with_name(f"{registry.name}.{project}.layout.json")


def _stamp(registry: Path) -> str:
    st = registry.stat()
    return f"{st.st_mtime_ns}:{st.st_size}"


def write_snapshot(settings: Settings, layout: OnlineLayout) -> Path | None:
    """Record ``layout`` as the one of the registry file as it is now."""
    registry = registry_file(settings)
    if registry is None or not registry.is_file():
        return None
    target = _snapshot_file(registry, settings.feast_project)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    body = orjson.dumps({"registry": _stamp(registry), "layout": orjson.Fragment(layout.to_json())})
    tmp.write_bytes(body)
    tmp.replace(target)
    return target


def online_layout(settings: Settings) -> OnlineLayout:
    """The layout of ``settings``' Feast project: from the snapshot when it is current, from
    the Feast registry otherwise."""
    registry = registry_file(settings)
    if registry is not None and registry.is_file():
        snap = _snapshot_file(registry, settings.feast_project)
        try:
            obj = orjson.loads(snap.read_bytes())
            if obj.get("registry") == _stamp(registry):
                return OnlineLayout.from_json(orjson.dumps(obj["layout"]))
        except (FileNotFoundError, orjson.JSONDecodeError, KeyError, TypeError):
            pass
    from stages.shared.feast_store import open_feature_store

    logger.info("online layout from the Feast registry (no current snapshot)")
    layout = OnlineLayout.from_store(open_feature_store(settings))
    write_snapshot(settings, layout)
    return layout
