"""Model registry: versions, promotion pointer, rollback, integrity checks."""

from __future__ import annotations

import json
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from training import registry
from training.registry import ModelIntegrityError, RegistryError

FEATURES = ("a", "b", "c")


@pytest.fixture(scope="module")
def model_text() -> str:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    ds = lgb.Dataset(x, y, feature_name=list(FEATURES), free_raw_data=False)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 4}, ds, 5)
    return booster.model_to_string()


def reg(root: Path, text: str, **meta: object) -> registry.ModelVersion:
    return registry.register(root, "fraud", text, {"features": list(FEATURES), **meta})


def test_register_assigns_increasing_versions_and_metadata(tmp_path: Path, model_text: str) -> None:
    v1 = reg(tmp_path, model_text, metrics={"auc": 0.9})
    v2 = reg(tmp_path, model_text, extra="x")
    assert (v1.version, v2.version) == ("v0001", "v0002")
    assert (tmp_path / "fraud" / "v0001" / "model.txt").read_text() == model_text
    meta = json.loads((tmp_path / "fraud" / "v0001" / "metadata.json").read_text())
    assert meta["version"] == "v0001" and meta["metrics"] == {"auc": 0.9}
    assert meta["model_sha256"] == registry.sha256_bytes(model_text.encode())
    assert [v.version for v in registry.list_versions(tmp_path, "fraud")] == ["v0001", "v0002"]
    assert registry.list_versions(tmp_path, "other") == []
    # No staging leftovers; nothing promoted yet.
    assert not list((tmp_path / "fraud").glob(".staging-*"))
    assert registry.current_version(tmp_path, "fraud") is None
    with pytest.raises(RegistryError):
        registry.load_current(tmp_path, "fraud")


def test_versions_keep_increasing_past_9999_and_after_gaps(tmp_path: Path, model_text: str) -> None:
    (tmp_path / "fraud" / "v0041").mkdir(parents=True)
    assert reg(tmp_path, model_text).version == "v0042"
    assert registry.version_number("v10000") == 10000
    with pytest.raises(ValueError):
        registry.version_number("latest")


def test_promote_and_load_current(tmp_path: Path, model_text: str) -> None:
    reg(tmp_path, model_text)
    reg(tmp_path, model_text)
    registry.promote(tmp_path, "fraud", "v0002")
    assert (tmp_path / "fraud" / "CURRENT").read_text() == "v0002\n"
    loaded = registry.load_current(tmp_path, "fraud")
    assert loaded.version == "v0002" and loaded.features == FEATURES
    x = np.array([[1.0, 1.0, 0.0], [-1.0, -1.0, 0.0]])
    p = loaded.booster.predict(x)
    assert p[0] > 0.5 > p[1]
    with pytest.raises(RegistryError):
        registry.promote(tmp_path, "fraud", "v0009")


def test_rollback_walks_back_promotions(tmp_path: Path, model_text: str) -> None:
    for _ in range(3):
        reg(tmp_path, model_text)
    with pytest.raises(RegistryError):
        registry.rollback(tmp_path, "fraud")  # nothing promoted
    for v in ("v0001", "v0002", "v0003"):
        registry.promote(tmp_path, "fraud", v)
    assert registry.rollback(tmp_path, "fraud").version == "v0002"
    assert registry.current_version(tmp_path, "fraud") == "v0002"
    assert registry.rollback(tmp_path, "fraud").version == "v0001"
    with pytest.raises(RegistryError):
        registry.rollback(tmp_path, "fraud")
    assert registry.current_version(tmp_path, "fraud") == "v0001"
    history = (tmp_path / "fraud" / "HISTORY").read_text().splitlines()
    assert len(history) == 5 and "rollback v0003 v0002" in history[3]
    # Promoting again after a rollback, then rolling back, returns to the rolled-back-to version.
    registry.promote(tmp_path, "fraud", "v0003")
    assert registry.rollback(tmp_path, "fraud").version == "v0001"


def test_tampered_model_raises_and_is_never_loaded(
    tmp_path: Path, model_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mv = reg(tmp_path, model_text)
    registry.promote(tmp_path, "fraud", mv.version)
    tampered = model_text.replace("objective=binary", "objective=regression")
    assert tampered != model_text
    mv.model_path.write_text(tampered)

    loads: list[object] = []
    real_booster = lgb.Booster

    def spy(*args: object, **kwargs: object) -> lgb.Booster:
        loads.append(kwargs)
        return real_booster(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(registry.lgb, "Booster", spy)
    with pytest.raises(ModelIntegrityError) as info:
        registry.load_current(tmp_path, "fraud")
    err = info.value
    assert err.version == "v0001"
    assert err.expected == mv.metadata["model_sha256"]
    assert err.actual == registry.sha256_bytes(tampered.encode())
    assert loads == []  # LightGBM never saw the unverified file
    # Restoring the original bytes makes it loadable again.
    mv.model_path.write_text(model_text)
    assert registry.load_current(tmp_path, "fraud").version == "v0001"
    assert len(loads) == 1


def test_metadata_without_checksum_is_refused(tmp_path: Path, model_text: str) -> None:
    mv = reg(tmp_path, model_text)
    meta_path = mv.path / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["model_sha256"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelIntegrityError):
        registry.load_version(tmp_path, "fraud", "v0001")


def test_extra_files_and_invalid_names(tmp_path: Path, model_text: str) -> None:
    mv = registry.register(tmp_path, "fraud", model_text, {}, extra_files={"report.md": "# hi"})
    assert (mv.path / "report.md").read_text() == "# hi"
    with pytest.raises(ValueError):
        registry.register(tmp_path, "fraud", model_text, {}, extra_files={"model.txt": "x"})
    with pytest.raises(ValueError):
        registry.register(tmp_path, "../evil", model_text, {})
    # The failed registration left no version behind.
    assert [v.version for v in registry.list_versions(tmp_path, "fraud")] == ["v0001"]
