"""What a stage process must not inherit from its parent's environment.

Importing Feast (0.67) sets ``PROMETHEUS_MULTIPROC_DIR`` and ``PROMETHEUS_MULTIPROCESS_DIR``
to a temporary ``feast_metrics_*`` folder in ``os.environ``, for Gunicorn workers. A stage
started by a process that imported Feast (the demo, the bench, the tests) inherits them, and
prometheus_client then keeps every metric in memory-mapped files and checks the pid on every
increment: 8 % of the enrichment stage's time per message, measured with py-spy. The stages
serve their own registry per process and never use multiprocess mode.
"""

from __future__ import annotations

from collections.abc import MutableMapping

_VARS = ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR", "prometheus_multiproc_dir")


def drop_feast_prometheus_dirs(env: MutableMapping[str, str]) -> None:
    """Remove the multiprocess variables from ``env`` when Feast set them (a
    ``feast_metrics_`` folder); a deliberate setting of the user's is kept."""
    for name in _VARS:
        value = env.get(name)
        if value is not None and "feast_metrics_" in value:
            del env[name]
