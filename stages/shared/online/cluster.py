"""Raw pipelined RESP to the primaries of a Redis Cluster, and how a failing-over cluster
answers.

Feast's ``redis_cluster`` online store keeps the same layout as a single Redis (``FORMAT.md``):
one hash per entity key, so every field of one entity lives in one hash slot. A batch is split
by the node that owns each key's slot (``transport.py`` builds each node's share), and each
node gets its share in one pipelined request; all the requests are sent before any reply is
read, so a batch costs one round trip per node, overlapped, instead of one per command.

A ``MOVED``/``ASK`` reply (slots moved by a reshard or a failover) refreshes the slot map and
the whole batch is sent again once; the online reads and writes are idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import redis

from stages.shared.errors import RtpipeError
from stages.shared.online.resp import read_replies

logger = logging.getLogger(__name__)

_SLOTS: Final = 16384


class _Redirected(RtpipeError):
    """A node answered MOVED or ASK: the slot map is stale."""


class ClusterUnavailableError(RtpipeError, redis.ConnectionError):
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
        _, nodes = self._slot_map()
        conns: list[tuple[int, Any, Any, int]] = []
        try:
            for i, (payload, n) in payloads.items():
                pool = self._node_client(nodes[i]).connection_pool
                conn = pool.get_connection()
                conns.append((i, pool, conn, n))
                conn.send_packed_command([payload], check_health=False)
            out: dict[int, list[Any]] = {}
            view = memoryview(bytearray(1 << 17))
            for i, _pool, conn, n in conns:
                out[i] = read_replies(conn, n, view)
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

    def send(self, build: Any) -> tuple[dict[int, list[Any]], Any]:
        """``build(owner)`` -> (payloads, context): ``owner`` maps each hash slot to a node
        index, ``payloads`` maps node indexes to (RESP bytes, number of commands). Sends
        every node its payload at once and returns (replies per node, context); redone once
        after a redirect or a connection error that the slot map may explain (a failed-over
        primary)."""
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
