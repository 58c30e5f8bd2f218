"""Feast's Redis key encoding: the hash key of an entity and the hash fields of a view.

Pure bytes, no client (as Feast keeps ``key_encoding_utils`` apart from its stores); the
layout itself is described in ``FORMAT.md`` next to this module.
"""

from __future__ import annotations

import struct
from typing import Final

import mmh3
import numpy as np

# feast.protos.feast.types.Value_pb2.ValueType enum values used in the entity key encoding.
_VT_STRING: Final = 2
_VT_INT64: Final = 4


def field_key(view: str, feature: str) -> bytes:
    """Hash field of one feature, as Feast's ``_mmh3(f"{view}:{feature}")`` computes it."""
    return struct.pack("<I", mmh3.hash(f"{view}:{feature}", signed=False))


def ts_field(view: str) -> bytes:
    """Hash field holding the serialized event Timestamp of ``view``'s row."""
    return f"_ts:{view}".encode()


def entity_key_prefix(join_key: str) -> bytes:
    """Serialized entity key (version 3) of a single Int64 join key, up to the 8 value bytes."""
    encoded = join_key.encode()
    return (
        struct.pack("<III", 1, _VT_STRING, len(encoded))
        + encoded
        + struct.pack("<II", _VT_INT64, 8)
    )


def redis_keys(join_key: str, project: str, ids: np.ndarray) -> list[bytes]:
    """Redis keys of many Int64 entity ids, vectorised.

    Args:
        join_key: the entity's join key, e.g. ``customer_id``.
        project: the Feast project.
        ids: integer entity ids.

    Returns:
        ``serialize_entity_key(EntityKey(join_key=id), 3) + project`` for each id, in order.
    """
    prefix = entity_key_prefix(join_key)
    suffix = project.encode()
    n = len(ids)
    width = len(prefix) + 8 + len(suffix)
    rows = np.empty((n, width), dtype=np.uint8)
    rows[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    rows[:, len(prefix) : len(prefix) + 8] = (
        np.ascontiguousarray(ids, dtype="<i8").view(np.uint8).reshape(n, 8)
    )
    rows[:, len(prefix) + 8 :] = np.frombuffer(suffix, dtype=np.uint8)
    buf = rows.tobytes()
    return [buf[i : i + width] for i in range(0, n * width, width)]
