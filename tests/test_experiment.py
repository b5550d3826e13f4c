"""The experiment notebook, run by papermill on real BUSI images with tiny parameters."""
import csv
import json
import math
from pathlib import Path

import papermill
import pytest

REPO = Path(__file__).resolve().parents[1]
BOUNDS = {"accuracy": (0, 1), "f1": (0, 1), "ari": (-1, 1), "nmi": (0, 1), "silhouette": (-1, 1), "noise_fraction": (0, 1)}


def check_range(name, value):
    low, high = BOUNDS[name]
    assert value is None or (not math.isnan(value) and low <= value <= high), f"{name}={value} outside [{low}, {high}]"


@pytest.mark.slow
def test_crossval_notebook_on_busi(tmp_path, busi_dir, weights_file):
    out = tmp_path / "run"
    papermill.execute_notebook(
        str(REPO / "nbs" / "experiments" / "crossval.ipynb"), str(tmp_path / "executed.ipynb"), kernel_name="python3",
        progress_bar=False, cwd=str(tmp_path),
        parameters={"data_dir": str(busi_dir), "per_class": 24, "folds": 2, "phase1_epochs": 1, "phase2_epochs": 1,
                    "weights_path": str(weights_file), "bank_views": 2, "k_max": 5, "hdbscan_min_cluster_size": 5,
                    "output_dir": str(out), "cache_dir": str(tmp_path / "cache"), "device": "cpu"})

    expected = {"config.json", "fold_assignments.csv", "kmeans_folds.csv", "kmeans_folds.md", "hdbscan_folds.csv",
                "hdbscan_folds.md", "summary.json", "images.csv", "silhouette.png", "tsne_truth.png", "tsne_kmeans.png",
                "tsne_hdbscan.png", "training.png"}
    assert expected <= {p.name for p in out.iterdir()}

    for method in ("kmeans", "hdbscan"):
        with open(out / f"{method}_folds.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [row["fold"] for row in rows] == ["0", "1"]
        for row in rows:
            for name in BOUNDS:
                check_range(name, float(row[name]) if row[name] not in ("", "None") else None)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 48
    assert summary["per_class"] == {"benign": 24, "malignant": 24}
    assert summary["skipped_images"] == 0
    for method in ("kmeans", "hdbscan"):
        for name in BOUNDS:
            check_range(name, summary[method][name]["mean"])

    with open(out / "images.csv", newline="") as f:
        images = list(csv.DictReader(f))
    assert len(images) == 48
    assert {row["label"] for row in images} == {"benign", "malignant"}
    assert all(row["path"].startswith(("benign/", "malignant/")) for row in images)
    assert {row["fold"] for row in images} == {"0", "1"}
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["folds"] == 2
    assert config["versions"]["torch"]

    # Every score in the fold tables can be recomputed from the per-image table.
    from bcembed.metrics import clustering_scores
    for method in ("kmeans", "hdbscan"):
        with open(out / f"{method}_folds.csv", newline="") as f:
            table = {row["fold"]: row for row in csv.DictReader(f)}
        for fold in ("0", "1"):
            part = [row for row in images if row["fold"] == fold]
            scores = clustering_scores([row["label"] for row in part], [int(row[f"{method}_cluster"]) for row in part])
            for name in ("accuracy", "f1", "ari", "nmi"):
                assert math.isclose(scores[name], float(table[fold][name]), abs_tol=1e-9), (method, fold, name)


def test_notebook_parameters_cover_config():
    import dataclasses

    import papermill.inspection

    from bcembed.core import Config
    parameters = set(papermill.inspection.inspect_notebook(str(REPO / "nbs" / "experiments" / "crossval.ipynb")))
    fields = {f.name for f in dataclasses.fields(Config)}
    assert fields - parameters == set(), f"Config fields missing from the notebook's parameters: {fields - parameters}"
