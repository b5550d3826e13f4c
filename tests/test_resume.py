"""A cross-validation run killed after its first fold resumes there and ends with the tables of an uninterrupted run.

Three runs of the same configuration on 16 real BUSI images per class (plus four unreadable files) run in
subprocesses: one to the end, one killed with SIGKILL as soon as fold 0 is written, and one that resumes the
killed run. Each run has its own cache folder, so the resumed run reads only what the killed one left. The
tests skip when ../shared/data/busi or the ImageNet weights are absent.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bcembed.core import Config
from bcembed.crossval import prepare_data
from bcembed.model import EmbeddingNet
from bcembed.training import embed

from conftest import DATA, REPO, WEIGHTS, require

# The figures' t-SNE runs with one OpenMP thread: on a busy 2-core machine its many tiny parallel steps took 20-90 s
# per run instead of under a second. The figures are not compared, so this changes no tested output.
RUN = """
import json, logging, sys
from threadpoolctl import threadpool_limits
import bcembed.crossval as crossval
from bcembed.core import Config, setup_logging

tsne_map = crossval.tsne_map
def tsne_one_thread(*args, **kwargs):
    with threadpool_limits(1, user_api="openmp"):
        return tsne_map(*args, **kwargs)
crossval.tsne_map = tsne_one_thread

setup_logging(logging.INFO)
crossval.run_crossval(Config.from_dict(json.loads(sys.argv[1])), progress=False)
"""
TABLES = ("kmeans_folds.csv", "hdbscan_folds.csv", "images.csv", "fold_assignments.csv", "kmeans_folds.md", "hdbscan_folds.md")
TIMINGS = ("wall_seconds_this_session", "fold_seconds")  # the only summary entries that may differ between runs
FOLDS = 3


def write_data(busi: Path, root: Path) -> Path:
    "Link 16 real BUSI images per class into `root` (one under a non-ASCII name) and add two unreadable files per class."
    for name in ("benign", "malignant"):
        (root / name).mkdir(parents=True)
        for number in range(1, 17):
            link = f"{name} ({number}).png" if number < 16 else f"{name} ({number}) échographie.png"
            (root / name / link).symlink_to(busi / name / f"{name} ({number}).png")
    png = (busi / "benign" / "benign (1).png").read_bytes()
    (root / "benign" / "benign (901).png").write_bytes(png[:len(png) // 2])
    (root / "benign" / "benign (902).png").write_bytes(b"")
    (root / "malignant" / "malignant (901).png").write_text("not an image")
    (root / "malignant" / "malignant (902).png").write_bytes(png[:16] + bytes([png[16] ^ 0xFF]) + png[17:])
    return root


def run_config(root: Path, data: Path, name: str) -> Config:
    return Config(data_dir=str(data), output_dir=str(root / name / "run"), cache_dir=str(root / name / "cache"),
                  weights="imagenet", weights_path=str(WEIGHTS), image_size=64, folds=FOLDS, phase1_epochs=1,
                  phase2_epochs=1, batch_size=8, bank_views=2, k_max=4, pca_components=4, hdbscan_min_cluster_size=3,
                  hdbscan_min_samples=1, device="cpu", seed=3)


def start(cfg: Config, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN, json.dumps(cfg.to_dict())], cwd=REPO,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    process.wait(timeout)
    text = log.read_text(errors="replace")
    assert process.returncode == 0, f"run failed with exit code {process.returncode}:\n{text[-4000:]}"
    return text


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    busi = require(DATA / "busi", "BUSI images")
    require(WEIGHTS, "MobileNetV3-Small ImageNet weights")
    root = tmp_path_factory.mktemp("resume")
    data = write_data(busi, root / "data")

    reference = run_config(root, data, "reference")
    finish(start(reference, root / "reference.log"), root / "reference.log")

    interrupted = run_config(root, data, "interrupted")
    out = Path(interrupted.output_dir)
    process = start(interrupted, root / "killed.log")
    deadline = time.monotonic() + 600
    while not (out / "folds" / "fold_00.json").exists():
        assert process.poll() is None, f"the run ended before fold 0:\n{(root / 'killed.log').read_text()[-4000:]}"
        assert time.monotonic() < deadline, "fold 0 was not written within 600 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(60)
    at_kill = {"returncode": process.returncode, "files": sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))}
    fold_0 = {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns)
              for name in ("folds/fold_00.json", "folds/fold_00.npz", "models/fold_00.pt")}

    resumed_log = finish(start(interrupted, root / "resumed.log"), root / "resumed.log")
    return {"reference": reference, "interrupted": interrupted, "at_kill": at_kill, "fold_0": fold_0,
            "resumed_log": resumed_log}


def test_run_was_killed_midway(runs):
    at_kill = runs["at_kill"]
    assert at_kill["returncode"] == -signal.SIGKILL
    assert "folds/fold_00.json" in at_kill["files"]
    assert f"folds/fold_{FOLDS - 1:02d}.json" not in at_kill["files"]
    assert "summary.json" not in at_kill["files"]
    assert "images.csv" not in at_kill["files"]


def test_resume_reuses_finished_fold(runs):
    assert "Resuming the run in" in runs["resumed_log"]
    assert "Fold 0 already finished; reusing its results." in runs["resumed_log"]
    out = Path(runs["interrupted"].output_dir)
    for name, (content, mtime) in runs["fold_0"].items():
        assert (out / name).read_bytes() == content, name
        assert (out / name).stat().st_mtime_ns == mtime, name


@pytest.mark.parametrize("table", TABLES)
def test_resumed_tables_equal_uninterrupted(runs, table):
    reference = Path(runs["reference"].output_dir) / table
    resumed = Path(runs["interrupted"].output_dir) / table
    assert resumed.read_bytes() == reference.read_bytes()


def test_resumed_folds_equal_uninterrupted(runs):
    for fold in range(FOLDS):
        name = f"folds/fold_{fold:02d}.npz"
        with np.load(Path(runs["reference"].output_dir) / name) as a, np.load(Path(runs["interrupted"].output_dir) / name) as b:
            assert a.files == b.files
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {key}")


def test_resumed_summary_equal_apart_from_timings(runs):
    reference = json.loads((Path(runs["reference"].output_dir) / "summary.json").read_text())
    resumed = json.loads((Path(runs["interrupted"].output_dir) / "summary.json").read_text())
    for key in TIMINGS:
        reference.pop(key)
        resumed.pop(key)
    assert resumed == reference


def test_summary_counts_skipped_files(runs):
    summary = json.loads((Path(runs["interrupted"].output_dir) / "summary.json").read_text())
    assert summary["images"] == 32
    assert summary["per_class"] == {"benign": 16, "malignant": 16}
    assert summary["skipped_images"] == 4
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    assert sorted(reasons) == ["benign (901).png", "benign (902).png", "malignant (901).png", "malignant (902).png"]
    assert reasons["benign (901).png"].startswith("truncated or corrupt image data (OSError: image file is truncated")
    assert reasons["benign (902).png"] == "empty file (0 bytes)"
    assert reasons["malignant (901).png"].startswith("not an image file PIL can identify")
    assert reasons["malignant (902).png"].startswith("not an image file PIL can identify")
    images = (Path(runs["interrupted"].output_dir) / "images.csv").read_text(encoding="utf-8")
    assert "benign/benign (16) échographie.png,benign," in images


def test_changed_configuration_rejected(runs):
    from bcembed.crossval import run_crossval

    changed = Config(**{**runs["interrupted"].to_dict(), "classes": ("benign", "malignant"), "margin": 0.3})
    before = {p: p.stat().st_mtime_ns for p in Path(changed.output_dir).rglob("*")}
    with pytest.raises(ValueError, match=r"contains a run with a different configuration \(margin: 0.5 there, 0.3 now\)"):
        run_crossval(changed, progress=False)
    assert {p: p.stat().st_mtime_ns for p in Path(changed.output_dir).rglob("*")} == before


# ---------------------------------------------------------------------------------------------------------------
# Fold checkpoints

def held_out_images(cfg: Config, fold: int) -> tuple:
    "Return (pool images, held-out positions, saved embeddings) of `fold` of the run of `cfg`."
    with np.load(Path(cfg.output_dir) / "folds" / f"fold_{fold:02d}.npz") as arrays:
        index, embeddings = arrays["index"], arrays["embeddings"]
    return prepare_data(cfg, progress=False)["images"], index, embeddings


def test_checkpoint_loads_weights_only(runs):
    cfg = runs["interrupted"]
    saved = torch.load(Path(cfg.output_dir) / "models" / "fold_01.pt", map_location="cpu", weights_only=True)
    assert sorted(saved) == ["fold", "head", "model"]
    assert saved["fold"] == 1

    model = EmbeddingNet(cfg.embedding_dim, cfg.head_hidden, cfg.dropout, weights=None)
    model.load_state_dict(saved["model"])
    images, index, expected = held_out_images(cfg, 1)
    # The run embedded from cached float32 activations, so the plain forward pass agrees up to float rounding.
    np.testing.assert_allclose(embed(model.eval(), index, images=images), expected, atol=1e-4)


def test_load_fold_model_reproduces_embeddings(runs):
    from bcembed.crossval import load_fold_model

    cfg = runs["interrupted"]
    model, head = load_fold_model(Path(cfg.output_dir) / "models" / "fold_01.pt", cfg)
    images, index, expected = held_out_images(cfg, 1)
    assert not model.training
    assert not head.training
    np.testing.assert_allclose(embed(model, index, images=images), expected, atol=1e-4)


class NotAState:
    "A class that torch.load(weights_only=True) refuses to unpickle."


def test_load_fold_model_rejects_other_files(runs, tmp_path):
    from bcembed.crossval import load_fold_model

    cfg = runs["interrupted"]
    checkpoint = (Path(cfg.output_dir) / "models" / "fold_01.pt").read_bytes()
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    (tmp_path / "truncated.pt").write_bytes(checkpoint[:len(checkpoint) // 2])
    (tmp_path / "pickled.pt").write_bytes(pickle.dumps({"model": NotAState()}))
    torch.save({"model": NotAState(), "head": {}, "fold": 0}, tmp_path / "object.pt")
    cases = {"random.pt": "is not a bcembed fold checkpoint", "truncated.pt": "is not a bcembed fold checkpoint",
             "pickled.pt": "is not a bcembed fold checkpoint", "object.pt": "is not a bcembed fold checkpoint",
             str(WEIGHTS): "is not a bcembed fold checkpoint: expected a dict with keys ['fold', 'head', 'model']"}
    for name, message in cases.items():
        path = tmp_path / name
        with pytest.raises(ValueError) as caught:
            load_fold_model(path, cfg)
        assert str(path) in str(caught.value)
        assert message in str(caught.value)

    with pytest.raises(ValueError, match=r"does not fit the configuration \(embedding_dim=32"):
        load_fold_model(Path(cfg.output_dir) / "models" / "fold_01.pt", Config(embedding_dim=32))
    with pytest.raises(FileNotFoundError, match="fold_09.pt"):
        load_fold_model(Path(cfg.output_dir) / "models" / "fold_09.pt", cfg)
