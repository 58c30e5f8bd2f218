"""Feast entities: the keys every feature in the pipeline is looked up by.

``value_type`` is given on purpose: Feast 0.67 deprecates *omitting* it ("will be mandatory in
the next release"), and a typed entity keeps the registry from recording UNKNOWN. ``ValueType``
is only deprecated as a feature dtype (use ``feast.types`` in ``Field`` for those).
"""

from feast import Entity, ValueType

# Card holder: the customer spending windows are aggregated per customer.
customer = Entity(
    name="customer",
    join_keys=["customer_id"],
    value_type=ValueType.INT64,
    description="A card holder; id as carried by the transactions topic.",
)

# Point of sale: terminal risk windows are aggregated per terminal from delayed labels.
terminal = Entity(
    name="terminal",
    join_keys=["terminal_id"],
    value_type=ValueType.INT64,
    description="A payment terminal; id as carried by the transactions topic.",
)
