"""The prediction stage serves each model with its own feature service: the union read of
the services in use, and the load-time refusal of a model the online layout cannot serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest

from stages.prediction.app import model_check, union_service
from stages.prediction.logic import assemble_matrix
from stages.prediction.models import ModelHolder, ServingModel, UnservableModelError
from stages.shared.metrics import build_metrics
from stages.shared.online.layout import OnlineLayout, ViewLayout
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
from stages.shared.settings import PredictionSettings, Settings
from training import registry


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
    j = names.index(BEHAVIOUR_FEATURES[-1])
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


def register(settings: Settings, features: tuple[str, ...], service: str | None) -> str:
    rng = np.random.default_rng(len(features))
    x, y = rng.random((50, len(features))), rng.integers(0, 2, 50)
    data = lgb.Dataset(x, label=y, feature_name=list(features))
    text = lgb.train({"objective": "binary", "verbose": -1}, data, 2).model_to_string()
    meta: dict[str, object] = {"features": list(features)}
    if service is not None:
        meta["feature_service"] = service
    name = settings.prediction.model_name
    return registry.register(settings.registry_dir, name, text, meta).version


def holder(tmp_path: Path, **prediction: Any) -> tuple[Settings, ModelHolder]:
    settings = Settings(home=tmp_path, prediction=PredictionSettings(**prediction))
    metrics = build_metrics()
    return settings, ModelHolder(settings, metrics, model_check(layout()))


def failures(models: ModelHolder, role: str) -> float:
    value = models._metrics.registry.get_sample_value(
        "rtpipe_model_load_failures_total", {"model": "fraud", "reason": role}
    )
    return value or 0.0


def test_each_model_keeps_its_service_and_a_v2_shadow_of_a_v1_model_is_served(
    tmp_path: Path,
) -> None:
    settings, _ = holder(tmp_path)
    v1 = register(settings, MODEL_FEATURES, None)  # metadata of old: the setting's (v1)
    v2 = register(settings, MODEL_FEATURES_V2, "fraud_model_v2")
    registry.promote(settings.registry_dir, "fraud", v1)
    registry.set_shadow(settings.registry_dir, "fraud", v2)
    _, models = holder(tmp_path)
    models.load_initial()
    assert models.current.feature_service == "fraud_model_v1"
    assert models.shadow is not None and models.shadow.feature_service == "fraud_model_v2"
    assert [m.version for m in models.serving] == [v1, v2]


def test_a_canary_of_another_service_is_refused(tmp_path: Path) -> None:
    settings, _ = holder(tmp_path)
    v1 = register(settings, MODEL_FEATURES, "fraud_model_v1")
    v2 = register(settings, MODEL_FEATURES_V2, "fraud_model_v2")
    registry.promote(settings.registry_dir, "fraud", v1)
    _, models = holder(tmp_path, canary_version=v2, canary_fraction=0.5)
    models.load_initial()
    assert models.canary is None and failures(models, "canary") == 1
    assert models.current.version == v1


def test_a_promotion_to_an_unservable_model_keeps_the_current_one(tmp_path: Path) -> None:
    settings, _ = holder(tmp_path)
    v1 = register(settings, MODEL_FEATURES, "fraud_model_v1")
    bad = register(settings, MODEL_FEATURES_V2, "fraud_model_v3")  # not in the layout
    registry.promote(settings.registry_dir, "fraud", v1)
    _, models = holder(tmp_path, reload_interval_s=0.001)
    models.load_initial()
    registry.promote(settings.registry_dir, "fraud", bad)
    models.maybe_reload()
    assert models.current.version == v1 and failures(models, "load") == 1
    # A first start on it fails fast instead.
    _, fresh = holder(tmp_path)
    with pytest.raises(RuntimeError, match="failed to load"):
        fresh.load_initial()
