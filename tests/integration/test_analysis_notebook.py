"""The analysts' notebook (``training/analysis.ipynb``) runs end to end on a small simulated data
set: its own feature repo copy and offline store, point-in-time joins, plots, LightGBM against a
baseline, a candidate registered and not promoted. Executed with papermill in a real kernel; the
offline store is Parquet, so the test needs neither Kafka nor Redis."""

from __future__ import annotations

import json
import time
from pathlib import Path

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
            "nb_days": 42,
            "seed": 3,
            "train_start": "2018-04-22",
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
    loaded = registry.load_version(registry_dir, "fraud", "v0001")
    assert loaded.booster.num_trees() > 0
    print(f"notebook executed in {elapsed:.1f} s")
