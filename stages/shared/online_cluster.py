"""The online reader's and writer's raw RESP transport over a Redis Cluster.

Feast's ``redis_cluster`` online store keeps the same layout as a single Redis
(``stages/shared/online.py``): one hash per entity key, so every field of one entity lives in
one hash slot. A batch is split by the node that owns each key's slot, and each node gets its
share in one pipelined request; all the requests are sent before any reply is read, so a batch
costs one round trip per node, overlapped, instead of one per command.

- Reads: the same fixed-width ``HMGET`` commands as on a single Redis, per node.
- Writes: the same compare-and-set Lua body as the batched single-Redis script, one call per
  node per 1,000 rows. Its keys travel in ``ARGV`` under the ``allow-cross-slot-keys`` flag
  (Redis >= 7.0): a script's declared keys must share one slot, undeclared ones need only be
  on the node that runs it, which the split guarantees.

A ``MOVED``/``ASK`` reply (slots moved by a reshard or a failover) refreshes the slot map and
the whole batch is sent again once; both operations are idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import redis

from stages.shared.online import (
    _WRITE_CHUNK,
    _WRITE_MANY_IF_NEWER,
    _bulk,
    encode_timestamp_ms,
    redis_keys,
    resp_fixed_width_commands,
)

if TYPE_CHECKING:
    from stages.shared.online import _EntityRead

logger = logging.getLogger(__name__)

_SLOTS: Final = 16384

# The batched write script with its keys taken from ARGV: ARGV[1] is the number of keys K,
# ARGV[2..K+1] the keys, then exactly the arguments of the single-Redis batched script.
CLUSTER_WRITE_MANY_IF_NEWER: Final = (
    "#!lua flags=allow-cross-slot-keys\n"
    "local nk = tonumber(ARGV[1])\n"
    "local KEYS, A = {}, {}\n"
    "for i = 1, nk do KEYS[i] = ARGV[1 + i] end\n"
    "for i = nk + 2, #ARGV do A[#A + 1] = ARGV[i] end\n"
    "local ARGV = A\n" + _WRITE_MANY_IF_NEWER
)


class _Redirected(Exception):
    """A node answered MOVED or ASK: the slot map is stale."""


class ClusterUnavailableError(redis.ConnectionError):
    """The cluster does not serve a slot right now (a master failed and its replica is not
    promoted yet: ``CLUSTERDOWN``, ``TRYAGAIN``, ``MASTERDOWN``). Transient, like a refused
    connection, so it is one: the stages back off and retry the batch."""


# Error replies (and the text redis-py puts in its cluster exceptions) of a cluster that is
# failing over; a script's own call fails with "... while the cluster is down".
UNAVAILABLE_REPLIES: Final = ("CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN")
_UNAVAILABLE_TEXT: Final = ("The cluster is down", "while the cluster is down")


def is_cluster_unavailable(error: object) -> bool:
    """Whether ``error`` (an error reply or a redis-py exception) says the cluster is
    failing over rather than that the command is wrong."""
    from redis.exceptions import ClusterDownError, MasterDownError, TryAgainError

    if isinstance(error, ClusterDownError | MasterDownError | TryAgainError):
        return True
    text = str(error)
    return text.startswith(UNAVAILABLE_REPLIES) or any(t in text for t in _UNAVAILABLE_TEXT)


def cluster_unavailable(error: object) -> ClusterUnavailableError:
    """A :class:`redis.ConnectionError` for an ``error`` of :func:`is_cluster_unavailable`."""
    return ClusterUnavailableError(f"Redis Cluster unavailable: {error}")


def key_slots(keys: Sequence[bytes]) -> np.ndarray:
    """Redis Cluster hash slot of each key (CRC16 of the key, or of its ``{hash tag}``)."""
    from redis.crc import key_slot

    return np.fromiter((key_slot(k) for k in keys), dtype=np.int64, count=len(keys))


class ClusterRawRedis:
    """Raw pipelined RESP to the primaries of a ``redis.cluster.RedisCluster``, per slot owner.

    Args:
        client: the cluster client; its slot map and per-node connection pools are used.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._owner: np.ndarray | None = None  # node index per slot
        self._nodes: list[Any] = []

    @staticmethod
    def supports(client: object) -> bool:
        """Whether ``client`` is a redis-py cluster client speaking RESP2."""
        try:
            import hiredis  # noqa: F401
            from redis.cluster import RedisCluster
        except ImportError:
            return False
        if not isinstance(client, RedisCluster):
            return False
        kwargs = getattr(client, "nodes_manager", None)
        conn_kwargs = getattr(kwargs, "connection_kwargs", {}) or {}
        return str(conn_kwargs.get("protocol") or 2) == "2"

    # -------------------------------------------------------------------- slot map

    def _slot_map(self) -> tuple[np.ndarray, list[Any]]:
        if self._owner is None:
            manager = self._client.nodes_manager
            nodes: dict[str, int] = {}
            owner = np.full(_SLOTS, -1, dtype=np.int64)
            ordered: list[Any] = []
            for slot, holders in manager.slots_cache.items():
                primary = holders[0]
                if primary.name not in nodes:
                    nodes[primary.name] = len(ordered)
                    ordered.append(primary)
                owner[slot] = nodes[primary.name]
            if (owner < 0).any():
                from redis.exceptions import ClusterDownError

                raise ClusterDownError("not every hash slot has a primary (cluster_state not ok)")
            self._owner, self._nodes = owner, ordered
        return self._owner, self._nodes

    def _refresh(self) -> None:
        logger.info("Redis Cluster redirected a batch; refreshing the slot map")
        self._client.nodes_manager.initialize()
        self._owner = None

    def _node_client(self, node: Any) -> Any:
        if node.redis_connection is None:
            self._client.nodes_manager.create_redis_connections([node])
        return node.redis_connection

    # -------------------------------------------------------------------- round trips

    def _round_trips(self, payloads: dict[int, tuple[bytes, int]]) -> dict[int, list[Any]]:
        """Send every node its payload, then read every node's replies."""
        import hiredis
        import redis

        _, nodes = self._slot_map()
        conns: list[tuple[int, Any, Any, int]] = []
        try:
            for i, (payload, n) in payloads.items():
                pool = self._node_client(nodes[i]).connection_pool
                conn = pool.get_connection()
                conns.append((i, pool, conn, n))
                conn.send_packed_command([payload], check_health=False)
            out: dict[int, list[Any]] = {}
            buf = bytearray(1 << 17)
            view = memoryview(buf)
            for i, _pool, conn, n in conns:
                reader: Any = hiredis.Reader()
                sock = conn._sock
                if sock is None:
                    raise redis.ConnectionError("connection closed before the replies were read")
                replies: list[Any] = []
                try:
                    while len(replies) < n:
                        reply = reader.gets()
                        if reply is False:
                            got = sock.recv_into(view)
                            if got == 0:
                                raise redis.ConnectionError("Redis closed the connection")
                            reader.feed(view, 0, got)
                            continue
                        replies.append(reply)
                except TimeoutError:
                    raise redis.TimeoutError("timeout reading pipelined replies") from None
                except OSError as exc:
                    raise redis.ConnectionError(f"error reading pipelined replies: {exc}") from None
                out[i] = replies
        except BaseException:
            for _, _pool, conn, _ in conns:
                conn.disconnect()
            raise
        finally:
            for _, pool, conn, _ in conns:
                pool.release(conn)
        for replies in out.values():
            for r in replies:
                if isinstance(r, Exception) and str(r).startswith(("MOVED", "ASK")):
                    raise _Redirected(str(r))
        for replies in out.values():
            for r in replies:
                if isinstance(r, Exception) and is_cluster_unavailable(r):
                    raise cluster_unavailable(r)
        return out

    def _retrying(self, build: Any) -> tuple[dict[int, list[Any]], Any]:
        """``build(owner)`` -> (payloads, context); sent, and redone once after a redirect or
        a connection that the slot map may explain (a failed-over primary)."""
        import redis

        for attempt in (0, 1):
            owner, _ = self._slot_map()
            payloads, context = build(owner)
            try:
                return self._round_trips(payloads), context
            except (_Redirected, redis.ConnectionError) as exc:
                if attempt:
                    if isinstance(exc, _Redirected):
                        raise redis.exceptions.ClusterError(f"slots still moving: {exc}") from None
                    raise
                self._refresh()
        raise AssertionError("unreachable")

    # -------------------------------------------------------------------- reads

    def hmget_entities(
        self, project: str, blocks: Sequence[tuple[_EntityRead, np.ndarray]]
    ) -> list[Any]:
        """The replies of one fixed-width ``HMGET`` per id of each entity block, in block and
        id order, as :meth:`RawRedis.round_trip` returns them for the concatenated payload."""
        keyed = [(e, ids, key_slots(redis_keys(e.join_key, project, ids))) for e, ids in blocks]
        total = sum(len(ids) for _, ids, _ in keyed)

        def build(owner: np.ndarray) -> tuple[dict[int, tuple[bytes, int]], list[np.ndarray]]:
            parts: dict[int, list[bytes]] = {}
            counts: dict[int, int] = {}
            positions: dict[int, list[np.ndarray]] = {}
            offset = 0
            for e, ids, slots in keyed:
                node_of = owner[slots]
                for i in np.unique(node_of).tolist():
                    sel = np.flatnonzero(node_of == i)
                    parts.setdefault(i, []).append(
                        resp_fixed_width_commands(e.head, e.key_prefix, ids[sel], e.tail)
                    )
                    counts[i] = counts.get(i, 0) + len(sel)
                    positions.setdefault(i, []).append(sel + offset)
                offset += len(ids)
            payloads = {i: (b"".join(p), counts[i]) for i, p in parts.items()}
            return payloads, [np.concatenate(positions[i]) for i in payloads]

        if total == 0:
            return []
        replies, positions = self._retrying(build)
        out: list[Any] = [None] * total
        for (_, node_replies), pos in zip(replies.items(), positions, strict=True):
            for p, r in zip(pos.tolist(), node_replies, strict=True):
                out[p] = r
        return out

    # -------------------------------------------------------------------- writes

    def script_load(self, script: str) -> str:
        """Load ``script`` on every primary; returns its sha."""
        _, nodes = self._slot_map()
        shas = set()
        for node in nodes:
            sha = self._node_client(node).script_load(script)
            shas.add(sha.decode() if isinstance(sha, bytes) else str(sha))
        if len(shas) != 1:
            raise RuntimeError(f"primaries disagree on the script sha: {shas}")
        return shas.pop()

    def write_many(
        self,
        sha: str,
        keys: Sequence[bytes],
        kept_ts: Sequence[int],
        encoded: Sequence[Sequence[bytes]],
        field_keys: Sequence[bytes],
        ts_field: bytes,
        ttl: int,
    ) -> list[Any]:
        """Run :data:`CLUSTER_WRITE_MANY_IF_NEWER` (loaded as ``sha``) on each primary for its
        rows, 1,000 rows per call; returns each call's count of rows written.

        Raises:
            redis.exceptions.NoScriptError: a primary does not have the script (restarted,
                failed over): the writer reloads it and retries.
            redis.exceptions.ResponseError: another error reply.
        """
        from redis.exceptions import NoScriptError, ResponseError

        slots = key_slots(keys)

        def bulks(col: Sequence[bytes]) -> list[bytes]:
            return [b"$%d\r\n%s\r\n" % (len(v), v) for v in col]

        ts_bulks = [
            b"".join(
                bulks(
                    [
                        b"%d" % (ms // 1000),
                        b"%d" % ((ms % 1000) * 1_000_000),
                        encode_timestamp_ms(ms),
                    ]
                )
            )
            for ms in kept_ts
        ]
        key_bulks = bulks(keys)
        value_bulks = [bulks(col) for col in encoded]
        fixed = [_bulk(ts_field), _bulk(b"%d" % ttl), _bulk(b"%d" % len(field_keys))]
        fixed += [_bulk(fk) for fk in field_keys]
        fixed_args = b"".join(fixed)
        sha_bulk = _bulk(sha.encode())

        def build(owner: np.ndarray) -> tuple[dict[int, tuple[bytes, int]], None]:
            node_of = owner[slots]
            payloads: dict[int, tuple[bytes, int]] = {}
            for i in np.unique(node_of).tolist():
                rows = np.flatnonzero(node_of == i).tolist()
                parts: list[bytes] = []
                calls = 0
                for lo in range(0, len(rows), _WRITE_CHUNK):
                    chunk = rows[lo : lo + _WRITE_CHUNK]
                    m = len(chunk)
                    # EVALSHA sha 0, then ARGV: m, the m keys, the fixed args, (3 + F) per row.
                    n_args = 3 + 1 + m + len(fixed) + m * (3 + len(field_keys))
                    parts.append(b"*%d\r\n$7\r\nEVALSHA\r\n%s$1\r\n0\r\n" % (n_args, sha_bulk))
                    parts.append(_bulk(b"%d" % m))
                    parts.extend(key_bulks[r] for r in chunk)
                    parts.append(fixed_args)
                    parts.extend(
                        chain.from_iterable(
                            (ts_bulks[r], *(col[r] for col in value_bulks)) for r in chunk
                        )
                    )
                    calls += 1
                payloads[i] = (b"".join(parts), calls)
            return payloads, None

        if not keys:
            return []
        replies, _ = self._retrying(build)
        out: list[Any] = []
        for node_replies in replies.values():
            for r in node_replies:
                if isinstance(r, Exception):
                    text = str(r)
                    if text.startswith("NOSCRIPT"):
                        raise NoScriptError(text)
                    raise ResponseError(text)
                out.append(r)
        return out


def cluster_transport(client: object) -> ClusterRawRedis | None:
    """The cluster transport for ``client``, or None when it is not a RESP2 cluster client."""
    return ClusterRawRedis(client) if ClusterRawRedis.supports(client) else None
