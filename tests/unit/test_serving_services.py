"""The prediction stage serves each model with its own feature service: the union read of
the services in use, and the load-time refusal of a model the online layout cannot serve."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest

from stages.prediction.app import model_check, union_service
from stages.prediction.logic import assemble_matrix
from stages.prediction.models import ServingModel, UnservableModelError
from stages.shared.online import OnlineLayout, ViewLayout
from stages.shared.schemas import (
    BEHAVIOUR_FEATURES,
    BEHAVIOUR_VIEW,
    CUSTOMER_FEATURES,
    CUSTOMER_VIEW,
    MODEL_FEATURES,
    MODEL_FEATURES_V2,
    REQUEST_FEATURES,
    TERMINAL_FEATURES,
    TERMINAL_VIEW,
)


def layout() -> OnlineLayout:
    def view(name: str, key: str, features: tuple[str, ...]) -> ViewLayout:
        return ViewLayout(name, key, features, tuple("Float64" for _ in features))

    views = {
        CUSTOMER_VIEW: view(CUSTOMER_VIEW, "customer_id", CUSTOMER_FEATURES),
        TERMINAL_VIEW: view(TERMINAL_VIEW, "terminal_id", TERMINAL_FEATURES),
        BEHAVIOUR_VIEW: view(BEHAVIOUR_VIEW, "customer_id", BEHAVIOUR_FEATURES),
    }
    services = {
        "fraud_model_v1": ((CUSTOMER_VIEW, CUSTOMER_FEATURES), (TERMINAL_VIEW, TERMINAL_FEATURES)),
        "fraud_model_v2": (
            (CUSTOMER_VIEW, CUSTOMER_FEATURES),
            (TERMINAL_VIEW, TERMINAL_FEATURES),
            (BEHAVIOUR_VIEW, BEHAVIOUR_FEATURES),
        ),
        "spending_only": ((CUSTOMER_VIEW, CUSTOMER_FEATURES[:2]),),
    }
    return OnlineLayout(project="p", views=views, services=services)


def model(features: tuple[str, ...], service: str) -> ServingModel:
    booster = lgb.Booster(
        params={"objective": "binary"},
        train_set=lgb.Dataset(np.zeros((2, len(features))), label=[0, 1]),
    )
    return ServingModel("fraud", "v0007", features, service, booster)


def test_one_service_is_served_as_is_and_several_as_their_union() -> None:
    base = layout()
    same, name = union_service(base, ["fraud_model_v1", "fraud_model_v1"])
    assert same is base and name == "fraud_model_v1"
    union, name = union_service(base, ["fraud_model_v2", "spending_only", "fraud_model_v1"])
    assert name == "fraud_model_v1+fraud_model_v2+spending_only"
    assert union.services[name] == base.services["fraud_model_v2"]
    assert union.services["fraud_model_v1"] == base.services["fraud_model_v1"]
    with pytest.raises(UnservableModelError, match="fraud_model_v9"):
        union_service(base, ["fraud_model_v1", "fraud_model_v9"])


def test_union_columns_serve_each_models_own_matrix() -> None:
    union, name = union_service(layout(), ["fraud_model_v1", "fraud_model_v2"])
    names = [f for _, features in union.services[name] for f in features]
    online = np.arange(2 * len(names), dtype=np.float64).reshape(2, len(names))
    request = np.ones((2, len(REQUEST_FEATURES)))
    v1 = assemble_matrix(MODEL_FEATURES, request, online, names)
    v2 = assemble_matrix(MODEL_FEATURES_V2, request, online, names)
    np.testing.assert_array_equal(v2[:, : len(MODEL_FEATURES)], v1)
    j = names.index("customer_nb_terminals_7d")
    np.testing.assert_array_equal(v2[:, -1], online[:, j])


def test_a_model_is_refused_when_its_service_cannot_serve_it() -> None:
    check = model_check(layout())
    check(model(MODEL_FEATURES, "fraud_model_v1"))
    check(model(MODEL_FEATURES_V2, "fraud_model_v2"))
    with pytest.raises(UnservableModelError, match="no such feature service"):
        check(model(MODEL_FEATURES_V2, "fraud_model_v3"))
    # A v2 model recorded as v1 (or a v1 registry serving v2 features) is refused.
    with pytest.raises(UnservableModelError, match="customer_amount_ratio_7d"):
        check(model(MODEL_FEATURES_V2, "fraud_model_v1"))
