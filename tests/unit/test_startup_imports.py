"""Start-up shortcuts of the stage processes: LightGBM without scikit-learn in the prediction
stage (its preload in the stage table), and the customer app's prompt topic admin."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import textwrap

import pytest
from confluent_kafka import KafkaError, KafkaException
from quixstreams.models.topics.exceptions import CreateTopicFailure, CreateTopicTimeout

from stages.enrichment.topics import PromptTopicAdmin, creation_failures


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter (this one has imported LightGBM and scikit-learn)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_lightgbm_without_sklearn_serves_and_leaves_sklearn_importable() -> None:
    out = _python(
        """
        import sys
        import numpy as np
        from stages.shared.lgbm import import_lightgbm_without_sklearn

        lgb = import_lightgbm_without_sklearn()
        assert "sklearn" not in sys.modules, sorted(m for m in sys.modules if "sklearn" in m)
        assert not lgb.compat.SKLEARN_INSTALLED
        rng = np.random.default_rng(0)
        X = rng.normal(size=(400, 3))
        y = (X[:, 0] + 0.3 * rng.normal(size=400) > 0).astype(int)
        booster = lgb.train({"objective": "binary", "verbose": -1}, lgb.Dataset(X, y), 20)
        served = lgb.Booster(model_str=booster.model_to_string())
        p = served.predict(X)
        assert p.shape == (400,) and ((p > 0.5) == y).mean() > 0.9
        import sklearn.metrics  # the process can still import it

        print(round(float(sklearn.metrics.roc_auc_score(y, p)), 2))
        """
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) > 0.9


def test_lightgbm_import_is_left_alone_once_sklearn_is_there() -> None:
    out = _python(
        """
        import sklearn.base
        from stages.shared.lgbm import import_lightgbm_without_sklearn

        lgb = import_lightgbm_without_sklearn()
        print(lgb.compat.SKLEARN_INSTALLED)
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_the_prediction_stage_is_loaded_after_its_lightgbm_preload() -> None:
    """``rtpipe run prediction`` loads its runner through the stage table, whose preload
    imports LightGBM first, without scikit-learn; the other stages have no preload."""
    out = _python(
        """
        import sys
        from stages.shared.topology import STAGE_TABLE

        runner = STAGE_TABLE["prediction"].load()
        import lightgbm

        assert callable(runner)
        assert "sklearn" not in sys.modules, sorted(m for m in sys.modules if "sklearn" in m)
        print(lightgbm.compat.SKLEARN_INSTALLED)
        print([n for n, spec in STAGE_TABLE.items() if spec.preload is not None])
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "['prediction']"]


def _done(result: BaseException | None = None) -> concurrent.futures.Future[None]:
    future: concurrent.futures.Future[None] = concurrent.futures.Future()
    if result is None:
        future.set_result(None)
    else:
        future.set_exception(result)
    return future


def _kafka_error(code: int, text: str) -> KafkaException:
    return KafkaException(KafkaError(code, text))


def test_creation_failures_treat_answers_as_quixstreams_does() -> None:
    futures = {
        "made": _done(),
        "there": _done(_kafka_error(KafkaError.TOPIC_ALREADY_EXISTS, "exists")),
        "denied": _done(_kafka_error(KafkaError.TOPIC_AUTHORIZATION_FAILED, "denied")),
        "bad": _done(_kafka_error(KafkaError.INVALID_PARTITIONS, "no partitions")),
        "odd": _done(ValueError("odd answer")),
        "waiting": concurrent.futures.Future(),
    }
    failures = creation_failures(futures)
    assert set(failures) == {"denied", "bad", "odd"}
    assert "Create" in failures["denied"] and "credentials" in failures["denied"]
    assert failures["bad"] == "no partitions"
    assert failures["odd"] == "odd answer"


def _admin() -> PromptTopicAdmin:
    # No connection is made until the admin client is used.
    return PromptTopicAdmin(broker_address="127.0.0.1:1")


def test_prompt_admin_returns_as_soon_as_every_topic_is_answered() -> None:
    futures = {"a": _done(), "b": _done(_kafka_error(KafkaError.TOPIC_ALREADY_EXISTS, "x"))}
    _admin()._finalize_create(futures, finalize_timeout=30)  # no error


def test_prompt_admin_raises_quixstreams_errors() -> None:
    with pytest.raises(CreateTopicFailure, match="no partitions"):
        _admin()._finalize_create(
            {"bad": _done(_kafka_error(KafkaError.INVALID_PARTITIONS, "no partitions"))}
        )
    with pytest.raises(CreateTopicTimeout, match="slow"):
        _admin()._finalize_create({"slow": concurrent.futures.Future()}, finalize_timeout=0.05)
