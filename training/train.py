"""Train, evaluate, register and promote the fraud model (SIMULATOR.md's evaluation protocol).

Windows, for ``train_start`` = day ``s``: training ``[s, s + train_days)``, then a gap of
``delay_days`` (labels of the last training days are only known by then), then the test window
``[s + train_days + delay_days, ... + test_days)``. Early stopping uses the last
``validation_days`` of the *training* window; the test window is only ever scored, after the
model is final. The final model is refitted on the whole training window with the number of
rounds chosen by early stopping.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightgbm as lgb
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from stages.shared.schemas import MODEL_FEATURES
from training import registry
from training.dataset import Dataset, build_datasets, utc_day
from training.evaluate import Metrics, evaluate
from training.simulate import read_dataset

if TYPE_CHECKING:
    from feast import FeatureStore

    from stages.shared.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_child_samples": 50,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "metric": "average_precision",
    "verbose": -1,
    "seed": 0,
    "deterministic": True,
    "num_threads": 2,
}
MAX_ROUNDS = 2000
EARLY_STOPPING_ROUNDS = 100
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
HISTOGRAM_BINS = 10
REPORT_FILE = "report.md"


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What one training run produced."""

    version: str
    model_dir: Path
    metrics: Metrics
    best_iteration: int
    train_window: tuple[str, str]
    test_window: tuple[str, str]
    report_path: Path
    predictions_path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def distribution(values: np.ndarray) -> dict[str, Any]:
    """Summary of a training distribution for later drift checks (PSI, quantile shift).

    Returns:
        ``quantiles`` (at ``QUANTILES``), ``histogram`` (``edges`` = unique deciles, open-ended
        outer bins, and the ``fractions`` of training rows per bin), ``mean``, ``std`` and
        ``null_fraction``.
    """
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return {"quantiles": {}, "histogram": {"edges": [], "fractions": []}, "null_fraction": 1.0}
    q = np.quantile(finite, QUANTILES)
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, HISTOGRAM_BINS + 1))[1:-1])
    counts = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=edges.size + 1)
    return {
        "quantiles": {f"{p:g}": float(x) for p, x in zip(QUANTILES, q, strict=True)},
        "histogram": {
            "edges": edges.tolist(),
            "fractions": (counts / finite.size).tolist(),
        },
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "null_fraction": float(1 - finite.size / v.size),
    }


def fingerprint(ds: Dataset) -> str:
    """sha256 over the training rows (ids, features, labels): identifies the exact data used."""
    h = hashlib.sha256()
    for frame in (ds.ids.drop(columns="tx_datetime"), ds.X, ds.y.to_frame()):
        h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    h.update(ds.ids["tx_datetime"].astype("int64").to_numpy().tobytes())
    return h.hexdigest()


def _tqdm_callback(bar: tqdm) -> Any:
    def callback(env: lgb.callback.CallbackEnv) -> None:
        bar.update(1)

    return callback


def fit(
    train: Dataset,
    validation_days: int = 2,
    params: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[lgb.Booster, int]:
    """Early-stop on the last ``validation_days`` of ``train``, then refit on all of it.

    Returns:
        The final booster and the number of boosting rounds it has.
    """
    params = {**DEFAULT_PARAMS, **(params or {})}
    cut = train.end - pd.Timedelta(days=validation_days)
    fit_part, val_part = train.slice_time(train.start, cut), train.slice_time(cut, train.end)
    if len(fit_part) == 0 or val_part.y.sum() == 0:
        raise ValueError("validation split needs training rows and at least one fraud after it")
    features = list(MODEL_FEATURES)
    dtrain = lgb.Dataset(fit_part.X, fit_part.y, feature_name=features, free_raw_data=False)
    dval = lgb.Dataset(val_part.X, val_part.y, reference=dtrain, free_raw_data=False)
    with tqdm(total=MAX_ROUNDS, desc="boosting (early stopping)", disable=not progress) as bar:
        booster = lgb.train(
            params,
            dtrain,
            num_boost_round=MAX_ROUNDS,
            valid_sets=[dval],
            valid_names=["validation"],
            callbacks=[
                lgb.early_stopping(EARLY_STOPPING_ROUNDS, verbose=False),
                _tqdm_callback(bar),
            ],
        )
    best = max(1, booster.best_iteration)
    logger.info(
        "early stopping: best iteration %d, validation AP %.4f",
        best,
        booster.best_score["validation"]["average_precision"],
    )
    dall = lgb.Dataset(train.X, train.y, feature_name=features, free_raw_data=False)
    with tqdm(total=best, desc="boosting (refit)", disable=not progress) as bar:
        final = lgb.train(params, dall, num_boost_round=best, callbacks=[_tqdm_callback(bar)])
    return final, best


def render_report(meta: dict[str, Any], metrics: Metrics, importance: pd.Series) -> str:
    """Short Markdown report of a training run."""
    lines = [
        f"# {meta['name']} {meta['version']}",
        "",
        f"- feature service: `{meta['feature_service']}`",
        f"- training window: {meta['training_window']['start']} .. "
        f"{meta['training_window']['end_inclusive']} ({meta['n_train']} transactions, "
        f"{meta['n_train_frauds']} frauds)",
        f"- test window: {meta['test_window']['start']} .. {meta['test_window']['end_inclusive']}",
        f"- boosting rounds: {meta['best_iteration']} (early stopping on the last "
        f"{meta['validation_days']} training days)",
        f"- data fingerprint: `{meta['data_fingerprint'][:16]}`",
        "",
        "## Test metrics (known compromised cards removed)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| ROC AUC | {metrics.roc_auc:.4f} |",
        f"| average precision | {metrics.average_precision:.4f} |",
        f"| card precision@{metrics.k} | {metrics.card_precision_at_k:.4f} |",
        f"| test transactions | {metrics.n_transactions} |",
        f"| test frauds | {metrics.n_frauds} |",
        f"| rows removed (known compromised cards) | {metrics.n_removed_known_compromised} |",
        "",
        f"Card precision@{metrics.k} per test day: "
        + ", ".join(f"{d}: {v:.2f}" for d, v in metrics.card_precision_per_day.items()),
        "",
        "## Feature importance (gain)",
        "",
        "| feature | gain share |",
        "|---|---|",
        *(f"| {name} | {share:.3f} |" for name, share in importance.items()),
        "",
    ]
    return "\n".join(lines)


def train(
    settings: Settings,
    train_start: str | pd.Timestamp,
    train_days: int = 7,
    delay_days: int = 7,
    test_days: int = 7,
    predictions_out: Path | None = None,
    *,
    validation_days: int = 2,
    params: dict[str, Any] | None = None,
    store: FeatureStore | None = None,
    transactions: pd.DataFrame | None = None,
    promote: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Build the datasets through Feast, train, evaluate, register and (by default) promote.

    Args:
        settings: process settings (data, registry, feature service and model name).
        train_start: first training day (UTC), e.g. ``"2018-07-25"``.
        train_days: training window length in days.
        delay_days: gap between training and test (the label delay).
        test_days: test window length in days.
        predictions_out: if set, write the test predictions there (Parquet: transaction_id,
            customer_id, tx_datetime, is_fraud, score).
        validation_days: last training days used for early stopping.
        params: LightGBM parameters overriding :data:`DEFAULT_PARAMS`.
        store: an open feature store (default: ``open_feature_store(settings)``).
        transactions: the transactions (default: read from ``settings.data_dir``).
        promote: promote the new version to current.
        progress: show progress bars.

    Returns:
        The registered version, its metrics and where its files are.
    """
    if store is None:
        from stages.shared.feast_store import open_feature_store

        store = open_feature_store(settings)
    tx = transactions if transactions is not None else read_dataset(settings.data_dir)
    start = utc_day(train_start)
    test_start = start + pd.Timedelta(days=train_days + delay_days)
    service = settings.prediction.feature_service
    train_ds, test_ds = build_datasets(
        store, tx, [(start, train_days), (test_start, test_days)], service, progress=progress
    )
    logger.info(
        "train %d rows (%d frauds), test %d rows", len(train_ds), train_ds.y.sum(), len(test_ds)
    )

    booster, best = fit(train_ds, validation_days, params, progress)
    train_scores = booster.predict(train_ds.X.to_numpy(), num_threads=DEFAULT_PARAMS["num_threads"])
    test_scores = booster.predict(test_ds.X.to_numpy(), num_threads=DEFAULT_PARAMS["num_threads"])

    scored = test_ds.ids.assign(is_fraud=test_ds.y.to_numpy(), score=test_scores)
    history = tx.loc[
        (tx["tx_datetime"] >= start) & (tx["tx_datetime"] < test_ds.end),
        ["customer_id", "tx_datetime", "is_fraud"],
    ]
    metrics = evaluate(scored, history, start, train_ds.end, delay_days=delay_days)

    gain = pd.Series(booster.feature_importance("gain"), index=list(MODEL_FEATURES))
    importance = (gain / gain.sum() if gain.sum() > 0 else gain).sort_values(ascending=False)
    day = pd.Timedelta(days=1)
    meta: dict[str, Any] = {
        "feature_service": service,
        "features": list(MODEL_FEATURES),
        "training_window": {
            "start": start.date().isoformat(),
            "end_inclusive": (train_ds.end - day).date().isoformat(),
        },
        "test_window": {
            "start": test_start.date().isoformat(),
            "end_inclusive": (test_ds.end - day).date().isoformat(),
        },
        "delay_days": delay_days,
        "validation_days": validation_days,
        "best_iteration": best,
        "params": {**DEFAULT_PARAMS, **(params or {})},
        "metrics": metrics.to_dict(),
        "n_train": len(train_ds),
        "n_train_frauds": int(train_ds.y.sum()),
        "data_fingerprint": fingerprint(train_ds),
        "feature_importance_gain": {k: float(v) for k, v in importance.items()},
        "training_distribution": {
            "features": {n: distribution(train_ds.X[n].to_numpy()) for n in MODEL_FEATURES},
            "score": distribution(np.asarray(train_scores)),
        },
    }
    # The report names the version, which register() assigns; it is added to the version
    # folder right after (model.txt and metadata.json are already final and checksummed).
    mv = registry.register(
        settings.registry_dir, settings.prediction.model_name, booster.model_to_string(), meta
    )
    report = render_report(mv.metadata, metrics, importance)
    report_path = mv.path / REPORT_FILE
    report_path.write_text(report)
    if promote:
        registry.promote(settings.registry_dir, settings.prediction.model_name, mv.version)

    predictions_path = None
    if predictions_out is not None:
        predictions_path = Path(predictions_out)
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        scored[["transaction_id", "customer_id", "tx_datetime", "is_fraud", "score"]].to_parquet(
            predictions_path, index=False
        )
        logger.info("wrote %d test predictions to %s", len(scored), predictions_path)

    return TrainResult(
        version=mv.version,
        model_dir=mv.path,
        metrics=metrics,
        best_iteration=best,
        train_window=(meta["training_window"]["start"], meta["training_window"]["end_inclusive"]),
        test_window=(meta["test_window"]["start"], meta["test_window"]["end_inclusive"]),
        report_path=report_path,
        predictions_path=predictions_path,
        metadata=mv.metadata,
    )
