"""Raw RESP (the Redis wire protocol): commands built as bytes, replies parsed by hiredis.

redis-py spends ~10-20 us per pipelined command building and parsing it in Python; a batch's
commands are regular enough to be built as one byte string (with numpy when only the 8 id
bytes vary) and its replies parsed by hiredis in C. This module is the one RESP builder and
reply reader of the repo; ``transport.py`` decides which clients take this path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def resp_command(*args: bytes) -> bytes:
    """One command in RESP, e.g. ``resp_command(b"PING")``."""
    return b"*%d\r\n" % len(args) + b"".join(bulk(a) for a in args)


def resp_fixed_width_commands(
    head: bytes, key_prefix: bytes, ids: np.ndarray, tail: bytes
) -> bytes:
    """Many commands that differ only in 8 little-endian id bytes of their key, vectorised.

    Each command is ``head + key_prefix + <i64 id> + tail``: the caller puts the RESP array
    header, command name and key length in ``head`` and the rest of the key and the other
    arguments in ``tail``.
    """
    n = len(ids)
    template = np.frombuffer(head + key_prefix + b"\x00" * 8 + tail, dtype=np.uint8)
    rows = np.tile(template, (n, 1))
    at = len(head) + len(key_prefix)
    rows[:, at : at + 8] = np.ascontiguousarray(ids, dtype="<i8").view(np.uint8).reshape(n, 8)
    return rows.tobytes()


def reply_error(reply: object) -> Exception:
    """The redis-py exception for an error reply read on the raw path, as redis-py's own
    parser would raise it: ``LOADING`` (a restarted server reading its append-only file) is
    :class:`redis.exceptions.BusyLoadingError`, a ``ConnectionError`` the stages back off
    from; anything else a ``ResponseError``."""
    from redis.exceptions import BusyLoadingError, ResponseError

    text = str(reply)
    if text.startswith("LOADING"):
        return BusyLoadingError(text)
    return ResponseError(text)


def read_replies(conn: Any, n_replies: int, view: memoryview) -> list[Any]:
    """Read ``n_replies`` replies from a redis-py connection's socket, parsed by hiredis
    (error replies in place, as ``hiredis.ReplyError``); ``view`` is the receive buffer.

    Raises:
        redis.ConnectionError: the socket is closed or failed.
        redis.TimeoutError: the socket timed out.
    """
    import hiredis
    import redis

    sock = conn._sock  # redis-py's socket, read here so that hiredis parses in bulk
    if sock is None:
        raise redis.ConnectionError("connection closed before the replies were read")
    reader: Any = hiredis.Reader()
    replies: list[Any] = []
    append = replies.append
    gets = reader.gets
    try:
        while len(replies) < n_replies:
            reply = gets()
            if reply is False:
                got = sock.recv_into(view)
                if got == 0:
                    raise redis.ConnectionError("Redis closed the connection")
                reader.feed(view, 0, got)
                continue
            append(reply)
    except TimeoutError:  # socket.timeout
        raise redis.TimeoutError("timeout reading pipelined replies") from None
    except OSError as exc:
        raise redis.ConnectionError(f"error reading pipelined replies: {exc}") from None
    return replies


class RawRedis:
    """Pipelined raw RESP on one pooled connection of a redis-py ``Redis`` client (RESP2).

    Errors surface as redis-py's own exceptions (``ConnectionError``, ``TimeoutError``); a
    connection that failed mid-way is closed, never returned to the pool half-read. Error
    replies are returned in place (as ``hiredis.ReplyError``) for the caller to inspect.
    """

    def __init__(self, client: Any) -> None:
        self._pool = client.connection_pool

    @staticmethod
    def supports(client: object) -> bool:
        """Whether ``client`` is a plain redis-py client speaking RESP2 (not a cluster
        client, not a test fake)."""
        try:
            import hiredis  # noqa: F401
            import redis
        except ImportError:
            return False
        if not isinstance(client, redis.Redis):
            return False
        pool = getattr(client, "connection_pool", None)
        kwargs = getattr(pool, "connection_kwargs", None)
        if not isinstance(kwargs, dict):
            return False
        return str(kwargs.get("protocol") or 2) == "2"

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        conn = self._pool.get_connection()
        try:
            yield conn
        except BaseException:
            conn.disconnect()
            raise
        finally:
            self._pool.release(conn)

    def round_trip(self, payload: bytes, n_replies: int) -> list[Any]:
        """Send ``payload`` (``n_replies`` commands) and return their replies in order."""
        import redis

        if n_replies == 0:
            return []
        try:
            return self._round_trip(payload, n_replies)
        except redis.ConnectionError:
            # A pooled connection the server closed (restart, idle timeout): one retry on a
            # fresh connection, as redis-py does for its own commands.
            return self._round_trip(payload, n_replies)

    def _round_trip(self, payload: bytes, n_replies: int) -> list[Any]:
        with self._connection() as conn:
            conn.send_packed_command([payload], check_health=False)
            return read_replies(conn, n_replies, memoryview(bytearray(1 << 17)))
