"""The label index: every known label of the last weeks, per terminal, in Redis, from which
the terminal risk features are computed for each event at its own time (on demand).

Terminal risk (SIMULATOR.md) over terminal ``k``'s transactions in
``(t - (7+n) days, t - 7 days]``: their number and fraud fraction. Every transaction gets a
label 7 days later, so the window is a count over the labels alone. Instead of keeping that
window in a stream processor keyed by terminal (which needs the event itself re-keyed by
terminal: one more exactly-once hop on the event path), the enrichment stage's labels process
adds each label to two sorted sets of its terminal, scored by the transaction's time::

    {<project>:lbl:<terminal>}:all     member transaction id, score tx_ms (every label)
    {<project>:lbl:<terminal>}:fraud   the same, frauds only

and the prediction stage counts, for a whole micro-batch in one round trip, the members of
each window (``ZCOUNT`` over ``(lower, upper]``: ``O(log n)`` per window, whatever the
terminal's traffic). The braces are a Redis Cluster hash tag: both keys of a terminal live in
one slot, so each script call touches one node.

**Exactness** needs every label with a transaction time ``<= t - 7 days`` to be in the index
when an event at ``t`` is scored; such labels became known at or before ``t``. The labels
process records, per ``labels`` partition and after the labels are written, the next offset
and the newest label timestamp it has processed (:data:`progress` hash). The prediction stage
reads the partitions' last stable offsets (one ``ListOffsets`` request) after it has the
batch, and serves an event as exact when, on every partition, the index has caught up with
that offset or already holds a label stamped at or after the event's time. Otherwise it waits
for the labels process (the same event-time alignment a stream join does).

Memory: a label costs about 90 bytes in a sorted set (skiplist node, dict entry, an id of up
to 19 digits) and is kept ``retention`` (67 days by default: the 37 days a window spans, plus
30 days of slack for late events); frauds again in the fraud set. At 1 M transactions a day,
about 67 M labels: ~6 GB of Redis, plus ~0.8 % of that for the fraud sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from stages.shared.errors import RtpipeError
from stages.shared.online.cluster import cluster_unavailable, is_cluster_unavailable
from stages.shared.online.transport import transport_for
from stages.shared.records import Label
from stages.shared.schemas import DAY_MS, LABEL_DELAY_DAYS, TERMINAL_FEATURES, WINDOWS_DAYS
from stages.shared.settings import Settings

# Labels kept per terminal: the longest window's span, plus slack for late events.
DEFAULT_RETENTION_MS: Final = (LABEL_DELAY_DAYS + max(WINDOWS_DAYS) + 30) * DAY_MS

# KEYS: the terminal's all and fraud sets. ARGV[1]: retention ms; then (id, tx_ms, fraud)*.
# Returns the 0-based positions (in ARGV triples) of labels that contradict a stored label
# of the same transaction (another time or fraud flag); a repeated identical label is a no-op.
_ADD_LABELS: Final = """
local conflicts = {}
local newest = nil
for i = 2, #ARGV, 3 do
  local id, ms, fraud = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local have = redis.call('ZSCORE', KEYS[1], id)
  if have then
    local was = redis.call('ZSCORE', KEYS[2], id) and '1' or '0'
    if tonumber(have) ~= tonumber(ms) or was ~= fraud then
      conflicts[#conflicts + 1] = (i - 2) / 3
    end
  else
    redis.call('ZADD', KEYS[1], ms, id)
    if fraud == '1' then redis.call('ZADD', KEYS[2], ms, id) end
  end
end
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if top[2] then
  local floor = string.format('%.0f', tonumber(top[2]) - tonumber(ARGV[1]))
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. floor)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. floor)
end
return conflicts
"""

# KEYS: pairs (all, fraud) per terminal. ARGV[1]: windows per event (w); then per terminal
# its event count m, then m * (upper, lower_1 .. lower_w). Returns, per event and window,
# the label count and the fraud count, flattened in argument order.
_COUNT_WINDOWS: Final = """
local w = tonumber(ARGV[1])
local out = {}
local a = 2
for k = 1, #KEYS, 2 do
  local m = tonumber(ARGV[a]); a = a + 1
  for _ = 1, m do
    local upper = ARGV[a]
    for j = 1, w do
      local lower = '(' .. ARGV[a + j]
      out[#out + 1] = redis.call('ZCOUNT', KEYS[k], lower, upper)
      out[#out + 1] = redis.call('ZCOUNT', KEYS[k + 1], lower, upper)
    end
    a = a + 1 + w
  end
end
return out
"""


class LabelIndexError(RtpipeError, RuntimeError):
    """The index answered something that is not what its scripts return."""


@dataclass(frozen=True, slots=True)
class PartitionProgress:
    """How far the labels process has written one ``labels`` partition into the index."""

    next_offset: int
    max_ts: int


def window_bounds(event_ms: np.ndarray) -> np.ndarray:
    """``(n, 1 + w)`` int64: per event the windows' shared upper bound ``t - 7 days`` and
    each window's exclusive lower bound ``upper - n days``, in :data:`WINDOWS_DAYS` order."""
    upper = np.asarray(event_ms, dtype=np.int64) - LABEL_DELAY_DAYS * DAY_MS
    cols = [upper] + [upper - n * DAY_MS for n in WINDOWS_DAYS]
    return np.stack(cols, axis=1)


def terminal_features_from_counts(counts: np.ndarray) -> np.ndarray:
    """``(n, 2w)`` counts (label count, fraud count per window) as the terminal features in
    :data:`TERMINAL_FEATURES` order: count, and fraud fraction (0 for an empty window)."""
    counts = np.asarray(counts, dtype=np.float64).reshape(len(counts), len(WINDOWS_DAYS), 2)
    n, frauds = counts[:, :, 0], counts[:, :, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        risk = np.where(n > 0, frauds / np.where(n > 0, n, 1.0), 0.0)
    out = np.empty((len(counts), len(TERMINAL_FEATURES)), dtype=np.float64)
    out[:, 0::2] = n
    out[:, 1::2] = risk
    return out


def exact_mask(
    event_ms: np.ndarray,
    progress: Mapping[int, PartitionProgress],
    stable_offsets: Mapping[int, int],
) -> np.ndarray:
    """Which events' terminal windows the index can serve exactly now.

    Args:
        event_ms: the events' times.
        progress: per ``labels`` partition, what the index holds (missing: nothing yet).
        stable_offsets: per partition, the last stable offset read after the events were
            received: every label produced before the events is below it.

    Returns:
        A boolean mask: True where, on every partition, the index holds everything up to
        the stable offset or a label stamped at or after ``t - 1 ms`` (labels are stamped
        1 ms before they become known, see ``stages/ops/replay.py``).
    """
    ok = np.ones(len(event_ms), dtype=bool)
    for partition, end in stable_offsets.items():
        p = progress.get(partition)
        if p is not None and p.next_offset >= end:
            continue
        if p is None:
            return np.zeros(len(event_ms), dtype=bool) if end > 0 else ok
        ok &= np.asarray(event_ms) - 1 <= p.max_ts
    return ok


class LabelIndex:
    """Writes labels into the index and counts terminal windows over it.

    Args:
        redis_client: a redis-py client (raw RESP is used when it is a plain RESP2 client;
            anything else, such as a cluster client, gets one script call per terminal).
        project: the Feast project (keys are namespaced by it).
        labels_topic: the topic whose partitions the progress hash tracks.
        retention_ms: how long labels are kept behind a terminal's newest.
    """

    def __init__(
        self,
        redis_client: Any,
        project: str,
        labels_topic: str,
        retention_ms: int = DEFAULT_RETENTION_MS,
    ) -> None:
        self._client = redis_client
        self._project = project
        self._retention = b"%d" % retention_ms
        self.progress_key = f"{project}:lbl:progress:{labels_topic}".encode()
        self._transport = transport_for(redis_client)
        self._sha: dict[str, str] = {}
        # Replies to the ``tail`` commands of the last terminal_features call.
        self.last_tail_replies: list[Any] = []

    @classmethod
    def from_settings(cls, settings: Settings, redis_client: Any) -> LabelIndex:
        """The index of ``settings``' Feast project, labels topic and label retention."""
        return cls(
            redis_client,
            settings.feast_project,
            settings.topics.name("labels"),
            retention_ms=settings.enrichment.label_retention_ms,
        )

    # -- keys --------------------------------------------------------------------------------
    def keys(self, terminal_id: int) -> tuple[bytes, bytes]:
        """The terminal's (all, fraud) sorted-set keys."""
        tag = b"{%s:lbl:%d}" % (self._project.encode(), terminal_id)
        return tag + b":all", tag + b":fraud"

    def _script(self, source: str) -> str:
        sha = self._sha.get(source)
        if sha is None:
            sha = str(self._client.script_load(source))
            self._sha[source] = sha
        return sha

    def _eval_many(
        self,
        source: str,
        calls: Sequence[tuple[Sequence[bytes], Sequence[bytes]]],
        tail: Sequence[Sequence[bytes]] = (),
    ) -> list[Any]:
        """Run one script per (keys, args) call in one round trip, then the ``tail``
        commands; reloads the script once if the server lost it (a restart)."""
        import redis

        for attempt in (0, 1):
            sha = self._script(source).encode()
            try:
                # EVALSHA as a plain command, not pipe.evalsha: a cluster pipeline refuses
                # the latter, while the former is routed by its first key (one slot per
                # terminal).
                evals = [(b"EVALSHA", sha, b"%d" % len(k), *k, *a) for k, a in calls]
                return self._transport.execute([*evals, *tail])
            except redis.ResponseError as exc:
                if is_cluster_unavailable(exc):  # a failover: transient, retried by callers
                    raise cluster_unavailable(exc) from exc
                # redis-py parses a NOSCRIPT reply into NoScriptError without the prefix;
                # the raw path keeps the server's text.
                lost = isinstance(exc, redis.exceptions.NoScriptError) or "NOSCRIPT" in str(exc)
                if not lost or attempt:
                    raise
                self._sha.pop(source, None)  # Redis restarted without its script cache
        raise AssertionError("unreachable")

    # -- writes ------------------------------------------------------------------------------
    def add(self, labels: Sequence[Label], progress: Mapping[int, PartitionProgress]) -> list[int]:
        """Add ``labels`` (idempotent), then record ``progress``, in one round trip.

        Returns:
            Positions in ``labels`` that contradict a label already stored for the same
            transaction (another time or fraud flag); those are not stored.

        Raises:
            redis.RedisError: Redis is unreachable or failed; nothing is known to be written.
        """
        by_terminal: dict[int, list[int]] = {}
        for i, lab in enumerate(labels):
            by_terminal.setdefault(lab.terminal_id, []).append(i)
        calls = []
        order: list[list[int]] = []
        for term, idx in by_terminal.items():
            args = [self._retention]
            for i in idx:
                lab = labels[i]
                args += [b"%d" % lab.transaction_id, b"%d" % lab.tx_ms, b"%d" % lab.is_fraud]
            calls.append((self.keys(term), args))
            order.append(idx)
        tail: list[tuple[bytes, ...]] = []
        if progress:
            fields = []
            for part, p in sorted(progress.items()):
                fields += [b"%d" % part, b"%d:%d" % (p.next_offset, p.max_ts)]
            tail.append((b"HSET", self.progress_key, *fields))
        replies = self._eval_many(_ADD_LABELS, calls, tail)
        conflicts: list[int] = []
        for idx, reply in zip(order, replies[: len(calls)], strict=True):
            if not isinstance(reply, list):
                raise LabelIndexError(f"label script returned {reply!r}")
            conflicts.extend(idx[int(j)] for j in reply)
        return sorted(conflicts)

    def progress(self) -> dict[int, PartitionProgress]:
        """What the index holds per ``labels`` partition."""
        raw = self._client.hgetall(self.progress_key)
        return parse_progress(raw)

    # -- reads -------------------------------------------------------------------------------
    def terminal_features(
        self,
        terminal_id: np.ndarray,
        event_ms: np.ndarray,
        with_progress: bool = False,
        tail: Sequence[Sequence[bytes]] = (),
    ) -> tuple[np.ndarray, dict[int, PartitionProgress] | None]:
        """Terminal features for each (terminal, event time) row, in one round trip.

        Args:
            terminal_id: the rows' terminals.
            event_ms: the rows' event times.
            with_progress: read the progress hash in the same round trip.
            tail: more commands for the same round trip (their replies are in
                :attr:`last_tail_replies` afterwards).

        Returns:
            ``(n, len(TERMINAL_FEATURES))`` float64 values, and the progress hash when
            ``with_progress``.
        """
        terminal_id = np.asarray(terminal_id, dtype=np.int64)
        n = len(terminal_id)
        bounds = window_bounds(event_ms)
        w = len(WINDOWS_DAYS)
        order = np.argsort(terminal_id, kind="stable")
        uniq, starts = np.unique(terminal_id[order], return_index=True)
        ends = np.append(starts[1:], n)
        bound_bytes = [b"%d" % v for v in bounds[order].ravel().tolist()]
        per_terminal = []
        for term, s, e in zip(uniq.tolist(), starts.tolist(), ends.tolist(), strict=True):
            args = [b"%d" % (e - s), *bound_bytes[s * (1 + w) : e * (1 + w)]]
            per_terminal.append((self.keys(term), args))
        calls: list[tuple[Sequence[bytes], Sequence[bytes]]]
        if self._transport.kind == "raw" and per_terminal:
            # One server: one script call for every terminal of the batch.
            keys = [k for ks, _ in per_terminal for k in ks]
            args = [b"%d" % w, *(a for _, aa in per_terminal for a in aa)]
            calls = [(keys, args)]
        else:
            # Redis Cluster: one call per terminal, routed by its hash tag.
            calls = [(ks, [b"%d" % w, *aa]) for ks, aa in per_terminal]
        progress_cmd = [(b"HGETALL", self.progress_key)] if with_progress else []
        extra = [*progress_cmd, *tail]
        replies = self._eval_many(_COUNT_WINDOWS, calls, extra) if (calls or extra) else []
        counts = np.empty((n, 2 * w), dtype=np.int64)
        if calls:
            flat = [c for reply in replies[: len(calls)] for c in reply]
            counts[order] = np.asarray(flat, dtype=np.int64).reshape(n, 2 * w)
        progress = None
        if with_progress:
            progress = parse_progress(replies[len(calls)])
        self.last_tail_replies = replies[len(calls) + len(progress_cmd) :]
        return terminal_features_from_counts(counts), progress


def parse_progress(raw: Any) -> dict[int, PartitionProgress]:
    """The progress hash (``HGETALL`` reply: a dict, or a flat list in raw RESP2)."""
    if isinstance(raw, list):
        raw = dict(zip(raw[0::2], raw[1::2], strict=True))
    out: dict[int, PartitionProgress] = {}
    for field, value in (raw or {}).items():
        f = field.decode() if isinstance(field, bytes) else str(field)
        v = value.decode() if isinstance(value, bytes) else str(value)
        offset, ts = v.split(":")
        out[int(f)] = PartitionProgress(int(offset), int(ts))
    return out
