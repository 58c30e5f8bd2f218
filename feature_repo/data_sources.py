"""Feast data sources: Parquet history (offline) and push sources (online, from enrichment).

Paths are relative: Feast resolves them against the repo path, so the same definitions work
from any checkout. Each path is a directory of Parquet part files appended by
``stages.shared.offline.write_offline``; the file (Dask) offline store reads every part in it.
"""

from feast import FileSource, PushSource

# Offline history of customer aggregates, one row per (customer, event time); training reads it.
customer_spending_source = FileSource(
    name="customer_spending_source",
    path="data/customer_spending",
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
    description="Parquet part files of customer spending aggregates.",
)

# Offline history of terminal risk aggregates, one row per (terminal, event time).
terminal_risk_source = FileSource(
    name="terminal_risk_source",
    path="data/terminal_risk",
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
    description="Parquet part files of terminal risk aggregates.",
)

# Offline history of customer behaviour (feature service v2), one row per (customer, event time).
customer_behaviour_source = FileSource(
    name="customer_behaviour_source",
    path="data/customer_behaviour",
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
    description="Parquet part files of customer behaviour features.",
)

# Enrichment pushes fresh customer aggregates here; the batch source backs materialize/history.
customer_spending_push = PushSource(
    name="customer_spending_push",
    batch_source=customer_spending_source,
    description="Online writes of customer aggregates by the enrichment stage.",
)

# Enrichment pushes fresh terminal risk aggregates here as delayed labels arrive.
terminal_risk_push = PushSource(
    name="terminal_risk_push",
    batch_source=terminal_risk_source,
    description="Online writes of terminal risk aggregates by the enrichment stage.",
)

# Enrichment pushes each event's customer behaviour features here, beside its spending row.
customer_behaviour_push = PushSource(
    name="customer_behaviour_push",
    batch_source=customer_behaviour_source,
    description="Online writes of customer behaviour features by the enrichment stage.",
)
