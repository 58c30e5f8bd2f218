"""Feast feature views: one per entity, fed by its push source, backed by Parquet history.

Feature names must match ``stages.shared.schemas`` (CUSTOMER_FEATURES, TERMINAL_FEATURES,
BEHAVIOUR_FEATURES).
"""

from datetime import timedelta

from data_sources import customer_behaviour_push, customer_spending_push, terminal_risk_push
from entities import customer, terminal
from feast import FeatureView, Field
from feast.types import Float64, Int64

# Longest window is 30 days; a row older than that (plus a day of slack) describes nothing.
AGGREGATE_TTL = timedelta(days=31)

# Customer spending over 1/7/30-day windows: counts and mean amounts.
customer_spending = FeatureView(
    name="customer_spending",
    entities=[customer],
    ttl=AGGREGATE_TTL,
    schema=[
        Field(name="customer_id", dtype=Int64),
        Field(name="customer_nb_tx_1d", dtype=Int64),
        Field(name="customer_avg_amount_1d", dtype=Float64),
        Field(name="customer_nb_tx_7d", dtype=Int64),
        Field(name="customer_avg_amount_7d", dtype=Float64),
        Field(name="customer_nb_tx_30d", dtype=Int64),
        Field(name="customer_avg_amount_30d", dtype=Float64),
    ],
    online=True,
    source=customer_spending_push,
    description="Per-customer transaction counts and mean amounts over 1, 7 and 30 days.",
    tags={"team": "fraud"},
)

# Terminal risk over 1/7/30-day windows (shifted by the label delay): counts and fraud rates.
terminal_risk = FeatureView(
    name="terminal_risk",
    entities=[terminal],
    ttl=AGGREGATE_TTL,
    schema=[
        Field(name="terminal_id", dtype=Int64),
        Field(name="terminal_nb_tx_1d", dtype=Int64),
        Field(name="terminal_risk_1d", dtype=Float64),
        Field(name="terminal_nb_tx_7d", dtype=Int64),
        Field(name="terminal_risk_7d", dtype=Float64),
        Field(name="terminal_nb_tx_30d", dtype=Int64),
        Field(name="terminal_risk_30d", dtype=Float64),
    ],
    online=True,
    source=terminal_risk_push,
    description="Per-terminal labelled transaction counts and fraud rates over 1, 7, 30 days.",
    tags={"team": "fraud"},
)

# Customer behaviour (v2): its own view, so v1's view, history and service stay as they were.
customer_behaviour = FeatureView(
    name="customer_behaviour",
    entities=[customer],
    ttl=AGGREGATE_TTL,
    schema=[
        Field(name="customer_id", dtype=Int64),
        Field(name="customer_amount_ratio_7d", dtype=Float64),
        Field(name="customer_amount_ratio_30d", dtype=Float64),
        Field(name="customer_secs_since_prev_tx", dtype=Float64),
        Field(name="customer_nb_terminals_1d", dtype=Int64),
        Field(name="customer_nb_terminals_7d", dtype=Int64),
        Field(name="customer_amount_median_ratio_30d", dtype=Float64),
        Field(name="customer_max_amount_median_ratio_7d", dtype=Float64),
    ],
    online=True,
    source=customer_behaviour_push,
    description="Per-customer amount vs 7/30-day means, time since previous transaction, "
    "distinct terminals over 1 and 7 days, amount and 7-day largest amount vs 30-day median.",
    tags={"team": "fraud"},
)
