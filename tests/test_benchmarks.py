"""Tests of the benchmark scripts on small phantom runs with the ImageNet weights, against known values."""
import json
import subprocess
import sys

import pytest

from bcembed.core import Config
from bcembed.crossval import run_crossval
from bcembed.data import write_phantom_folder
from conftest import REPO, WEIGHTS, require


@pytest.fixture(scope="module")
def phantom_runs(tmp_path_factory):
    "Two finished phantom runs on the same folds (different margins) and one on other folds (another seed)."
    # Random weights embed every phantom almost alike, so rounding alone could move a point between clusters.
    weights = require(WEIGHTS, "MobileNetV3-Small ImageNet weights")
    tmp = tmp_path_factory.mktemp("runs")
    data_dir = write_phantom_folder(tmp / "phantoms", n_per_class=16, size=64, seed=0)
    base = dict(data_dir=str(data_dir), cache_dir=str(tmp / "cache"), weights_path=str(weights), image_size=64, folds=2,
                phase1_epochs=1, phase2_epochs=1, batch_size=8, bank_views=2, k_max=3, pca_components=4,
                hdbscan_min_cluster_size=4, device="cpu")
    runs = {}
    for name, changes in {"a": {}, "b": {"margin": 0.3}, "other_folds": {"seed": 1}}.items():
        cfg = Config(**base, **changes, output_dir=str(tmp / name))
        runs[name] = (cfg.output_dir, run_crossval(cfg, progress=False))
    return runs


def combine(*args):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "combine_runs.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_combine_runs_reproduces_each_run_and_averages(phantom_runs, tmp_path):
    (a, summary_a), (b, summary_b) = phantom_runs["a"], phantom_runs["b"]
    result = combine(a, b, a, "--json", tmp_path / "table.json")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "table.json").read_text())
    assert len(rows) == 7  # every non-empty combination of the three runs given
    table = {tuple(row["runs"]): row["kmeans_accuracy_mean"] for row in rows}
    # One run alone is clustered as the run itself clustered it.
    assert table[(a,)] == pytest.approx(summary_a["kmeans"]["accuracy"]["mean"], abs=1e-4)
    assert table[(b,)] == pytest.approx(summary_b["kmeans"]["accuracy"]["mean"], abs=1e-4)
    # A run averaged with itself gives the same unit embeddings, so the same clusters.
    assert table[(a, a)] == table[(a,)]


def test_combine_runs_refuses_other_folds(phantom_runs):
    result = combine(phantom_runs["a"][0], phantom_runs["other_folds"][0])
    assert result.returncode != 0
    assert "held-out images or folds differ" in result.stderr
