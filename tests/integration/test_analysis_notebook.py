"""The analysts' notebook (``training/analysis.ipynb``) runs end to end on a small simulated data
set: its own feature repo copy and offline store, point-in-time joins, plots, LightGBM against a
baseline, a candidate registered and not promoted. Executed with papermill in a real kernel; the
offline store is Parquet, so the test needs neither Kafka nor Redis."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import papermill

from training import registry

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "training" / "analysis.ipynb"


def test_analysis_notebook_registers_a_candidate(tmp_path: Path) -> None:
    work = tmp_path / "work"
    t0 = time.perf_counter()
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / "executed.ipynb"),
        parameters={
            "workdir": str(work),
            "n_customers": 100,
            "n_terminals": 200,
            "nb_days": 49,
            "seed": 3,
            "train_start": "2018-04-29",
        },
        cwd=str(REPO),
        kernel_name="python3",
        progress_bar=False,
        execution_timeout=120,
    )
    elapsed = time.perf_counter() - t0
    outcome = json.loads((work / "outcome.json").read_text())

    assert outcome["train_rows"] > 500 and outcome["test_rows"] > 500
    for plot in outcome["plots"]:
        data = Path(plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, plot
    assert set(outcome["average_precision"]) == {"lightgbm", "logistic_regression"}
    assert all(0 < ap <= 1 for ap in outcome["average_precision"].values())

    registry_dir = Path(outcome["registry_dir"])
    assert registry_dir.is_relative_to(work)
    versions = registry.list_versions(registry_dir, "fraud")
    assert [v.version for v in versions] == [outcome["candidate"]] == ["v0001"]
    # A candidate: registered with what serving and drift need, but not promoted.
    assert registry.current_version(registry_dir, "fraud") is None
    meta = versions[0].metadata
    assert meta["feature_service"] == "fraud_model_v1" and meta["reference"]["features"]
    # 49 days hold the folds of 7 and of 14 days of history before 2018-05-06 (28 would start
    # before the data): both were cross-validated on the store's features, and the model was
    # fitted on the length they chose, ending with the training window.
    history = meta["tuning"]["history"]
    assert [t["days"] for t in history["trials"]] == [7, 14]
    chosen = max(history["trials"], key=lambda t: t["validation_ap"])
    assert history["days"] == chosen["days"]
    fit_start = pd.Timestamp("2018-05-06") - pd.Timedelta(days=history["days"])
    assert meta["fit_window"] == {"start": str(fit_start.date()), "end_inclusive": "2018-05-05"}
    assert meta["training_window"] == {"start": "2018-04-29", "end_inclusive": "2018-05-05"}
    loaded = registry.load_version(registry_dir, "fraud", "v0001")
    assert loaded.booster.num_trees() > 0
    print(f"notebook executed in {elapsed:.1f} s")
