"""Appending feature rows to Feast's offline store: Parquet part files, one folder per view.

Each feature view's FileSource points at a directory (``data/<view>``, relative to the feature
repo). Writers only ever add a new part file, written under a hidden temporary name and renamed
into place, so readers (Feast's Dask offline store, training) never see a partial file: Arrow
and Dask skip names that start with ``.`` or ``_``. Every part has the same Arrow schema, so the
directory reads as one table.
"""

from __future__ import annotations

import logging
import os
import uuid
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Final

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stages.shared.errors import RtpipeError
from stages.shared.settings import Settings

logger = logging.getLogger(__name__)

EVENT_TIMESTAMP: Final = "event_timestamp"
CREATED_TIMESTAMP: Final = "created_timestamp"
_ARROW_TYPES: Final = {
    "Int64": pa.int64(),
    "Int32": pa.int32(),
    "Float64": pa.float64(),
    "Float32": pa.float32(),
    "Bool": pa.bool_(),
}
_TS_TYPE: Final = pa.timestamp("us", tz="UTC")


class OfflineSchemaError(RtpipeError, ValueError):
    """A frame does not match the feature view it is written to."""

    def __init__(self, view: str, detail: str) -> None:
        super().__init__(f"offline rows for {view}: {detail}")
        self.view = view
        self.detail = detail


@lru_cache(maxsize=8)
def _schemas(repo: Path) -> dict[str, pa.Schema]:
    from feast import FeatureView

    from stages.shared.feast_store import load_definitions

    schemas: dict[str, pa.Schema] = {}
    entities = {o.name: o for o in load_definitions(repo) if type(o).__name__ == "Entity"}
    for obj in load_definitions(repo):
        if not isinstance(obj, FeatureView):
            continue
        fields = [pa.field(entities[e].join_key, pa.int64(), nullable=False) for e in obj.entities]
        for feat in obj.features:
            dtype = str(feat.dtype)
            if dtype not in _ARROW_TYPES:
                raise OfflineSchemaError(obj.name, f"unsupported dtype {dtype} of {feat.name}")
            fields.append(pa.field(feat.name, _ARROW_TYPES[dtype]))
        fields.append(pa.field(EVENT_TIMESTAMP, _TS_TYPE, nullable=False))
        fields.append(pa.field(CREATED_TIMESTAMP, _TS_TYPE, nullable=False))
        schemas[obj.name] = pa.schema(fields)
    return schemas


def view_schema(settings: Settings, view: str) -> pa.Schema:
    """The Arrow schema of ``view``'s part files, from the repo's definitions (no registry).

    Raises:
        OfflineSchemaError: ``view`` is not defined in the repo.
    """
    schemas = _schemas(settings.feature_repo.resolve())
    if view not in schemas:
        raise OfflineSchemaError(view, f"no such feature view; known: {sorted(schemas)}")
    return schemas[view]


def _column(view: str, df: pd.DataFrame, f: pa.Field) -> pa.Array:
    col = df[f.name]
    if pa.types.is_timestamp(f.type):
        if not isinstance(col.dtype, pd.DatetimeTZDtype):
            raise OfflineSchemaError(view, f"{f.name} must be timezone-aware, got {col.dtype}")
        if col.isna().any():
            raise OfflineSchemaError(view, f"{f.name} has missing values")
        return pa.array(col.dt.tz_convert("UTC"), type=f.type)
    kind = col.dtype.kind
    if pa.types.is_integer(f.type):
        if kind not in "iu":
            raise OfflineSchemaError(view, f"{f.name} must be integer, got {col.dtype}")
    elif pa.types.is_floating(f.type):
        if kind not in "iuf":
            raise OfflineSchemaError(view, f"{f.name} must be numeric, got {col.dtype}")
    elif pa.types.is_boolean(f.type) and kind != "b":
        raise OfflineSchemaError(view, f"{f.name} must be bool, got {col.dtype}")
    try:
        return pa.array(col.to_numpy(), type=f.type, from_pandas=True, safe=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise OfflineSchemaError(view, f"{f.name}: {exc}") from exc


def write_offline(settings: Settings, view: str, df: pd.DataFrame) -> Path:
    """Append ``df`` to ``view``'s offline history as one new Parquet part file.

    Args:
        settings: process settings (``offline_dir`` and the feature repo).
        view: feature view name, e.g. ``customer_spending``.
        df: exactly the join key, the view's features, ``event_timestamp`` and
            ``created_timestamp`` (timezone-aware; stored as UTC microseconds).

    Returns:
        Path of the new part file.

    Raises:
        OfflineSchemaError: missing/extra columns, wrong dtypes, naive or missing timestamps.
    """
    schema = view_schema(settings, view)
    missing = [n for n in schema.names if n not in df.columns]
    extra = [c for c in df.columns if c not in schema.names]
    if missing or extra:
        raise OfflineSchemaError(view, f"missing columns {missing}, unexpected {extra}")
    table = pa.Table.from_arrays([_column(view, df, f) for f in schema], schema=schema)

    folder = settings.offline_dir / view
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"part-{stamp}-{uuid.uuid4().hex}.parquet"
    tmp = folder / f".{name}.tmp"
    final = folder / name
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    logger.debug("wrote %d rows to %s", table.num_rows, final)
    return final


def read_offline(settings: Settings, view: str) -> pd.DataFrame:
    """Every row of ``view``'s offline history (all part files), in no particular order.

    Returns:
        A frame with the view's columns; empty (with those columns) when nothing was written.
    """
    schema = view_schema(settings, view)
    folder = settings.offline_dir / view
    parts = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
    if not parts:
        return schema.empty_table().to_pandas()
    tables = [pq.read_table(p, schema=schema) for p in parts]
    return pa.concat_tables(tables).to_pandas()
