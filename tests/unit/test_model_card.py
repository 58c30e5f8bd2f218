"""Model card: a version's metadata.json read into typed fields and written back unchanged."""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from stages.ops.harness.sandbox import register_tiny_model
from stages.shared.schemas import service_features
from stages.shared.settings import Settings
from training import registry
from training.card import ModelCard, Window
from training.errors import ModelCardError
from training.reference import build_reference, reference_from_card

FEATURES = ["amount", "terminal_risk_7d"]


def registered(**keys: Any) -> dict[str, Any]:
    """What register() adds, and ``keys``."""
    return {
        "name": "fraud",
        "version": "v0001",
        "created_at": "2026-12-01T10:28:16.852736+00:00",
        "model_sha256": "04" * 32,
        **keys,
    }


def training_layout() -> dict[str, Any]:
    """Every key training/train.py writes, shaped as it writes them, and register()'s."""
    rng = np.random.default_rng(0)
    x = pd.DataFrame({name: rng.normal(size=200) for name in FEATURES})
    metrics = {
        "average_precision": 0.63,
        "roc_auc": 0.88,
        "card_precision_at_k": 0.016,
        "card_precision_per_day": {"2018-05-06": 0.05, "2018-05-07": 0.03},
        "k": 100,
        "n_transactions": 1000,
    }
    params = {"learning_rate": 0.02, "num_leaves": 15, "monotone": False, "seed": 0}
    return registered(
        model_format="lightgbm-text",
        feature_service="fraud_model_v1",
        features=FEATURES,
        training_window={"start": "2018-04-22", "end_inclusive": "2018-04-28"},
        fit_window={"start": "2018-04-15", "end_inclusive": "2018-04-28"},
        test_window={"start": "2018-05-06", "end_inclusive": "2018-05-12"},
        delay_days=7,
        best_iteration=6,
        params=params,
        lightgbm_params={**params, "monotone_constraints": [0, 0]},
        monotone_increasing=[],
        tuning={
            "best": {"best_iteration": 6, "fold_aps": [0.55], "params": params},
            "trials": [{"params": params, "validation_ap": 0.55, "best_iteration": 6}],
            "folds": [{"fit": "2018-04-08..2018-04-14", "fit_frauds": 189, "fit_rows": 1050}],
            "monotone_cost": None,
        },
        metrics=metrics,
        model_metrics={"lightgbm": metrics, "logistic_regression": {**metrics, "roc_auc": 0.8}},
        uncertainty={
            "primary": "lightgbm",
            "replicates": 500,
            "metrics": {"roc_auc": {"lightgbm": {"value": 0.88, "low": 0.85, "high": 0.91}}},
            "differences": {
                "logistic_regression": {"roc_auc": {"value": 0.08, "share_ahead": 1.0}}
            },
            "card_precision_ceiling": 0.44,
        },
        n_train=1040,
        n_train_frauds=351,
        data_fingerprint="57d5e11e" * 8,
        feature_importance_gain={"amount": 0.7, "terminal_risk_7d": 0.3},
        reference=build_reference(x, rng.random(200), FEATURES),
    )


def test_the_training_layout_reads_into_typed_fields_and_round_trips() -> None:
    layout = json.loads(json.dumps(training_layout()))  # as read back from metadata.json
    card = ModelCard.from_dict(layout)
    assert card.to_dict() == layout
    assert ModelCard.from_dict(card.to_dict()) == card
    assert card.created_at == datetime(2026, 12, 1, 10, 28, 16, 852736, tzinfo=UTC)
    window = card.training_window
    assert window == Window(date(2018, 4, 22), date(2018, 4, 28))
    assert window is not None and window.end == date(2018, 4, 29)
    assert str(card.test_window) == "2018-05-06 .. 2018-05-12"
    assert card.fit_window == Window(date(2018, 4, 15), date(2018, 4, 28))
    assert card.wider_fit_window == card.fit_window
    same = ModelCard.from_dict({**layout, "fit_window": layout["training_window"]})
    assert same.wider_fit_window is None
    older = {k: v for k, v in layout.items() if k != "fit_window"}
    assert ModelCard.from_dict(older).wider_fit_window is None
    assert card.features == tuple(FEATURES) and card.monotone_increasing == ()
    assert (card.best_iteration, card.n_train, card.n_train_frauds) == (6, 1040, 351)
    assert card.metrics is not None and card.metrics["average_precision"] == 0.63
    ref = reference_from_card(card)
    assert ref is not None and ref.score is not None and set(ref.features) == set(FEATURES)
    # Every card field is a key of this layout: none is left without a test.
    typed = {f.name for f in fields(ModelCard)} - {"extra", "training_distribution"}
    assert typed == set(layout) and card.extra == {}


def test_a_registered_tiny_model_round_trips(tmp_path: Path, small_tx: pd.DataFrame) -> None:
    settings = Settings(home=tmp_path)
    version = register_tiny_model(settings, small_tx, feature_service="fraud_model_v2")
    mv = registry.get_version(settings.registry_dir, settings.prediction.model_name, version)
    text = (mv.path / registry.METADATA_FILE).read_text()
    assert json.dumps(mv.card.to_dict(), indent=2, sort_keys=True) == text
    assert ModelCard.from_dict(json.loads(text)) == mv.card and mv.metadata == json.loads(text)
    assert mv.card.feature_service == "fraud_model_v2"
    assert mv.card.features == service_features("fraud_model_v2")
    assert mv.card.model_sha256 == registry.sha256_bytes(mv.model_path.read_bytes())
    assert mv.card.created_at.tzinfo is not None and mv.card.training_window is None
    loaded = registry.load_version(settings.registry_dir, "fraud", version)
    assert loaded.card == mv.card and loaded.features == mv.card.features


def test_unknown_keys_are_kept_through_a_round_trip(tmp_path: Path) -> None:
    unknown = {"validation_days": 2, "extra": "x", "notes": {"by": "ops", "tags": [1, None]}}
    card = ModelCard.from_dict(registered(features=FEATURES, **unknown))
    assert card.extra == unknown and card.features == tuple(FEATURES)
    assert card.to_dict() == registered(features=FEATURES, **unknown)
    # Re-registering a version's whole metadata (as the chaos run does) keeps them too.
    mv = registry.register(tmp_path, "fraud", "tree", card.to_dict())
    again = registry.get_version(tmp_path, "fraud", mv.version)
    assert again.card.extra == unknown and again.metadata["notes"] == unknown["notes"]
    with pytest.raises(ValueError, match="card fields"):
        ModelCard("fraud", "v0001", datetime.now(UTC), extra={"features": []})


def test_a_missing_required_key_names_the_version_and_the_key(tmp_path: Path) -> None:
    mv = registry.register(tmp_path, "fraud", "tree", {"features": FEATURES})
    meta_path = mv.path / registry.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    del meta["created_at"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelCardError) as info:
        registry.get_version(tmp_path, "fraud", "v0001")
    assert (info.value.version, info.value.key) == ("v0001", "created_at")
    assert str(info.value) == "model v0001: metadata key 'created_at' is missing"
    assert isinstance(info.value, registry.RegistryError)
    with pytest.raises(ModelCardError, match="'created_at'"):
        registry.list_versions(tmp_path, "fraud")
    with pytest.raises(ModelCardError, match="'name' is missing"):
        ModelCard.from_dict({**registered(), "name": None})


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("n_train", "1040", "must be an integer, not str"),
        ("best_iteration", True, "must be an integer, not bool"),
        ("features", ["amount", 3], "must be a list of strings"),
        ("feature_service", 1, "must be a string, not int"),
        ("metrics", [0.9], "must be an object, not list"),
        ("created_at", "yesterday", "Invalid isoformat string"),
        ("training_window", {"start": "2018-04-22"}, "exactly start and end_inclusive"),
        ("test_window", {"start": "2018-05-12", "end_inclusive": "2018-05-06"}, "ends"),
    ],
)
def test_an_ill_typed_key_is_refused_by_name(key: str, value: Any, problem: str) -> None:
    with pytest.raises(ModelCardError, match=f"model v0003: metadata key '{key}' .*{problem}"):
        ModelCard.from_dict(registered(**{key: value}), "v0003")


def test_register_refuses_ill_typed_metadata_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ModelCardError, match="'n_train'"):
        registry.register(tmp_path, "fraud", "tree", {"n_train": 1.5})
    assert list((tmp_path / "fraud").iterdir()) == []


# What the first train.py did not write yet; it wrote validation_days and the reference under
# another name.
LATER_KEYS = ("model_format", "lightgbm_params", "monotone_increasing", "tuning", "model_metrics")


def test_a_version_in_the_first_training_layout_still_loads(tmp_path: Path) -> None:
    import lightgbm as lgb

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 2))
    data = lgb.Dataset(x, (x[:, 0] > 0).astype(int), feature_name=FEATURES)
    text = lgb.train({"objective": "binary", "verbose": -1}, data, 3).model_to_string()
    layout = training_layout()
    old = {k: v for k, v in layout.items() if k not in (*LATER_KEYS, "reference")}
    old |= {
        "model_sha256": registry.sha256_bytes(text.encode()),
        "validation_days": 2,
        "training_distribution": layout["reference"],
    }
    version_dir = tmp_path / "fraud" / "v0001"
    version_dir.mkdir(parents=True)
    (version_dir / registry.MODEL_FILE).write_text(text)
    meta_text = json.dumps(old, indent=2, sort_keys=True)
    (version_dir / registry.METADATA_FILE).write_text(meta_text)

    loaded = registry.load_version(tmp_path, "fraud", "v0001")
    card = loaded.card
    assert loaded.features == tuple(FEATURES) and card.training_window is not None
    assert card.training_window.start == date(2018, 4, 22) and card.best_iteration == 6
    assert card.extra == {"validation_days": 2}
    assert all(getattr(card, key) is None for key in (*LATER_KEYS, "reference"))
    ref = reference_from_card(card)
    assert ref is not None and ref.score is not None and set(ref.features) == set(FEATURES)
    assert json.dumps(card.to_dict(), indent=2, sort_keys=True) == meta_text
