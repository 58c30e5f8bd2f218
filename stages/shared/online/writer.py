"""Idempotent batched writes of feature rows into Feast's Redis layout.

The rows of a batch are deduplicated (the newest per entity), encoded (``codec.py``) and
handed to the client's transport (``transport.py``), which runs the compare-and-set write
script (``scripts.py``) in one round trip. The Feast sink of the enrichment stage writes
through this class.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from stages.shared.online.codec import encode_column
from stages.shared.online.errors import FeatureLayoutError, OnlineWriteError
from stages.shared.online.keys import redis_keys
from stages.shared.online.layout import OnlineLayout
from stages.shared.online.transport import RedisClient, WriteRows, transport_for

logger = logging.getLogger(__name__)


class OnlineFeatureWriter:
    """Idempotent batched writes of feature rows into Feast's Redis layout.

    One round trip per batch, as the client's transport sends it (``transport.py``): for a
    plain redis-py client, one ``EVALSHA`` per 1,000 rows; for a Redis Cluster client, the
    same per node, all nodes at once; for anything else (a RESP3 client, a test fake), one
    pipelined ``EVALSHA`` per entity. The script compares event times server-side, so
    concurrent writers and replays never move a row back in time.

    Args:
        redis_client: a redis-py client (or anything meeting :class:`RedisClient`).
        layout: the project's layout (:meth:`OnlineLayout.from_store`).
    """

    def __init__(self, redis_client: RedisClient, layout: OnlineLayout) -> None:
        self._layout = layout
        self._sha: str | None = None
        self._ttl = int(layout.key_ttl_seconds or 0)
        self._transport = transport_for(redis_client)

    def _load_script(self) -> str:
        self._sha = self._transport.script_load(self._transport.write_script)
        return self._sha

    def write(
        self,
        view: str,
        entity_ids: np.ndarray,
        values: Mapping[str, np.ndarray],
        event_ts_ms: np.ndarray,
    ) -> int:
        """Write one row per entity, keeping the newest event time per entity.

        Args:
            view: feature view name.
            entity_ids: integer ids, length ``n``.
            values: every feature of the view, each an array of length ``n`` (NaN = null).
            event_ts_ms: event time of each row, epoch milliseconds (>= 0).

        Returns:
            Rows actually written (rows not newer than what Redis holds are skipped, as are
            all but the newest row of an entity within the call; ties keep the first).

        Raises:
            FeatureLayoutError: unknown view, missing/extra features, length mismatch.
            OnlineWriteError: Redis rejected the write.
        """
        layout = self._layout.view(view)
        ids = np.asarray(entity_ids)
        ts = np.asarray(event_ts_ms, dtype=np.int64)
        n = len(ids)
        if ids.ndim != 1 or (n and ids.dtype.kind not in "iu"):
            raise FeatureLayoutError(view, f"entity_ids must be 1-d integers, got {ids.dtype}")
        if ts.shape != (n,):
            raise FeatureLayoutError(view, f"event_ts_ms has shape {ts.shape}, expected ({n},)")
        expected = set(layout.features)
        if set(values) != expected:
            raise FeatureLayoutError(
                view,
                f"missing features {sorted(expected - set(values))}, "
                f"unknown {sorted(set(values) - expected)}",
            )
        for name in layout.features:
            if len(values[name]) != n:
                raise FeatureLayoutError(view, f"{name} has {len(values[name])} rows, expected {n}")
        if n == 0:
            return 0
        if (ts < 0).any():
            raise FeatureLayoutError(view, "event_ts_ms must be >= 0")

        # Newest row per entity (ties: first occurrence), as Feast's in-batch rule.
        order = np.lexsort((np.arange(n), -ts, ids))
        sorted_ids = ids[order]
        first = np.ones(n, dtype=bool)
        first[1:] = sorted_ids[1:] != sorted_ids[:-1]
        keep = order[first]

        rows = WriteRows(
            keys=redis_keys(layout.join_key, self._layout.project, ids[keep]),
            ts_ms=ts[keep].tolist(),
            columns=[
                encode_column(d, np.asarray(values[f])[keep])
                for f, d in zip(layout.features, layout.dtypes, strict=True)
            ],
            field_keys=layout.field_keys,
            ts_field=layout.ts_field,
            ttl=self._ttl,
        )
        from redis.exceptions import NoScriptError, RedisError

        sha = self._sha or self._load_script()
        try:
            try:
                results = self._transport.write(sha, rows)
            except NoScriptError:
                # Redis restarted or SCRIPT FLUSH: reload and replay (the script is idempotent).
                logger.info("write script missing on the server; reloading it")
                results = self._transport.write(self._load_script(), rows)
        except RedisError as exc:
            raise OnlineWriteError(view, len(rows.keys), str(exc)) from exc
        written = sum(int(r) for r in results)
        logger.debug("wrote %d of %d rows to %s", written, n, view)
        return written
