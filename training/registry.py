"""File-system model registry: versioned LightGBM text models with metadata and a promotion pointer.

Layout under ``settings.registry_dir / <model_name>/``::

    v0001/model.txt        LightGBM text format (never pickle)
    v0001/metadata.json    the model card (training.card): version, features, training window,
                           metrics, sha256 of model.txt, ...
    v0001/report.md        written by training (optional)
    CURRENT                the promoted version, e.g. "v0003\\n" (replaced atomically by rename)
    HISTORY                one line per promotion: "<iso time> <version>" (append-only)

A version folder is written under a temporary name and renamed into place, so a reader never sees
a half-written version. :func:`load_current` verifies the sha256 of ``model.txt`` against the
metadata *before* LightGBM reads the file, and loads the exact bytes that were verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightgbm as lgb

from training.card import ModelCard
from training.errors import ModelIntegrityError, RegistryError

logger = logging.getLogger(__name__)

MODEL_FILE = "model.txt"
METADATA_FILE = "metadata.json"
CURRENT_FILE = "CURRENT"
HISTORY_FILE = "HISTORY"
_VERSION_RE = re.compile(r"^v(\d{4,})$")


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One registered version: where it lives and its model card."""

    name: str
    version: str
    path: Path
    card: ModelCard

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def metadata(self) -> dict[str, Any]:
        """The card as ``metadata.json`` holds it, a fresh dict: to register a copy of a
        whole version (the chaos run's tampered versions)."""
        return self.card.to_dict()


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A verified, loaded model ready to predict."""

    name: str
    version: str
    booster: lgb.Booster
    features: tuple[str, ...]
    card: ModelCard


def version_number(version: str) -> int:
    """The integer of a version string like ``"v0007"``.

    Raises:
        ValueError: if the string is not a version.
    """
    m = _VERSION_RE.match(version)
    if not m:
        raise ValueError(f"not a model version: {version!r}")
    return int(m.group(1))


def format_version(number: int) -> str:
    """``7 -> "v0007"``."""
    return f"v{number:04d}"


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _model_dir(registry_dir: Path, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid model name {name!r}")
    return registry_dir / name


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_version(name: str, path: Path) -> ModelVersion:
    data = json.loads((path / METADATA_FILE).read_text())
    if not isinstance(data, dict):
        raise RegistryError(f"{path / METADATA_FILE}: not a JSON object")
    return ModelVersion(name, path.name, path, ModelCard.from_dict(data, path.name))


def list_versions(registry_dir: Path, name: str) -> list[ModelVersion]:
    """Every registered version of a model, oldest first.

    Raises:
        ModelCardError: if a version's metadata is incomplete or ill-typed.
    """
    root = _model_dir(registry_dir, name)
    if not root.is_dir():
        return []
    out = [
        _read_version(name, p)
        for p in root.iterdir()
        if p.is_dir() and _VERSION_RE.match(p.name) and (p / METADATA_FILE).is_file()
    ]
    return sorted(out, key=lambda v: version_number(v.version))


def get_version(registry_dir: Path, name: str, version: str) -> ModelVersion:
    """One registered version.

    Raises:
        RegistryError: if it does not exist.
        ModelCardError: if its metadata is incomplete or ill-typed.
    """
    version_number(version)
    path = _model_dir(registry_dir, name) / version
    if not (path / METADATA_FILE).is_file():
        raise RegistryError(f"model {name} has no version {version} under {path.parent}")
    return _read_version(name, path)


def register(
    registry_dir: Path,
    name: str,
    model_text: str,
    metadata: Mapping[str, Any],
    extra_files: dict[str, str] | None = None,
) -> ModelVersion:
    """Store a new version (next integer) of a model; does not promote it.

    Args:
        registry_dir: root of the registry (``settings.registry_dir``).
        name: model name (``settings.prediction.model_name``).
        model_text: the LightGBM model in text format (``Booster.model_to_string()``).
        metadata: the model card's keys as JSON values (features, feature_service, training
            window, metrics, data fingerprint, reference...; see :class:`ModelCard`, unknown
            keys are kept); ``version``, ``created_at``, ``name`` and ``model_sha256`` are
            set here.
        extra_files: more text files for the version folder, e.g. ``{"report.md": ...}``.

    Returns:
        The registered version.

    Raises:
        ModelCardError: if a key of ``metadata`` has the wrong type (nothing is registered).
    """
    root = _model_dir(registry_dir, name)
    root.mkdir(parents=True, exist_ok=True)
    data = model_text.encode()
    digest = sha256_bytes(data)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        (staging / MODEL_FILE).write_bytes(data)
        for fname, text in (extra_files or {}).items():
            if "/" in fname or fname in (MODEL_FILE, METADATA_FILE):
                raise ValueError(f"invalid extra file name {fname!r}")
            (staging / fname).write_text(text)
        # Versions are claimed by an atomic rename; a concurrent registrant retries the next one.
        while True:
            existing = [version_number(p.name) for p in root.iterdir() if _VERSION_RE.match(p.name)]
            version = format_version(max(existing, default=0) + 1)
            card = ModelCard.from_dict(
                {
                    **metadata,
                    "name": name,
                    "version": version,
                    "created_at": datetime.now(UTC).isoformat(),
                    "model_sha256": digest,
                },
                version,
            )
            card_json = json.dumps(card.to_dict(), indent=2, sort_keys=True)
            (staging / METADATA_FILE).write_text(card_json)
            try:
                staging.rename(root / version)
                break
            except OSError:
                if not (root / version).exists():
                    raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("registered %s %s (sha256 %s)", name, version, digest[:12])
    return ModelVersion(name, version, root / version, card)


def current_version(registry_dir: Path, name: str) -> str | None:
    """The promoted version, or None if nothing was promoted."""
    path = _model_dir(registry_dir, name) / CURRENT_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    version_number(text)
    return text


def promotion_history(registry_dir: Path, name: str) -> list[str]:
    """Promoted versions in promotion order (rollbacks included as promotions)."""
    path = _model_dir(registry_dir, name) / HISTORY_FILE
    if not path.is_file():
        return []
    return [line.split()[-1] for line in path.read_text().splitlines() if line.strip()]


def promote(registry_dir: Path, name: str, version: str) -> ModelVersion:
    """Make ``version`` the current one (atomic pointer swap) and record it in the history.

    Raises:
        RegistryError: if the version does not exist.
    """
    mv = get_version(registry_dir, name, version)
    root = _model_dir(registry_dir, name)
    _atomic_write_text(root / CURRENT_FILE, version + "\n")
    with (root / HISTORY_FILE).open("a") as fh:
        fh.write(f"{datetime.now(UTC).isoformat()} {version}\n")
    logger.info("promoted %s %s", name, version)
    return mv


def rollback(registry_dir: Path, name: str) -> ModelVersion:
    """Re-promote the version that was current before the current one.

    The history is a stack of promotions: rolling back pops the current promotion (and every
    repeated promotion of the same version) and promotes what was below it; the rollback itself
    is appended to the history file as a promotion line prefixed with ``rollback``.

    Raises:
        RegistryError: if there is no earlier promoted version.
    """
    root = _model_dir(registry_dir, name)
    current = current_version(registry_dir, name)
    stack = _effective_stack(root)
    while stack and stack[-1] == current:
        stack.pop()
    if not stack:
        raise RegistryError(f"model {name}: no earlier promoted version to roll back to")
    target = stack[-1]
    mv = get_version(registry_dir, name, target)
    _atomic_write_text(root / CURRENT_FILE, target + "\n")
    with (root / HISTORY_FILE).open("a") as fh:
        fh.write(f"{datetime.now(UTC).isoformat()} rollback {current} {target}\n")
    logger.warning("rolled back %s from %s to %s", name, current, target)
    return mv


def _effective_stack(root: Path) -> list[str]:
    """Replay HISTORY into the stack of promotions still in force."""
    path = root / HISTORY_FILE
    stack: list[str] = []
    if not path.is_file():
        return stack
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            stack.append(parts[1])
        elif len(parts) == 4 and parts[1] == "rollback":
            while stack and stack[-1] == parts[2]:
                stack.pop()
    return stack


def verify(mv: ModelVersion) -> bytes:
    """Read ``model.txt`` and check it against the recorded sha256.

    Returns:
        The verified bytes.

    Raises:
        ModelIntegrityError: on mismatch or a missing checksum.
    """
    data = mv.model_path.read_bytes()
    expected = mv.card.model_sha256 or ""
    actual = sha256_bytes(data)
    if actual != expected:
        raise ModelIntegrityError(mv.version, expected, actual)
    return data


def load_version(registry_dir: Path, name: str, version: str) -> LoadedModel:
    """Verify then load one version.

    The verified bytes are copied to a private temporary file that LightGBM then reads, so the
    file checked and the file loaded cannot differ (no check-then-swap race on ``model.txt``).

    Raises:
        RegistryError: if the version does not exist.
        ModelIntegrityError: if ``model.txt`` was altered.
    """
    mv = get_version(registry_dir, name, version)
    data = verify(mv)
    with tempfile.TemporaryDirectory(prefix="rtpipe-model-") as tmp:
        path = Path(tmp) / MODEL_FILE
        path.write_bytes(data)
        booster = lgb.Booster(model_file=str(path))
    features = tuple(mv.card.features or booster.feature_name())
    if list(booster.feature_name()) != list(features):
        raise RegistryError(
            f"model {name} {version}: booster features {booster.feature_name()} != metadata"
        )
    logger.info("loaded %s %s", name, version)
    return LoadedModel(name, version, booster, features, mv.card)


def load_current(registry_dir: Path, name: str) -> LoadedModel:
    """Verify and load the promoted version.

    Raises:
        RegistryError: if nothing was promoted.
        ModelIntegrityError: if ``model.txt`` was altered since registration.
    """
    version = current_version(registry_dir, name)
    if version is None:
        raise RegistryError(
            f"model {name} has no promoted version under {registry_dir}: train and promote one"
        )
    return load_version(registry_dir, name, version)


# --- lifecycle: shadow marker and the log of every step ---------------------------------------
SHADOW_FILE = "SHADOW"
EVENTS_FILE = "EVENTS"


def shadow_version(registry_dir: Path, name: str) -> str | None:
    """The version marked to be scored as shadow beside the promoted one, or None."""
    path = _model_dir(registry_dir, name) / SHADOW_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text:
        return None
    version_number(text)
    return text


def set_shadow(registry_dir: Path, name: str, version: str | None) -> None:
    """Mark ``version`` as the shadow (the prediction stage scores it on every batch, logged
    on each prediction, never routed), or clear the marker with None.

    Raises:
        RegistryError: if the version does not exist.
    """
    root = _model_dir(registry_dir, name)
    if version is None:
        (root / SHADOW_FILE).unlink(missing_ok=True)
        logger.info("%s: shadow cleared", name)
        return
    get_version(registry_dir, name, version)
    _atomic_write_text(root / SHADOW_FILE, version + "\n")
    logger.info("%s: %s is the shadow", name, version)


def record_event(
    registry_dir: Path, name: str, step: str, version: str | None = None, **details: Any
) -> dict[str, Any]:
    """Append one lifecycle step (``requested``, ``candidate``, ``shadow``, ``gate``,
    ``promoted``, ``rejected``...) to the model's ``EVENTS`` log (JSON lines, append-only).

    Returns:
        The event as written.
    """
    root = _model_dir(registry_dir, name)
    root.mkdir(parents=True, exist_ok=True)
    event = {"at": datetime.now(UTC).isoformat(), "step": step, "version": version, **details}
    line = json.dumps(event, sort_keys=True, default=str)
    with (root / EVENTS_FILE).open("a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return event


def events(registry_dir: Path, name: str) -> list[dict[str, Any]]:
    """Every recorded lifecycle step, oldest first (a torn last line is skipped)."""
    path = _model_dir(registry_dir, name) / EVENTS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
