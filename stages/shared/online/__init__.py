"""Fast batched access to Feast's Redis online store, in Feast's own byte layout
(``FORMAT.md``), so that Feast's SDK reads what we write and we read what Feast writes.

One module per concept:

- ``keys``: the entity key and hash field encoding (pure bytes).
- ``layout``: :class:`~stages.shared.online.layout.OnlineLayout`, read from the Feast
  registry or from the snapshot ``feast apply`` leaves next to it (``online_layout``).
- ``codec``: protobuf Values and Timestamps, encoded and decoded (vectorised).
- ``resp``: raw RESP commands and replies, and the pooled raw connection.
- ``cluster``: raw RESP per Redis Cluster primary; how a failing-over cluster answers.
- ``transport``: raw, cluster or redis-py pipeline, chosen once per client
  (``transport_for``), used by the reader, the writer, the label index and the claims.
- ``scripts``: the compare-and-set write rule in Lua.
- ``reader``: :class:`~stages.shared.online.reader.OnlineFeatureReader` (a feature service
  for a micro-batch) and :class:`~stages.shared.online.reader.OnlineBatch`.
- ``writer``: :class:`~stages.shared.online.writer.OnlineFeatureWriter` (idempotent batched
  writes).
- ``errors``: :class:`FeatureLayoutError`, :class:`OnlineWriteError`.

Code imports from the concept module; this package re-exports the main entry points.
"""

from stages.shared.online.errors import FeatureLayoutError, OnlineWriteError
from stages.shared.online.layout import OnlineLayout, ViewLayout, online_layout
from stages.shared.online.reader import OnlineBatch, OnlineFeatureReader
from stages.shared.online.writer import OnlineFeatureWriter

__all__ = [
    "FeatureLayoutError",
    "OnlineBatch",
    "OnlineFeatureReader",
    "OnlineFeatureWriter",
    "OnlineLayout",
    "OnlineWriteError",
    "ViewLayout",
    "online_layout",
]
