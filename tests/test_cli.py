"""Tests of the `bcembed train`, `cluster` and `duplicates` commands on real BUSI images: exit codes, messages and
the files they write.

The installed console script runs in a subprocess, as a user would run it. Exit codes: 0 success, 2 bad input,
1 any other failure.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bcembed import cli

SCRIPT = Path(sys.executable).parent / "bcembed"
_trained = {}  # the bundle that `bcembed train` writes once for this module


def bcembed(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    "Run the `bcembed` console script (or `bcembed.cli.main` when the script is not installed) and capture its output."
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-c", "import sys; from bcembed.cli import main; sys.exit(main())"]
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "MPLBACKEND": "Agg"}, timeout=600)


def run_main(argv: list, capsys) -> tuple:
    "Run `bcembed.cli.main` in this process and return (exit code, stdout, stderr)."
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def bundle_dir(busi_dir, weights_file, tmp_path_factory) -> Path:
    "Train a bundle with `bcembed train` on 12 BUSI images per class, once per module."
    if not _trained:
        root = tmp_path_factory.mktemp("cli-test")
        result = bcembed("train", "--data-dir", busi_dir, "--per-class", 12, "--weights-path", weights_file,
                         "--phase1-epochs", 1, "--phase2-epochs", 1, "--batch-size", 12, "--bank-views", 2,
                         "--k-max", 3, "--pca-components", 8, "--hdbscan-min-cluster-size", 4, "--device", "cpu",
                         "--cache-dir", root / "cache", "--bundle", root / "bundle", "--no-progress")
        _trained.update(result=result, root=root, bundle=root / "bundle")
    result = _trained["result"]
    assert result.returncode == 0, result.stderr
    return _trained["bundle"]


def test_train_prints_summary(bundle_dir):
    result = _trained["result"]
    assert "Trained on 24 images (12 benign, 12 malignant)" in result.stdout, result.stdout
    assert f"Bundle saved to {bundle_dir}" in result.stdout
    assert (bundle_dir / "bundle.json").exists()


def test_cluster_writes_report(bundle_dir, busi_dir, tmp_path):
    new = tmp_path / "new"
    new.mkdir()
    for source in sorted((busi_dir / "normal").glob("*.png"))[:5]:
        (new / source.name).symlink_to(source)
    (new / "notes.png").write_text("this is not an image")
    out = tmp_path / "report"
    result = bcembed("cluster", "--bundle", bundle_dir, "--input", new, "--output", out, "--embeddings",
                     "--samples", 3, "--map", "pca", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert f"Clustered 5 images from {new}" in result.stdout, result.stdout
    assert "1 unreadable files skipped" in result.stdout
    assert "K-Means cluster 0:" in result.stdout
    assert "HDBSCAN:" in result.stdout
    with open(out / "assignments.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["path"] for row in rows) == sorted(p.name for p in new.iterdir() if p.name != "notes.png")
    assert "e63" in rows[0]
    assert "e64" not in rows[0]
    with open(out / "skipped.csv", newline="") as f:
        skipped = list(csv.DictReader(f))
    assert [row["path"] for row in skipped] == ["notes.png"]
    assert "not an image" in skipped[0]["reason"]
    summary = json.loads((out / "clusters.json").read_text())
    assert summary["images"] == 5
    assert summary["skipped_count"] == 1
    assert (out / "map.png").exists()


def test_cluster_missing_bundle_exits_2(tmp_path):
    result = bcembed("cluster", "--bundle", tmp_path / "no-such-bundle", "--input", tmp_path, "--output",
                     tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert "bcembed cluster: error:" in result.stderr
    assert str(tmp_path / "no-such-bundle") in result.stderr
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_cluster_incompatible_bundle_exits_2(bundle_dir, tmp_path):
    newer = Path(shutil.copytree(bundle_dir, tmp_path / "newer-bundle"))
    manifest = json.loads((newer / "bundle.json").read_text())
    (newer / "bundle.json").write_text(json.dumps({**manifest, "format_version": 99}))
    result = bcembed("cluster", "--bundle", newer, "--input", tmp_path, "--output", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert str(newer / "bundle.json") in result.stderr
    assert "format version 99" in result.stderr
    assert "reads format version(s) [1]" in result.stderr
    assert "Traceback" not in result.stderr


def test_cluster_unreadable_folder_exits_2(bundle_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (broken / "b.jpg").write_bytes(b"")
    code, out, err = run_main(["cluster", "--bundle", bundle_dir, "--input", broken, "--output", tmp_path / "out"],
                              capsys)
    assert code == 2, err
    assert "No readable images" in err
    assert "all 2 image files were skipped" in err
    assert "a.png: " in err
    assert "b.jpg: empty file (0 bytes)" in err
    assert not (tmp_path / "out" / "assignments.csv").exists()


def test_cluster_folder_without_images_exits_2(bundle_dir, tmp_path, capsys):
    (tmp_path / "readme.txt").write_text("no images here")
    code, _, err = run_main(["cluster", "--bundle", bundle_dir, "--input", tmp_path, "--output", tmp_path.parent / "o"],
                            capsys)
    assert code == 2, err
    assert "No image files" in err


def test_cluster_not_a_bundle_exits_2(busi_dir, tmp_path, capsys):
    code, _, err = run_main(["cluster", "--bundle", busi_dir, "--input", tmp_path, "--output", tmp_path / "out"], capsys)
    assert code == 2, err
    assert "is not a bcembed bundle: bundle.json is missing" in err


def test_train_rejects_folder_in_use(busi_dir, tmp_path, capsys):
    (tmp_path / "results.csv").write_text("a,b\n")
    code, _, err = run_main(["train", "--data-dir", busi_dir, "--bundle", tmp_path], capsys)
    assert code == 2, err
    assert "not a bcembed bundle; choose a new or empty folder" in err


def test_train_missing_data_exits_2(tmp_path, capsys):
    code, _, err = run_main(["train", "--data-dir", tmp_path / "no-data", "--bundle", tmp_path / "b"], capsys)
    assert code == 2, err
    assert str(tmp_path / "no-data") in err


def test_unexpected_error_exits_1(bundle_dir, tmp_path, capsys, monkeypatch):
    import bcembed.bundle

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure inside clustering")

    monkeypatch.setattr(bcembed.bundle, "cluster_folder", fail)
    code, _, err = run_main(["cluster", "--bundle", bundle_dir, "--input", tmp_path, "--output", tmp_path / "o"], capsys)
    assert code == 1
    assert "bcembed cluster: failed: RuntimeError: simulated failure inside clustering" in err
    assert "Traceback" in err


def test_duplicates_finds_copy_across_classes(busi_dir, tmp_path):
    data = tmp_path / "data"
    for name in ("benign (1).png", "benign (2).png", "benign (3).png"):
        (data / "benign").mkdir(parents=True, exist_ok=True)
        (data / "benign" / name).symlink_to(busi_dir / "benign" / name)
    (data / "malignant").mkdir()
    (data / "malignant" / "malignant (1).png").symlink_to(busi_dir / "malignant" / "malignant (1).png")
    shutil.copyfile(busi_dir / "benign" / "benign (2).png", data / "malignant" / "copy of scan.png")
    out = tmp_path / "report"
    result = bcembed("duplicates", "--data-dir", data, "--output", out, "--cache-dir", tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "5 images of ['benign', 'malignant']" in result.stdout, result.stdout
    summary = json.loads((out / "duplicates.json").read_text())
    assert summary["images"] == 5
    assert summary["groups_with_copies"] == 1
    assert len(summary["label_conflicts"]) == 1
    assert summary["label_conflicts"][0]["classes"] == {"benign": 1, "malignant": 1}
    with open(out / "source_groups.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 5


def test_duplicates_missing_folder_exits_2(tmp_path, capsys):
    code, _, err = run_main(["duplicates", "--data-dir", tmp_path / "none", "--output", tmp_path / "out"], capsys)
    assert code == 2, err
    assert str(tmp_path / "none") in err


@pytest.mark.parametrize("command, expected", [
    ("train", ["--bundle DIR", "--phase1-epochs", "(default: 15)", "radians", "--overwrite"]),
    ("cluster", ["--input DIR", "--output DIR", "--embeddings", "(default: 16)", "(default: 0.99)"]),
    ("duplicates", ["--data-dir DIR", "--classes", "in bits", "(default: 40)", "in pixels"]),
])
def test_help_names_units_and_defaults(command, expected, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([command, "--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in expected:
        assert phrase in text, phrase


def test_crossval_failure_keeps_failed_notebook(busi_dir, tmp_path):
    "A run that fails inside the experiment notebook exits 2 and leaves the executed cells as crossval.failed.ipynb."
    out = tmp_path / "run"
    result = bcembed("crossval", "--data-dir", busi_dir, "--classes", "benign", "cysts", "--output-dir", out,
                     "--cache-dir", tmp_path / "cache")
    assert result.returncode == 2, result.stderr
    assert "cysts" in result.stderr
    assert (out / "crossval.failed.ipynb").exists()
    assert not (out / "crossval.ipynb").exists()
    assert "crossval.failed.ipynb" in result.stderr
