"""The model card: a registry version's ``metadata.json``, typed and validated.

The file is one flat JSON object. ``training/train.py`` writes the training keys (feature
service and features, windows, rounds, parameters, tuning, metrics, counts, fingerprint,
importance, drift reference); :func:`training.registry.register` adds ``name``, ``version``,
``created_at`` and ``model_sha256``. Only the keys ``register`` always sets are required:
models registered outside training (the sandbox's tiny models, tests) record a few keys, and
each reader falls back where one is absent (the booster's own feature names, the settings'
feature service, the reference protocol's window), as it did when it read the dict.

:meth:`ModelCard.from_dict` checks every known key's type (a JSON ``null`` counts as absent);
:meth:`ModelCard.to_dict` writes the same layout back. Keys the card does not know (early
versions' ``validation_days``, whatever a caller adds) are kept in :attr:`ModelCard.extra`,
so reading and rewriting a version loses nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, NamedTuple

from training.errors import ModelCardError


@dataclass(frozen=True, slots=True)
class Window:
    """Whole UTC days, both ends included (``{"start": ..., "end_inclusive": ...}``)."""

    start: date
    end_inclusive: date

    def __post_init__(self) -> None:
        if self.end_inclusive < self.start:
            raise ValueError(f"window ends ({self.end_inclusive}) before it starts ({self.start})")

    @property
    def end(self) -> date:
        """The first day after the window."""
        return self.end_inclusive + timedelta(days=1)

    def __str__(self) -> str:
        return f"{self.start} .. {self.end_inclusive}"

    def to_dict(self) -> dict[str, str]:
        """The JSON layout: ISO dates."""
        return {"start": self.start.isoformat(), "end_inclusive": self.end_inclusive.isoformat()}


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What the registry records about one model version.

    ``None`` means the key is absent from ``metadata.json``. Mapping fields hold the JSON
    objects as written (read them, do not change them).
    """

    name: str
    version: str
    created_at: datetime
    model_sha256: str | None = None
    model_format: str | None = None
    feature_service: str | None = None
    features: tuple[str, ...] | None = None
    training_window: Window | None = None
    # The rows fitted: the history the folds chose, ending with the training window (absent
    # on versions registered before the choice existed: the training window).
    fit_window: Window | None = None
    test_window: Window | None = None
    delay_days: int | None = None
    best_iteration: int | None = None
    n_train: int | None = None
    n_train_frauds: int | None = None
    data_fingerprint: str | None = None
    monotone_increasing: tuple[str, ...] | None = None
    params: Mapping[str, Any] | None = None
    lightgbm_params: Mapping[str, Any] | None = None
    tuning: Mapping[str, Any] | None = None
    metrics: Mapping[str, Any] | None = None
    model_metrics: Mapping[str, Any] | None = None
    # training.uncertainty.Uncertainty.to_dict(): bootstrap intervals and the CP ceiling.
    uncertainty: Mapping[str, Any] | None = None
    feature_importance_gain: Mapping[str, Any] | None = None
    # The drift reference (training.reference); early versions called it training_distribution.
    reference: Mapping[str, Any] | None = None
    training_distribution: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def wider_fit_window(self) -> Window | None:
        """The rows fitted when they are more than the training window (None otherwise)."""
        if self.fit_window is None or self.fit_window == self.training_window:
            return None
        return self.fit_window

    def __post_init__(self) -> None:
        if known := sorted(set(self.extra) & set(_KINDS)):
            raise ValueError(f"extra keys {known} are card fields")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], version: str | None = None) -> ModelCard:
        """Read a version's metadata.

        Args:
            data: the parsed ``metadata.json``.
            version: the version named in errors (default: the one ``data`` records).

        Raises:
            ModelCardError: a required key is missing, or a key has the wrong type.
        """
        where = version or str(data.get("version") or "?")
        values: dict[str, Any] = {}
        for key, kind in _KINDS.items():
            raw = data.get(key)
            if raw is None:
                if key in _REQUIRED:
                    raise ModelCardError(where, key, "is missing")
                continue
            try:
                values[key] = kind.parse(raw)
            except (TypeError, ValueError) as exc:
                raise ModelCardError(where, key, str(exc)) from None
        extra = {k: v for k, v in data.items() if k not in _KINDS}
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The ``metadata.json`` layout (JSON-ready), unknown keys included."""
        out = dict(self.extra)
        for key, kind in _KINDS.items():
            value = getattr(self, key)
            if value is not None:
                out[key] = kind.dump(value)
        return out


class _Kind(NamedTuple):
    """How one key is read from JSON (raising TypeError/ValueError) and written back."""

    parse: Callable[[Any], Any]
    dump: Callable[[Any], Any]


def _expect(value: Any, types: type | tuple[type, ...], what: str) -> None:
    if not isinstance(value, types) or isinstance(value, bool):
        raise TypeError(f"must be {what}, not {type(value).__name__}")


def _text(value: Any) -> str:
    _expect(value, str, "a string")
    return str(value)


def _integer(value: Any) -> int:
    _expect(value, int, "an integer")
    return int(value)


def _strings(value: Any) -> tuple[str, ...]:
    _expect(value, list, "a list of strings")
    if not all(isinstance(v, str) for v in value):
        raise TypeError("must be a list of strings")
    return tuple(value)


def _mapping(value: Any) -> dict[str, Any]:
    _expect(value, Mapping, "an object")
    return dict(value)


def _timestamp(value: Any) -> datetime:
    _expect(value, str, "an ISO timestamp")
    return datetime.fromisoformat(value)


def _window(value: Any) -> Window:
    _expect(value, Mapping, 'an object {"start": ..., "end_inclusive": ...}')
    if set(value) != {"start", "end_inclusive"}:
        raise ValueError(f"must have exactly start and end_inclusive, has {sorted(value)}")
    start, end = (value[k] for k in ("start", "end_inclusive"))
    if not isinstance(start, str) or not isinstance(end, str):
        raise TypeError("must hold ISO dates")
    return Window(date.fromisoformat(start), date.fromisoformat(end))


def _same(value: Any) -> Any:
    return value


_TEXT = _Kind(_text, _same)
_INTEGER = _Kind(_integer, _same)
_STRINGS = _Kind(_strings, list)
_MAPPING = _Kind(_mapping, dict)
_TIMESTAMP = _Kind(_timestamp, datetime.isoformat)
_WINDOW = _Kind(_window, Window.to_dict)

# Every ModelCard field but extra, in field order; the registry sets the required ones.
_KINDS: dict[str, _Kind] = {
    "name": _TEXT,
    "version": _TEXT,
    "created_at": _TIMESTAMP,
    "model_sha256": _TEXT,
    "model_format": _TEXT,
    "feature_service": _TEXT,
    "features": _STRINGS,
    "training_window": _WINDOW,
    "fit_window": _WINDOW,
    "test_window": _WINDOW,
    "delay_days": _INTEGER,
    "best_iteration": _INTEGER,
    "n_train": _INTEGER,
    "n_train_frauds": _INTEGER,
    "data_fingerprint": _TEXT,
    "monotone_increasing": _STRINGS,
    "params": _MAPPING,
    "lightgbm_params": _MAPPING,
    "tuning": _MAPPING,
    "metrics": _MAPPING,
    "model_metrics": _MAPPING,
    "uncertainty": _MAPPING,
    "feature_importance_gain": _MAPPING,
    "reference": _MAPPING,
    "training_distribution": _MAPPING,
}
_REQUIRED = frozenset({"name", "version", "created_at"})
