"""rtpipe's stages: one package per consumer group, and the plumbing they share."""

# prometheus_client picks its value store when it is first imported, and Feast's metrics
# module (imported by feast.feature_store) sets PROMETHEUS_MULTIPROCESS_DIR at its own
# import: imported after Feast, every counter of this process lived in Feast's temp files,
# shared by every registry built in it (a second build_metrics() started from the first's
# counts). Imported here, before any of our modules can import Feast, the store stays in
# memory.
import prometheus_client.values  # noqa: F401
