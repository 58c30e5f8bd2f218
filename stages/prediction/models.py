"""The model in use by the prediction stage: loaded from the registry, verified, hot-swapped
between batches when a new version is promoted; an optional shadow model beside it.

The shadow is ``RTPIPE_PREDICTION__SHADOW_VERSION`` when set (fixed for the process), else the
registry's shadow marker (``training.registry.set_shadow``, what the retrain job sets for its
candidate), polled with the promotion pointer and swapped between batches like it.

Each model is served with the feature service its metadata records (a v1 model with
``fraud_model_v1``, a v2 model with ``fraud_model_v2``; metadata without one means
``settings.prediction.feature_service``). A version whose service the online layout does not
have, or whose features that service does not serve, is refused when it is loaded (counted in
``model_load_failures`` and logged with the reason), never at scoring time. A shadow may use
another service than the promoted model (the stage reads the union); a canary may not: its
rows are routed and recorded with the promoted model's features and service, so a canary of
another service is refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np

from stages.shared.errors import RtpipeError
from stages.shared.metrics import Metrics
from stages.shared.settings import Settings
from training import registry

logger = logging.getLogger(__name__)


class NoModelError(RtpipeError, RuntimeError):
    """No verified model version could be loaded at start-up."""


class UnservableModelError(RtpipeError, ValueError):
    """A model version the stage cannot serve: its feature service is unknown to the online
    layout, or does not serve every feature the model takes, or (a canary) it differs from
    the promoted model's."""

    def __init__(self, version: str, feature_service: str, detail: str) -> None:
        super().__init__(f"model version {version} (feature service {feature_service}): {detail}")
        self.version = version
        self.feature_service = feature_service
        self.detail = detail


@dataclass(frozen=True)
class ServingModel:
    """A verified model version ready to score matrices in ``features`` order."""

    name: str
    version: str
    features: tuple[str, ...]
    feature_service: str
    booster: lgb.Booster

    @classmethod
    def from_loaded(cls, loaded: registry.LoadedModel, default_service: str) -> ServingModel:
        """A verified registry version as served: with the feature service its card
        records, ``default_service`` when it records none."""
        return cls(
            name=loaded.name,
            version=loaded.version,
            features=tuple(loaded.features),
            feature_service=loaded.card.feature_service or default_service,
            booster=loaded.booster,
        )

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """Fraud probability for each row (one LightGBM call for the whole batch)."""
        return np.asarray(self.booster.predict(matrix, num_threads=1), dtype=np.float64)


# Raises UnservableModelError for a model the stage cannot serve (see the module docstring).
ModelCheck = Callable[[ServingModel], None]


def _load(settings: Settings, version: str, check: ModelCheck | None = None) -> ServingModel:
    loaded = registry.load_version(settings.registry_dir, settings.prediction.model_name, version)
    model = ServingModel.from_loaded(loaded, settings.prediction.feature_service)
    if check is not None:
        check(model)
    return model


class ModelHolder:
    """Holds the current (and shadow) model; swaps only between batches."""

    def __init__(
        self, settings: Settings, metrics: Metrics, check: ModelCheck | None = None
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._check = check
        self._current: ServingModel | None = None
        self.shadow: ServingModel | None = None
        self.canary: ServingModel | None = None
        self._next_check = 0.0
        self._rejected: set[str] = set()

    @property
    def current(self) -> ServingModel:
        if self._current is None:
            raise NoModelError("no model loaded")
        return self._current

    def load_initial(self) -> None:
        """Load the promoted version; fail fast with a sentence if there is none."""
        name = self._settings.prediction.model_name
        version = registry.current_version(self._settings.registry_dir, name)
        if version is None:
            raise NoModelError(
                f"no promoted version of model {name!r} in {self._settings.registry_dir}: "
                "run `rtpipe train` first"
            )
        self._swap(version)
        if self._current is None:
            raise NoModelError(f"model {name!r} version {version} failed to load; see the log")
        self.shadow = self._optional(self._shadow_wanted(), "shadow")
        self.canary = self._optional(self._settings.prediction.canary_version, "canary")

    @property
    def serving(self) -> tuple[ServingModel, ...]:
        """The promoted model, then the shadow and the canary when loaded."""
        return tuple(m for m in (self.current, self.shadow, self.canary) if m is not None)

    def _same_service(self, model: ServingModel) -> None:
        current = self._current
        if current is not None and model.feature_service != current.feature_service:
            raise UnservableModelError(
                model.version,
                model.feature_service,
                f"a canary must use the promoted model's feature service "
                f"{current.feature_service} (its rows are recorded with it)",
            )

    def _optional(self, version: str | None, role: str) -> ServingModel | None:
        """Load a shadow or canary version; a failure is logged and counted, not fatal."""
        if not version:
            return None
        try:
            model = _load(self._settings, version, self._check)
            if role == "canary":
                self._same_service(model)
            return model
        except (registry.RegistryError, OSError, ValueError, lgb.basic.LightGBMError) as exc:
            self._metrics.model_load_failures.labels(
                self._settings.prediction.model_name, role
            ).inc()
            logger.error("%s model %s not loaded: %s", role, version, exc)
            return None

    def _shadow_wanted(self) -> str | None:
        """The configured shadow, else the registry's marker; never the promoted version."""
        fixed = self._settings.prediction.shadow_version
        if fixed:
            return fixed
        try:
            marked = registry.shadow_version(
                self._settings.registry_dir, self._settings.prediction.model_name
            )
        except (ValueError, OSError) as exc:
            logger.warning("registry shadow marker unreadable: %s", exc)
            return self.shadow.version if self.shadow else None
        if self._current is not None and marked == self._current.version:
            return None
        return marked

    def _reload_shadow(self) -> None:
        wanted = self._shadow_wanted()
        have = self.shadow.version if self.shadow else None
        if wanted == have or (wanted is not None and wanted in self._rejected):
            return
        if wanted is None:
            logger.info("shadow model %s dropped", have)
            self.shadow = None
            return
        self.shadow = self._optional(wanted, "shadow")
        if self.shadow is None:
            self._rejected.add(wanted)
        else:
            logger.info("shadow model now %s (was %s)", wanted, have)

    def maybe_reload(self) -> None:
        """Poll the registry (at most every ``reload_interval_s``) and swap if promoted; the
        shadow follows the registry's marker."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self._settings.prediction.reload_interval_s
        version = registry.current_version(
            self._settings.registry_dir, self._settings.prediction.model_name
        )
        changed = self._current is None or version != self._current.version
        if version and changed and version not in self._rejected:
            self._swap(version)
        self._reload_shadow()

    def _swap(self, version: str) -> None:
        name = self._settings.prediction.model_name
        try:
            model = _load(self._settings, version, self._check)
        except registry.ModelIntegrityError as exc:
            self._reject(version, "integrity", exc)
            return
        # RegistryError: CURRENT names a missing version, or the booster's features differ
        # from the metadata; either way the stage keeps serving the model it has.
        except (registry.RegistryError, OSError, ValueError, lgb.basic.LightGBMError) as exc:
            self._reject(version, "load", exc)
            return
        old = self._current
        self._current = model
        if self.canary is not None and self.canary.feature_service != model.feature_service:
            self._metrics.model_load_failures.labels(name, "canary").inc()
            logger.error(
                "canary model %s dropped: its feature service %s is not the promoted %s's %s",
                self.canary.version,
                self.canary.feature_service,
                model.version,
                model.feature_service,
            )
            self.canary = None
        if old is not None:
            self._metrics.model_info.labels(name, old.version, old.feature_service).set(0)
        self._metrics.model_info.labels(name, model.version, model.feature_service).set(1)
        logger.info(
            "model %s now serving version %s (was %s)",
            name,
            model.version,
            old.version if old else None,
        )

    def _reject(self, version: str, reason: str, exc: Exception) -> None:
        name = self._settings.prediction.model_name
        self._rejected.add(version)
        self._metrics.model_load_failures.labels(name, reason).inc()
        logger.error(
            "model %s version %s rejected (%s): %s; keeping %s",
            name,
            version,
            reason,
            exc,
            self._current.version if self._current else None,
        )
