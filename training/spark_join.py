"""Point-in-time joins on Feast's Spark offline store, over the file store's Parquet folders.

The feature repo defines one batch source per view, a :class:`~feast.FileSource` on a Parquet
folder relative to the repo (``data/<view>``): that is what ``feast apply`` registers and what
the file store and materialization read. Feast's Spark store only reads
:class:`SparkSource`\\ s, so with ``RTPIPE_FEAST__OFFLINE_STORE=spark`` each join runs against
:func:`spark_store`: a temporary copy of the registry in which every view's batch source is a
``SparkSource`` on the *same* folder (absolute path: Spark resolves a relative one against its
own working directory, not the repo). Views, entities, TTLs and feature services are the
registry's own; only the source kind differs, so the file and Spark stores answer one question.

Semantics that differ from the file store and how they are handled here (both stores take an
event time ``t`` to match feature rows with ``t - ttl <= event_timestamp <= t``, newest event
time first, then newest ``created_timestamp``):

* Entity rows repeating a (join keys, time) pair: the file store returns one of them, the Spark
  store all of them. ``training.dataset`` already sends such rows in separate calls (needed by
  the file store), so both see tie-free entity frames.
* Two feature rows of one key with the same event *and* created time: the file store keeps an
  arbitrary one, the Spark store returns the entity row once per such feature row. Feast
  documents no order for this case; the project's writers never produce it (one row per
  (entity, timestamp), ``training.features``), and :func:`check_one_row_per_entity_row` turns
  it into an error naming the rows rather than a silent duplicate.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from stages.shared.errors import RtpipeError

if TYPE_CHECKING:
    from feast import FeatureStore

logger = logging.getLogger(__name__)


class DuplicateFeatureRowsError(RtpipeError, RuntimeError):
    """A view holds two feature rows of one key with the same event and created time, so the
    Spark store's join returned a transaction more than once."""

    def __init__(self, n_duplicated: int, examples: list[int]) -> None:
        super().__init__(
            f"{n_duplicated} transactions joined more than one feature row per view (e.g. "
            f"transaction ids {examples}): some view has two rows of one key with equal "
            "event_timestamp and created_timestamp; keep one row per (key, timestamp)"
        )
        self.n_duplicated = n_duplicated
        self.examples = examples


def uses_spark(store: FeatureStore) -> bool:
    """Whether ``store`` is configured with Feast's Spark offline store."""
    return str(getattr(store.config.offline_store, "type", "")) == "spark"


@contextmanager
def spark_store(store: FeatureStore) -> Iterator[FeatureStore]:
    """``store`` as the Spark offline store sees it: each view's FileSource as a SparkSource.

    A temporary folder gets a copy of the registry in which every feature view's batch source
    (and its push source's batch source) is a ``SparkSource`` reading the FileSource's Parquet
    folder, with the same name, timestamp fields and field mapping. The returned store has the
    same project, config and feature services; the original registry is only read.

    Args:
        store: a feature store whose config selects the Spark offline store.

    Raises:
        ValueError: a view's batch source is neither a FileSource nor a SparkSource.
    """
    from feast import FeatureStore, FeatureView, FileSource, PushSource
    from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

    repo_path = Path(str(store.config.repo_path))
    registry = Path(store.config.registry.path)
    tmp = Path(tempfile.mkdtemp(prefix="rtpipe-spark-"))
    try:
        config = store.config.model_copy(deep=True)
        if not registry.is_absolute():
            (tmp / registry).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo_path / registry, tmp / registry)
            config.repo_path = tmp
        else:
            copy = tmp / registry.name
            shutil.copy2(registry, copy)
            config.registry.path = str(copy)
            config.repo_path = tmp
        swapped = FeatureStore(repo_path=str(tmp), config=config)
        sources: dict[str, SparkSource] = {}
        for fv in store.list_feature_views():
            src = fv.batch_source
            if isinstance(src, SparkSource):
                continue
            if not isinstance(src, FileSource):
                raise ValueError(f"view {fv.name}: batch source {type(src).__name__} not supported")
            if src.name not in sources:
                sources[src.name] = SparkSource(
                    name=src.name,
                    path=FileSource.get_uri_for_file_path(repo_path, src.path),
                    file_format="parquet",
                    timestamp_field=src.timestamp_field,
                    created_timestamp_column=src.created_timestamp_column,
                    field_mapping=dict(src.field_mapping),
                    description=src.description,
                    tags=dict(src.tags),
                    owner=src.owner,
                )
            spark_src = sources[src.name]
            new = FeatureView.from_proto(fv.to_proto())
            new.batch_source = spark_src
            push = fv.stream_source
            if isinstance(push, PushSource):
                new.stream_source = PushSource(
                    name=push.name,
                    batch_source=spark_src,
                    description=push.description,
                    tags=dict(push.tags),
                    owner=push.owner,
                )
                swapped.registry.apply_data_source(new.stream_source, store.project, commit=False)
            swapped.registry.apply_data_source(spark_src, store.project, commit=False)
            swapped.registry.apply_feature_view(new, store.project, commit=False)
        swapped.registry.commit()
        logger.debug("spark view of %s: %d sources swapped", store.project, len(sources))
        yield swapped
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_one_row_per_entity_row(joined: pd.DataFrame, key: str = "transaction_id") -> None:
    """Fail on entity rows that the join returned more than once (see the module docstring).

    Raises:
        DuplicateFeatureRowsError: some ``key`` occurs more than once.
    """
    dup = joined[key].duplicated(keep=False)
    if dup.any():
        ids = joined.loc[dup, key].drop_duplicates()
        raise DuplicateFeatureRowsError(len(ids), [int(i) for i in ids.head(5)])
