"""The online layout of a Feast project: which views and services exist, where their values
live in Redis (``FORMAT.md``), and how the stages get it without importing Feast.

:meth:`OnlineLayout.from_store` reads the layout from Feast's registry. Importing ``feast``
takes 3-9 s on this 2-core machine (most of a stage's start-up), so ``feast apply``
(``stages.shared.feast_store.apply_repo``) also writes the layout next to the registry file
(:func:`write_snapshot`); :func:`online_layout` reads that snapshot when it was taken from the
registry as it is now (same size and modification time), and otherwise asks Feast (and
refreshes the snapshot).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import yaml

from stages.shared.online.codec import SUPPORTED_DTYPES
from stages.shared.online.errors import FeatureLayoutError
from stages.shared.online.keys import field_key, redis_keys, ts_field
from stages.shared.settings import Settings

if TYPE_CHECKING:
    from feast import FeatureStore

logger = logging.getLogger(__name__)

YAML_FILE = "feature_store.yaml"


@dataclass(frozen=True, slots=True)
class ViewLayout:
    """Where one feature view's values live in Redis.

    Attributes:
        name: the name used in hash fields (the versioned name when Feast versioning is on).
        join_key: the single Int64 join key of the view's entity.
        features: every feature of the view, in the view's schema order.
        dtypes: Feast dtype names of ``features`` (``Int64``, ``Float64``, ...).
        field_keys: the mmh3 hash field of each feature.
        ts_field: the ``_ts:<view>`` hash field.
    """

    name: str
    join_key: str
    features: tuple[str, ...]
    dtypes: tuple[str, ...]
    field_keys: tuple[bytes, ...] = field(init=False)
    ts_field: bytes = field(init=False)

    def __post_init__(self) -> None:
        if len(self.features) != len(self.dtypes):
            raise FeatureLayoutError(self.name, "features and dtypes differ in length")
        for dtype in self.dtypes:
            if dtype not in SUPPORTED_DTYPES:
                raise FeatureLayoutError(self.name, f"unsupported feature dtype {dtype}")
        object.__setattr__(
            self, "field_keys", tuple(field_key(self.name, f) for f in self.features)
        )
        object.__setattr__(self, "ts_field", ts_field(self.name))


@dataclass(frozen=True, slots=True)
class OnlineLayout:
    """The online layout of a Feast project, read once from its registry.

    Attributes:
        project: Feast project (the Redis key suffix).
        views: layout of each feature view, by view name.
        services: per feature service, its ``(view, features)`` projections in order.
        key_ttl_seconds: Feast's ``online_store.key_ttl_seconds`` (``None``: no expiry).
        entity_key_serialization_version: must be 3.
    """

    project: str
    views: Mapping[str, ViewLayout]
    services: Mapping[str, tuple[tuple[str, tuple[str, ...]], ...]]
    key_ttl_seconds: int | None = None
    entity_key_serialization_version: int = 3

    def __post_init__(self) -> None:
        if self.entity_key_serialization_version != 3:
            raise FeatureLayoutError(
                "entity_key_serialization_version",
                f"{self.entity_key_serialization_version}; only version 3 is implemented",
            )

    def view(self, name: str) -> ViewLayout:
        """Layout of a view by name; raises :class:`FeatureLayoutError` if unknown."""
        try:
            return self.views[name]
        except KeyError:
            raise FeatureLayoutError(name, f"no such feature view in {self.project}") from None

    def keys(self, view: str, ids: np.ndarray) -> list[bytes]:
        """Redis keys of ``ids`` for ``view``'s entity."""
        return redis_keys(self.view(view).join_key, self.project, ids)

    def to_json(self) -> bytes:
        """The layout as JSON (:meth:`from_json` reads it back)."""
        return orjson.dumps(
            {
                "project": self.project,
                "views": {
                    k: {
                        "name": v.name,
                        "join_key": v.join_key,
                        "features": v.features,
                        "dtypes": v.dtypes,
                    }
                    for k, v in self.views.items()
                },
                "services": self.services,
                "key_ttl_seconds": self.key_ttl_seconds,
                "entity_key_serialization_version": self.entity_key_serialization_version,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> OnlineLayout:
        """A layout written by :meth:`to_json`."""
        obj = orjson.loads(raw)
        return cls(
            project=obj["project"],
            views={
                k: ViewLayout(v["name"], v["join_key"], tuple(v["features"]), tuple(v["dtypes"]))
                for k, v in obj["views"].items()
            },
            services={
                name: tuple((view, tuple(feats)) for view, feats in projections)
                for name, projections in obj["services"].items()
            },
            key_ttl_seconds=obj["key_ttl_seconds"],
            entity_key_serialization_version=obj["entity_key_serialization_version"],
        )

    @classmethod
    def from_store(cls, store: FeatureStore) -> OnlineLayout:
        """Read the layout of every feature view and service from a store's registry.

        Args:
            store: an open Feast store whose online store is Redis.

        Raises:
            FeatureLayoutError: for layouts not implemented here (composite or non-Int64 join
                keys, unsupported dtypes, a non-Redis online store, serialization != 3).
        """
        from feast.infra.online_stores.helpers import compute_versioned_name

        config = store.config
        online = config.online_store
        if getattr(online, "type", None) != "redis" or getattr(
            online, "redis_type", "redis"
        ) not in (
            "redis",
            "redis_cluster",
            "redis_sentinel",
        ):
            raise FeatureLayoutError(
                "online_store", f"{getattr(online, 'type', online)!r} is not redis"
            )
        versioning = bool(getattr(config.registry, "enable_online_feature_view_versioning", False))
        entities = {e.name: e for e in store.list_entities()}
        views: dict[str, ViewLayout] = {}
        for fv in store.list_feature_views():
            if len(fv.entities) != 1:
                raise FeatureLayoutError(fv.name, f"needs exactly one entity, has {fv.entities}")
            entity = entities[fv.entities[0]]
            join_col = next((c for c in fv.entity_columns if c.name == entity.join_key), None)
            if join_col is not None and str(join_col.dtype) != "Int64":
                raise FeatureLayoutError(fv.name, f"join key {entity.join_key} is {join_col.dtype}")
            views[fv.name] = ViewLayout(
                name=compute_versioned_name(fv, versioning),
                join_key=entity.join_key,
                features=tuple(f.name for f in fv.features),
                dtypes=tuple(str(f.dtype) for f in fv.features),
            )
        services = {
            fs.name: tuple(
                (p.name, tuple(f.name for f in p.features)) for p in fs.feature_view_projections
            )
            for fs in store.list_feature_services()
        }
        return cls(
            project=config.project,
            views=views,
            services=services,
            key_ttl_seconds=getattr(online, "key_ttl_seconds", None),
            entity_key_serialization_version=config.entity_key_serialization_version,
        )


# ------------------------------------------------------------------------------------------
# The snapshot the stages read instead of the registry.


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
