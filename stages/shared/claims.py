"""One outcome per transaction id, whatever the copies of it carry.

The enrichment stage drops repeated records of a transaction per customer (its windows'
dedup state, ``stages/enrichment/intake.py``). A copy whose payload names *another* customer
lands in that customer's state, where the first copy is unknown. ``transactions.enriched``
is keyed by transaction id, so every copy of an id reaches the same prediction partition;
there each id is claimed in Redis with its content fingerprint before it is scored::

    SET {<project>:tx}:<id> <fingerprint> NX GET EX <horizon>

No previous value: the first copy. The same fingerprint: this copy again (a batch retried
after an aborted transaction: its earlier outputs were never visible), scored. Another
fingerprint: a conflicting copy, dead-lettered as ``conflicting_duplicate``.

Memory: one key per transaction for the dedup horizon (31 days): about 90 bytes each in
Redis, so ~2.8 GB per 1 M transactions a day.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stages.shared.online.resp import reply_error
from stages.shared.online.transport import transport_for


class TransactionClaims:
    """Claims transaction ids (see the module docstring).

    Args:
        redis_client: a redis-py client (raw RESP for a plain RESP2 client, else pipelined).
        project: the Feast project (keys are namespaced by it).
        horizon_s: how long a claim is kept.
    """

    def __init__(self, redis_client: Any, project: str, horizon_s: int) -> None:
        self._prefix = b"{%s:tx}:" % project.encode()
        self._ttl = b"%d" % horizon_s
        self._transport = transport_for(redis_client)

    def commands(self, ids: np.ndarray, fingerprints: list[int]) -> list[tuple[bytes, ...]]:
        """The claim commands, to send in another call's round trip; :meth:`conflicts`
        reads their replies."""
        return [
            (b"SET", self._prefix + b"%d" % i, b"%d" % f, b"NX", b"GET", b"EX", self._ttl)
            for i, f in zip(np.asarray(ids).tolist(), fingerprints, strict=True)
        ]

    @staticmethod
    def conflicts(replies: list[Any], fingerprints: list[int]) -> np.ndarray:
        """True where a claim's reply holds another fingerprint than the claimer's."""

        err = next((r for r in replies if isinstance(r, Exception)), None)
        if err is not None:
            raise reply_error(err)
        return np.fromiter(
            (
                r is not None and bytes(r) != b"%d" % f
                for r, f in zip(replies, fingerprints, strict=True)
            ),
            dtype=bool,
            count=len(fingerprints),
        )

    def claim(self, ids: np.ndarray, fingerprints: list[int]) -> np.ndarray:
        """Claim each id with its fingerprint; True where another fingerprint holds it.

        Raises:
            redis.RedisError: Redis is unreachable or failed.
        """
        keys = [self._prefix + b"%d" % i for i in np.asarray(ids).tolist()]
        values = [b"%d" % f for f in fingerprints]
        replies = self._transport.execute(
            [
                (b"SET", k, v, b"NX", b"GET", b"EX", self._ttl)
                for k, v in zip(keys, values, strict=True)
            ]
        )
        return np.fromiter(
            (r is not None and bytes(r) != v for r, v in zip(replies, values, strict=True)),
            dtype=bool,
            count=len(keys),
        )
