"""How commands travel to Redis, chosen once per client by :func:`transport_for`.

- ``raw``: a plain redis-py client speaking RESP2. Commands built as bytes (``resp.py``), one
  pipelined request on one pooled connection, replies parsed by hiredis; the writer sends one
  batched script call per 1,000 rows.
- ``cluster``: a redis-py Redis Cluster client speaking RESP2. The same raw commands, split by
  the node that owns each key's slot, one request per node, all nodes at once
  (``cluster.py``); the writer runs the batched script per node with its keys in ``ARGV``.
- ``pipeline``: anything else (a RESP3 client, a test fake). The same commands through the
  client's own ``pipeline()``; the writer sends one script call per entity.

The online reader and writer use :meth:`Transport.hmget` and :meth:`Transport.write`; the
label index and the transaction claims send their own commands with :meth:`Transport.execute`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal, Protocol

import numpy as np

from stages.shared.online.cluster import ClusterRawRedis, key_slots
from stages.shared.online.codec import encode_timestamp_ms
from stages.shared.online.keys import entity_key_prefix, redis_keys
from stages.shared.online.resp import (
    RawRedis,
    bulk,
    reply_error,
    resp_command,
    resp_fixed_width_commands,
)
from stages.shared.online.scripts import (
    CLUSTER_WRITE_MANY_IF_NEWER,
    WRITE_CHUNK,
    WRITE_IF_NEWER,
    WRITE_MANY_IF_NEWER,
)

TransportKind = Literal["raw", "cluster", "pipeline"]


class RedisPipeline(Protocol):
    """The subset of a redis-py pipeline used here."""

    def hmget(self, name: bytes, keys: Sequence[bytes], *args: Any) -> Any: ...

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any: ...

    def execute(self, raise_on_error: bool = True) -> list[Any]: ...

    def reset(self) -> None: ...


class RedisClient(Protocol):
    """The subset of a redis-py client used here (``redis.Redis`` satisfies it).

    ``pipeline`` returns ``Any`` because redis-py's own stubs type keys and fields as ``str``
    while Feast's layout is bytes; the object must behave like :class:`RedisPipeline`.
    """

    def pipeline(self, transaction: Any = True, shard_hint: Any = None) -> Any: ...

    def script_load(self, script: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class HmgetCommand:
    """One ``HMGET`` of the same fields per entity id of one join key, with its RESP bytes
    around the 8 id bytes precomputed."""

    join_key: str
    project: str
    fields: tuple[bytes, ...]
    head: bytes
    key_prefix: bytes
    tail: bytes

    @classmethod
    def build(cls, join_key: str, project: str, fields: Sequence[bytes]) -> HmgetCommand:
        """The command for ``fields`` of ``join_key``'s hashes in ``project``."""
        prefix = entity_key_prefix(join_key)
        suffix = project.encode()
        key_len = len(prefix) + 8 + len(suffix)
        return cls(
            join_key=join_key,
            project=project,
            fields=tuple(fields),
            head=b"*%d\r\n$5\r\nHMGET\r\n$%d\r\n" % (2 + len(fields), key_len),
            key_prefix=prefix,
            tail=suffix + b"\r\n" + b"".join(bulk(f) for f in fields),
        )

    def keys(self, ids: np.ndarray) -> list[bytes]:
        """The Redis keys of ``ids``."""
        return redis_keys(self.join_key, self.project, ids)

    def resp(self, ids: np.ndarray) -> bytes:
        """The commands for ``ids``, in RESP."""
        return resp_fixed_width_commands(self.head, self.key_prefix, ids, self.tail)


@dataclass(frozen=True, slots=True)
class WriteRows:
    """One write's rows, encoded: what every transport sends to the write script.

    Attributes:
        keys: the entity hash of each row.
        ts_ms: each row's event time, epoch ms.
        columns: per feature, each row's serialized Value.
        field_keys: the hash field of each feature.
        ts_field: the view's ``_ts`` field.
        ttl: seconds of ``EXPIRE`` after a write (0: none).
    """

    keys: Sequence[bytes]
    ts_ms: Sequence[int]
    columns: Sequence[Sequence[bytes]]
    field_keys: Sequence[bytes]
    ts_field: bytes
    ttl: int

    def script_args(self, i: int) -> list[Any]:
        """Row ``i``'s arguments of :data:`~stages.shared.online.scripts.WRITE_IF_NEWER`."""
        ms = self.ts_ms[i]
        args: list[Any] = [
            self.ts_field,
            ms // 1000,
            (ms % 1000) * 1_000_000,
            encode_timestamp_ms(ms),
            self.ttl,
        ]
        for fk, col in zip(self.field_keys, self.columns, strict=True):
            args.append(fk)
            args.append(col[i])
        return args


def _bulks(values: Sequence[bytes]) -> list[bytes]:
    return [b"$%d\r\n%s\r\n" % (len(v), v) for v in values]


class _BatchedWrites:
    """RESP of batched write-script calls over some rows: every argument bulk-encoded once,
    then interleaved row by row in C."""

    def __init__(self, rows: WriteRows, sha: str) -> None:
        ts_bulks: dict[int, bytes] = {}
        for ms in rows.ts_ms:
            if ms not in ts_bulks:
                ts_bulks[ms] = b"".join(
                    _bulks(
                        [
                            b"%d" % (ms // 1000),
                            b"%d" % ((ms % 1000) * 1_000_000),
                            encode_timestamp_ms(ms),
                        ]
                    )
                )
        fixed = [bulk(rows.ts_field), bulk(b"%d" % rows.ttl), bulk(b"%d" % len(rows.field_keys))]
        fixed += [bulk(fk) for fk in rows.field_keys]
        self._sha = bulk(sha.encode())
        self._n_fixed = len(fixed)
        self._fixed = b"".join(fixed)
        self._keys = _bulks(rows.keys)
        self._cols = [[ts_bulks[ms] for ms in rows.ts_ms], *(_bulks(c) for c in rows.columns)]
        self._per_row = 3 + len(rows.field_keys)  # seconds, nanos, ts proto, the values

    def call(self, rows: range | Sequence[int], keys_in_argv: bool) -> list[bytes]:
        """One ``EVALSHA`` of the rows ``rows`` (a range of row numbers, or a list): the
        single-Redis script (keys declared) or, ``keys_in_argv``, the cluster one (``0``
        declared keys, then the key count and the keys as the first arguments)."""
        if isinstance(rows, range):
            keys = self._keys[rows.start : rows.stop]
            cols = [c[rows.start : rows.stop] for c in self._cols]
        else:
            keys = [self._keys[r] for r in rows]
            cols = [[c[r] for r in rows] for c in self._cols]
        m = len(keys)
        n_args = 3 + int(keys_in_argv) + m + self._n_fixed + m * self._per_row
        head = b"*%d\r\n$7\r\nEVALSHA\r\n%s" % (n_args, self._sha)
        if keys_in_argv:
            head += b"$1\r\n0\r\n"
        return [
            head,
            bulk(b"%d" % m),
            *keys,
            self._fixed,
            *chain.from_iterable(zip(*cols, strict=True)),
        ]


def _write_counts(replies: list[Any], error: Callable[[object], Exception]) -> list[Any]:
    """The write script's replies, or the exception of the first error reply (``NOSCRIPT``:
    :class:`redis.exceptions.NoScriptError`, which the writer answers by reloading)."""
    from redis.exceptions import NoScriptError

    for r in replies:
        if isinstance(r, Exception):
            text = str(r)
            if text.startswith("NOSCRIPT"):
                raise NoScriptError(text)
            raise error(r)
    return replies


def _cluster_error(reply: object) -> Exception:
    from redis.exceptions import ResponseError

    return ResponseError(str(reply))


class Transport(Protocol):
    """What the online store, the label index and the claims need from a Redis client."""

    kind: TransportKind
    # The write script this transport runs (:meth:`write` takes its sha).
    write_script: str

    def execute(self, commands: Sequence[Sequence[bytes]]) -> list[Any]:
        """Send ``commands`` (name and arguments, as bytes) in one round trip; their replies
        in order.

        Raises:
            redis.RedisError: the first error reply, or Redis is unreachable.
        """
        ...

    def hmget(self, blocks: Sequence[tuple[HmgetCommand, np.ndarray]]) -> list[Any]:
        """One ``HMGET`` per id of each block, in one round trip (per node); the replies
        in block and id order, each a list of field values (``None`` where absent)."""
        ...

    def script_load(self, script: str) -> str:
        """Load ``script`` (on every node that writes); returns its sha."""
        ...

    def write(self, sha: str, rows: WriteRows) -> list[Any]:
        """Run :attr:`write_script` (loaded as ``sha``) over ``rows``; returns each call's
        count of rows written.

        Raises:
            redis.exceptions.NoScriptError: the server does not have the script.
            redis.RedisError: another error reply, or Redis is unreachable.
        """
        ...


class PipelineTransport:
    """The client's own ``pipeline()``: one script call per entity. The other transports
    are this one with faster paths."""

    kind: TransportKind = "pipeline"
    write_script = WRITE_IF_NEWER

    def __init__(self, client: Any) -> None:
        self._client = client

    def execute(self, commands: Sequence[Sequence[bytes]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        try:
            for name, *args in commands:
                # A cluster pipeline looks its command names up as str. get=True: redis-py's
                # SET callback would turn a SET ... GET reply (the old value, e.g. a
                # transaction claim's) into False.
                opts = {"get": True} if name == b"SET" and b"GET" in args else {}
                pipe.execute_command(name.decode(), *args, **opts)
            return list(pipe.execute())
        finally:
            pipe.reset()

    def hmget(self, blocks: Sequence[tuple[HmgetCommand, np.ndarray]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        try:
            for cmd, ids in blocks:
                for key in cmd.keys(ids):
                    pipe.hmget(key, cmd.fields)
            return list(pipe.execute())
        finally:
            pipe.reset()

    def script_load(self, script: str) -> str:
        sha = self._client.script_load(script)
        return sha.decode() if isinstance(sha, bytes) else str(sha)

    def write(self, sha: str, rows: WriteRows) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        try:
            for i, key in enumerate(rows.keys):
                pipe.evalsha(sha, 1, key, *rows.script_args(i))
            return list(pipe.execute(raise_on_error=True))
        finally:
            pipe.reset()


class RawTransport(PipelineTransport):
    """Raw RESP on one connection of a plain redis-py client (RESP2)."""

    kind: TransportKind = "raw"
    write_script = WRITE_MANY_IF_NEWER

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self._raw = RawRedis(client)

    def execute(self, commands: Sequence[Sequence[bytes]]) -> list[Any]:
        payload = b"".join(resp_command(*c) for c in commands)
        replies = self._raw.round_trip(payload, len(commands))
        err = next((r for r in replies if isinstance(r, Exception)), None)
        if err is not None:
            raise reply_error(err)
        return replies

    def hmget(self, blocks: Sequence[tuple[HmgetCommand, np.ndarray]]) -> list[Any]:
        payload = b"".join(cmd.resp(ids) for cmd, ids in blocks)
        replies = self._raw.round_trip(payload, sum(len(ids) for _, ids in blocks))
        bad = next((r for r in replies if not isinstance(r, list)), None)
        if bad is not None:
            raise reply_error(bad)
        return replies

    def write(self, sha: str, rows: WriteRows) -> list[Any]:
        calls = _BatchedWrites(rows, sha)
        n = len(rows.keys)
        parts: list[bytes] = []
        chunks = range(0, n, WRITE_CHUNK)
        for lo in chunks:
            parts += calls.call(range(lo, min(lo + WRITE_CHUNK, n)), keys_in_argv=False)
        return _write_counts(self._raw.round_trip(b"".join(parts), len(chunks)), reply_error)


class ClusterTransport(PipelineTransport):
    """Raw RESP per primary of a redis-py Redis Cluster client (RESP2); commands of
    :meth:`execute` go through the cluster client's pipeline, routed by their keys."""

    kind: TransportKind = "cluster"
    write_script = CLUSTER_WRITE_MANY_IF_NEWER

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self._nodes = ClusterRawRedis(client)

    def hmget(self, blocks: Sequence[tuple[HmgetCommand, np.ndarray]]) -> list[Any]:
        keyed = [(cmd, ids, key_slots(cmd.keys(ids))) for cmd, ids in blocks]
        total = sum(len(ids) for _, ids, _ in keyed)

        def build(owner: np.ndarray) -> tuple[dict[int, tuple[bytes, int]], list[np.ndarray]]:
            parts: dict[int, list[bytes]] = {}
            counts: dict[int, int] = {}
            positions: dict[int, list[np.ndarray]] = {}
            offset = 0
            for cmd, ids, slots in keyed:
                node_of = owner[slots]
                for i in np.unique(node_of).tolist():
                    sel = np.flatnonzero(node_of == i)
                    parts.setdefault(i, []).append(cmd.resp(ids[sel]))
                    counts[i] = counts.get(i, 0) + len(sel)
                    positions.setdefault(i, []).append(sel + offset)
                offset += len(ids)
            payloads = {i: (b"".join(p), counts[i]) for i, p in parts.items()}
            return payloads, [np.concatenate(positions[i]) for i in payloads]

        if total == 0:
            return []
        replies, positions = self._nodes.send(build)
        out: list[Any] = [None] * total
        for (_, node_replies), pos in zip(replies.items(), positions, strict=True):
            for p, r in zip(pos.tolist(), node_replies, strict=True):
                out[p] = r
        bad = next((r for r in out if not isinstance(r, list)), None)
        if bad is not None:
            raise _cluster_error(bad)
        return out

    def script_load(self, script: str) -> str:
        return self._nodes.script_load(script)

    def write(self, sha: str, rows: WriteRows) -> list[Any]:
        if not rows.keys:
            return []
        slots = key_slots(rows.keys)
        calls = _BatchedWrites(rows, sha)

        def build(owner: np.ndarray) -> tuple[dict[int, tuple[bytes, int]], None]:
            node_of = owner[slots]
            payloads: dict[int, tuple[bytes, int]] = {}
            for i in np.unique(node_of).tolist():
                node_rows = np.flatnonzero(node_of == i).tolist()
                parts: list[bytes] = []
                chunks = range(0, len(node_rows), WRITE_CHUNK)
                for lo in chunks:
                    parts += calls.call(node_rows[lo : lo + WRITE_CHUNK], keys_in_argv=True)
                payloads[i] = (b"".join(parts), len(chunks))
            return payloads, None

        replies, _ = self._nodes.send(build)
        return _write_counts([r for rs in replies.values() for r in rs], _cluster_error)


def transport_for(client: object) -> Transport:
    """The transport of ``client``: the one place where raw, cluster or pipeline is chosen."""
    if ClusterRawRedis.supports(client):
        return ClusterTransport(client)
    if RawRedis.supports(client):
        return RawTransport(client)
    return PipelineTransport(client)
