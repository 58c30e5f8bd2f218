"""Feast feature services: the versioned feature sets a model is trained and served with."""

from feast import FeatureService
from feature_views import customer_behaviour, customer_spending, terminal_risk

# The fraud model's features; a model records this name, a new feature set means a v2.
fraud_model_v1 = FeatureService(
    name="fraud_model_v1",
    features=[customer_spending, terminal_risk],
    description="Customer spending and terminal risk features used by the fraud model v1.",
)

# v1's features plus the customer behaviour ones; v1 models keep being served with v1.
fraud_model_v2 = FeatureService(
    name="fraud_model_v2",
    features=[customer_spending, terminal_risk, customer_behaviour],
    description="Fraud model v2: v1's features plus customer behaviour features.",
)
