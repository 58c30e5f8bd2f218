"""Training from the Feast offline store: one module per step."""

# Before Feast: see stages/__init__.py (prometheus_client's value store).
import prometheus_client.values  # noqa: F401
