"""Opening the Feast feature store from settings, applying the repo, materializing.

The checked-in ``feature_repo/feature_store.yaml`` is the single description of the store; the
process settings override only what differs per deployment (Redis connection and project name),
by building a :class:`feast.RepoConfig` in memory, never by mutating environment variables.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from feast import Entity, FeatureService, FeatureStore, FeatureView, RepoConfig
from feast.data_source import DataSource

from stages.shared.errors import RtpipeError
from stages.shared.settings import FeastSettings, OfflineStoreKind, Settings

logger = logging.getLogger(__name__)

YAML_FILE = "feature_store.yaml"
# The definitions, in dependency order (later modules import earlier ones by bare name, as the
# `feast` CLI puts the repo folder on sys.path).
DEFINITION_MODULES: tuple[str, ...] = (
    "entities",
    "data_sources",
    "feature_views",
    "feature_services",
)


class SparkUnavailableError(RtpipeError, RuntimeError):
    """The Spark offline store is selected but pyspark is not installed."""

    def __init__(self) -> None:
        super().__init__(
            "RTPIPE_FEAST__OFFLINE_STORE=spark needs pyspark: run infra/bootstrap.sh or "
            "pip install -c infra/constraints.txt -e '.[spark]' (and a Java 17 runtime)"
        )


class FeatureRepoError(RtpipeError, RuntimeError):
    """The feature repo folder is missing or its definitions cannot be loaded."""

    def __init__(self, repo: Path, detail: str) -> None:
        super().__init__(f"feature repo {repo}: {detail}")
        self.repo = repo
        self.detail = detail


def spark_offline_config(feast: FeastSettings) -> dict[str, Any]:
    """The ``offline_store`` section for Feast's Spark store, from the settings' Spark keys.

    Feast starts the Spark session itself on the first join (``SparkSession.builder`` with
    this conf) and reuses the process's session after that.

    Raises:
        SparkUnavailableError: pyspark is not installed.
    """
    if importlib.util.find_spec("pyspark") is None:
        raise SparkUnavailableError()
    conf = {
        "spark.master": feast.spark_master,
        "spark.driver.memory": feast.spark_driver_memory,
        "spark.sql.shuffle.partitions": str(feast.spark_shuffle_partitions),
        # Feast compares event times with naive UTC literals and casts timestamps to strings
        # for its row ids: both must be read in UTC, not in the machine's zone.
        "spark.sql.session.timeZone": "UTC",
        # Entity frame in and result out through Arrow instead of row-by-row pickling.
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # No web UI: it would take port 4040 (and the next ones) for every training process.
        "spark.ui.enabled": "false",
        # No console progress bars in the logs of training runs and tests.
        "spark.ui.showConsoleProgress": "false",
        **feast.spark_conf,
    }
    return {"type": "spark", "spark_conf": conf}


def repo_config(settings: Settings, offline_store: OfflineStoreKind | None = None) -> RepoConfig:
    """Build the Feast config: the repo's YAML with Redis and project taken from ``settings``.

    Args:
        settings: process settings; ``feature_repo``, ``feast_project``, ``redis`` and
            ``feast`` (the offline store) are used.
        offline_store: the offline store, instead of ``settings.feast.offline_store``.

    Returns:
        A :class:`RepoConfig` whose ``repo_path`` is the absolute repo folder, so relative
        FileSource and registry paths resolve there whatever the working directory.

    Raises:
        FeatureRepoError: if ``feature_store.yaml`` is missing or not a mapping.
        SparkUnavailableError: the Spark store is selected but pyspark is not installed.
    """
    repo = settings.feature_repo.resolve()
    yaml_path = repo / YAML_FILE
    if not yaml_path.is_file():
        raise FeatureRepoError(repo, f"no {YAML_FILE}; is RTPIPE_FEATURE_REPO right?")
    raw: Any = yaml.safe_load(yaml_path.read_text())
    if not isinstance(raw, dict):
        raise FeatureRepoError(repo, f"{YAML_FILE} is not a mapping")
    online = dict(raw.get("online_store") or {})
    if online.get("type", "redis") != "redis":
        raise FeatureRepoError(repo, f"online_store.type is {online.get('type')!r}, not redis")
    online["type"] = "redis"
    online["connection_string"] = settings.redis.feast_connection_string()
    # Feast's Redis Cluster client (same key layout, startup nodes in the connection string).
    online["redis_type"] = "redis_cluster" if settings.redis.cluster else "redis"
    raw["online_store"] = online
    raw["project"] = settings.feast_project
    if (offline_store or settings.feast.offline_store) == "spark":
        raw["offline_store"] = spark_offline_config(settings.feast)
    config = RepoConfig(**raw)
    config.repo_path = repo
    return config


def open_feature_store(
    settings: Settings, offline_store: OfflineStoreKind | None = None
) -> FeatureStore:
    """Open the feature store described by the repo, connected as ``settings`` say.

    Args:
        settings: process settings.
        offline_store: the offline store, instead of ``settings.feast.offline_store``.

    Returns:
        A :class:`FeatureStore`; the registry is read lazily on first use.
    """
    config = repo_config(settings, offline_store)
    # repo_path matters even with an explicit config: the file registry path
    # (data/registry.db) is resolved against FeatureStore.repo_path, which defaults to the cwd.
    return FeatureStore(repo_path=str(config.repo_path), config=config)


@contextmanager
def _repo_on_path(repo: Path) -> Iterator[None]:
    """Make the repo's bare-name imports resolve to this repo's files, then undo it.

    The definitions import each other by bare module name (``from entities import customer``),
    as the ``feast`` CLI expects; cached modules of the same names (another repo copy loaded
    earlier in this process) are hidden for the duration and restored after.
    """
    saved = {name: sys.modules.pop(name) for name in DEFINITION_MODULES if name in sys.modules}
    sys.path.insert(0, str(repo))
    try:
        yield
    finally:
        sys.path.remove(str(repo))
        for name in DEFINITION_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def load_definitions(repo: Path) -> list[Any]:
    """Import the repo's definition modules and collect the Feast objects they define.

    Args:
        repo: the feature repo folder.

    Returns:
        Entities, data sources (push sources and their batch sources), feature views and
        feature services, each object once, in that order.

    Raises:
        FeatureRepoError: if a definitions module is missing or fails to import.
    """
    repo = repo.resolve()
    modules: list[ModuleType] = []
    with _repo_on_path(repo):
        for name in DEFINITION_MODULES:
            path = repo / f"{name}.py"
            if not path.is_file():
                raise FeatureRepoError(repo, f"missing {path.name}")
            try:
                modules.append(importlib.import_module(name))
            except Exception as exc:
                raise FeatureRepoError(repo, f"cannot import {path.name}: {exc}") from exc

    found: list[Any] = []
    seen: set[int] = set()

    def add(obj: Any) -> None:
        if id(obj) not in seen:
            seen.add(id(obj))
            found.append(obj)

    kinds: tuple[type, ...] = (Entity, DataSource, FeatureView, FeatureService)
    for kind in kinds:
        for module in modules:
            for attr in dir(module):
                obj = getattr(module, attr)
                if isinstance(obj, kind):
                    add(obj)
                    batch = getattr(obj, "batch_source", None)
                    if kind is DataSource and isinstance(batch, DataSource):
                        add(batch)
    return found


def apply_repo(settings: Settings) -> None:
    """Register the repo's definitions in the registry, like ``feast apply`` in the repo folder.

    Objects of this project that are no longer defined in the repo are removed, as the CLI
    does. Creates the registry file (and ``data/``) if needed.

    Args:
        settings: process settings.
    """
    store = open_feature_store(settings)
    objects = load_definitions(settings.feature_repo)
    Path(store.config.repo_path or settings.feature_repo, "data").mkdir(parents=True, exist_ok=True)
    defined = {(type(o).__name__, o.name) for o in objects}
    stale: list[Any] = []
    try:
        current: list[Any] = [
            *store.list_feature_services(),
            *store.list_feature_views(),
            *store.list_entities(),
        ]
        stale = [o for o in current if (type(o).__name__, o.name) not in defined]
    except FileNotFoundError:
        # No registry yet: nothing to delete.
        pass
    store.apply(objects, objects_to_delete=stale, partial=not stale)
    # The stages read this snapshot instead of importing Feast (stages/shared/online/layout.py).
    from stages.shared.online.layout import OnlineLayout, write_snapshot

    write_snapshot(settings, OnlineLayout.from_store(store))
    logger.info(
        "applied feature repo %s to project %s (%d objects, %d removed)",
        settings.feature_repo,
        settings.feast_project,
        len(objects),
        len(stale),
    )


def _views_with_offline_data(store: FeatureStore) -> list[str]:
    """Views whose Parquet source exists and holds at least one part file.

    Feast's file store raises FileNotFoundError on a view whose folder does not exist yet
    (e.g. no label has arrived, so no terminal risk row), failing the whole materialization.
    """
    from feast.infra.offline_stores.file_source import FileSource

    names: list[str] = []
    for fv in store.list_feature_views():
        source = fv.batch_source
        if not isinstance(source, FileSource):
            names.append(fv.name)
            continue
        path = Path(FileSource.get_uri_for_file_path(store.config.repo_path, source.path))
        if path.is_file() or (path.is_dir() and any(path.glob("[!._]*.parquet"))):
            names.append(fv.name)
        else:
            logger.info("no offline data for %s at %s; not materializing it", fv.name, path)
    return names


def materialize(settings: Settings, start: datetime, end: datetime) -> None:
    """Load the latest offline rows with event time in ``[start, end]`` into the online store.

    Views without any offline data yet are skipped (and logged).

    Args:
        settings: process settings.
        start: start of the event-time range (timezone-aware; naive means UTC).
        end: end of the event-time range.
    """
    # The registry's batch sources are FileSources, which only the file store reads; the
    # Spark store is wired for training joins (training.spark_join), not for materialization.
    store = open_feature_store(settings, offline_store="file")
    views = _views_with_offline_data(store)
    if views:
        store.materialize(start_date=start, end_date=end, feature_views=views)
    logger.info("materialized %s .. %s of %s into %s", start, end, views, settings.feast_project)


def materialize_incremental(settings: Settings, end: datetime) -> None:
    """Materialize everything since the previous materialization (or the view TTL) up to ``end``.

    Views without any offline data yet are skipped (and logged).

    Args:
        settings: process settings.
        end: end of the event-time range (timezone-aware; naive means UTC).
    """
    # The registry's batch sources are FileSources, which only the file store reads; the
    # Spark store is wired for training joins (training.spark_join), not for materialization.
    store = open_feature_store(settings, offline_store="file")
    views = _views_with_offline_data(store)
    if views:
        store.materialize_incremental(end_date=end, feature_views=views)
    logger.info(
        "materialized %s incrementally up to %s into %s", views, end, settings.feast_project
    )
