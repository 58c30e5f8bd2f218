"""Serving a feature service for a whole micro-batch in one round trip.

Each entity id is fetched once with one ``HMGET`` of every requested field of every view of
the service on its entity (views of the same entity share the hash, ``FORMAT.md``); the
replies are decoded column by column (``codec.py``) into one float64 matrix in the service's
feature order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from stages.shared.online.codec import (
    TS_WIDTH,
    VALUE_WIDTH,
    RawAt,
    decode_timestamp_ms,
    decode_timestamps_matrix,
    decode_value,
    decode_values_matrix,
    fixed_width,
)
from stages.shared.online.errors import FeatureLayoutError
from stages.shared.online.layout import OnlineLayout
from stages.shared.online.transport import HmgetCommand, RedisClient, transport_for

if TYPE_CHECKING:
    from feast import FeatureStore

# Up to this many distinct entities, replies are decoded value by value.
_SCALAR_ROWS: Final = 16


@dataclass(frozen=True, slots=True)
class OnlineBatch:
    """Online features of one micro-batch.

    Attributes:
        values: float64 ``(n, n_features)`` in the feature service's order; NaN where missing.
        event_ts_ms: per view, the row's event time in epoch ms (0 where the view is missing).
        found: per view, whether the entity has a row of that view.
        feature_names: column names of ``values``.
    """

    values: np.ndarray
    event_ts_ms: dict[str, np.ndarray]
    found: dict[str, np.ndarray]
    feature_names: tuple[str, ...]

    def take(self, keep: np.ndarray) -> OnlineBatch:
        """The rows where ``keep`` (a boolean mask) is True."""
        return OnlineBatch(
            values=self.values[keep],
            event_ts_ms={v: ts[keep] for v, ts in self.event_ts_ms.items()},
            found={v: f[keep] for v, f in self.found.items()},
            feature_names=self.feature_names,
        )


@dataclass(frozen=True, slots=True)
class _ViewRead:
    view: str
    join_key: str
    fields: tuple[bytes, ...]  # requested feature fields, then the _ts field
    columns: tuple[int, ...]  # output column of each requested feature


@dataclass(frozen=True, slots=True)
class _EntityRead:
    """One ``HMGET`` per entity for every view of the service on that entity (views of the
    same entity share the hash)."""

    command: HmgetCommand
    views: tuple[tuple[_ViewRead, int], ...]  # each view and where its fields start

    @classmethod
    def build(cls, join_key: str, project: str, views: Sequence[_ViewRead]) -> _EntityRead:
        fields: list[bytes] = []
        placed = []
        for v in views:
            placed.append((v, len(fields)))
            fields.extend(v.fields)
        return cls(HmgetCommand.build(join_key, project, fields), tuple(placed))


class OnlineFeatureReader:
    """Serves a feature service for a whole micro-batch in one pipelined round trip.

    Args:
        redis_client: a redis-py client (or anything meeting :class:`RedisClient`).
        store_or_layout: an open Feast store (its registry is read once, here) or a layout.
        feature_service_name: the feature service to serve, e.g. ``fraud_model_v1``.
        full_feature_names: name columns ``view__feature`` instead of ``feature``.
        exclude_views: views of the service not to read (computed elsewhere, on demand).

    Raises:
        FeatureLayoutError: unknown service or a layout not implemented here.
    """

    def __init__(
        self,
        redis_client: RedisClient,
        store_or_layout: FeatureStore | OnlineLayout,
        feature_service_name: str,
        *,
        full_feature_names: bool = False,
        exclude_views: Sequence[str] = (),
    ) -> None:
        layout = (
            store_or_layout
            if isinstance(store_or_layout, OnlineLayout)
            else OnlineLayout.from_store(store_or_layout)
        )
        if feature_service_name not in layout.services:
            raise FeatureLayoutError(
                feature_service_name, f"no such feature service in project {layout.project}"
            )
        self._client = redis_client
        self._layout = layout
        self.feature_service_name = feature_service_name
        reads: list[_ViewRead] = []
        names: list[str] = []
        for view_name, features in layout.services[feature_service_name]:
            if view_name in exclude_views:
                continue
            view = layout.view(view_name)
            index = {f: i for i, f in enumerate(view.features)}
            missing = [f for f in features if f not in index]
            if missing:
                raise FeatureLayoutError(view_name, f"service asks for unknown features {missing}")
            start = len(names)
            names.extend(f"{view_name}__{f}" if full_feature_names else f for f in features)
            reads.append(
                _ViewRead(
                    view=view_name,
                    join_key=view.join_key,
                    fields=(*(view.field_keys[index[f]] for f in features), view.ts_field),
                    columns=tuple(range(start, len(names))),
                )
            )
        if len(set(names)) != len(names):
            raise FeatureLayoutError(
                feature_service_name, "feature names collide; use full_feature_names=True"
            )
        self._reads = tuple(reads)
        self.feature_names: tuple[str, ...] = tuple(names)
        self.join_keys: tuple[str, ...] = tuple(dict.fromkeys(r.join_key for r in reads))
        self._entities = tuple(
            _EntityRead.build(k, layout.project, [r for r in reads if r.join_key == k])
            for k in self.join_keys
        )
        self._transport = transport_for(redis_client)

    @property
    def layout(self) -> OnlineLayout:
        """The layout this reader was built from."""
        return self._layout

    def read(self, entity_ids: Mapping[str, np.ndarray]) -> OnlineBatch:
        """Read the service's features for ``n`` rows.

        Args:
            entity_ids: one integer array of length ``n`` per join key (``customer_id``...).
                Repeated ids are fetched once.

        Returns:
            An :class:`OnlineBatch` with ``n`` rows.

        Raises:
            FeatureLayoutError: a join key is missing or arrays differ in length.
            redis.RedisError: Redis is unreachable or failed.
        """
        arrays: dict[str, np.ndarray] = {}
        n = -1
        for key in self.join_keys:
            if key not in entity_ids:
                raise FeatureLayoutError(key, "join key missing from entity_ids")
            arr = np.asarray(entity_ids[key])
            if arr.ndim != 1 or arr.dtype.kind not in "iu":
                raise FeatureLayoutError(
                    key, f"expected 1-d integer ids, got {arr.dtype}{arr.shape}"
                )
            if n >= 0 and len(arr) != n:
                raise FeatureLayoutError(key, f"length {len(arr)} != {n}")
            n = len(arr)
            arrays[key] = arr
        n = max(n, 0)

        # One HMGET per distinct entity id of each join key, all in one round trip.
        uniques = [
            (entity, *np.unique(arrays[entity.command.join_key], return_inverse=True))
            for entity in self._entities
        ]
        replies = self._transport.hmget([(e.command, u) for e, u, _ in uniques])

        values = np.full((n, len(self.feature_names)), np.nan, dtype=np.float64)
        event_ts: dict[str, np.ndarray] = {}
        found: dict[str, np.ndarray] = {}
        offset = 0
        for entity, uniq, inverse in uniques:
            m = len(uniq)
            rows = replies[offset : offset + m]
            offset += m
            if m > _SCALAR_ROWS:
                # Every reply of the entity as one (m, fields, 24) byte matrix, built in C.
                fields = len(entity.command.fields)
                mat = fixed_width(rows, TS_WIDTH).reshape(m, fields, TS_WIDTH)
            for read, at in entity.views:
                if m == 0:
                    event_ts[read.view] = np.zeros(n, dtype=np.int64)
                    found[read.view] = np.zeros(n, dtype=bool)
                    continue
                width = len(read.columns)
                if m <= _SCALAR_ROWS:
                    # A handful of rows: per-value decoding beats numpy's per-call overhead.
                    decoded = np.array(
                        [[decode_value(r[at + j]) for j in range(width)] for r in rows],
                        dtype=np.float64,
                    ).reshape(m, width)
                    ts_u = np.array([decode_timestamp_ms(r[at + width]) for r in rows], np.int64)
                    found_u = np.array([r[at + width] is not None for r in rows], dtype=bool)
                else:
                    block = mat[:, at : at + width, :VALUE_WIDTH].reshape(m * width, VALUE_WIDTH)
                    decoded = decode_values_matrix(block, RawAt(rows, at, width)).reshape(m, width)
                    ts_u, found_u = decode_timestamps_matrix(
                        np.ascontiguousarray(mat[:, at + width, :]), RawAt(rows, at + width, 1)
                    )
                values[:, read.columns[0] : read.columns[-1] + 1] = decoded[inverse]
                event_ts[read.view] = ts_u[inverse]
                found[read.view] = found_u[inverse]
        return OnlineBatch(
            values=values, event_ts_ms=event_ts, found=found, feature_names=self.feature_names
        )
