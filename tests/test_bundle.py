"""Integration tests of bcembed.bundle on real BUSI images: train a bundle, save it, load it in a fresh process and
place new images into its clusters.

The bundle trains on 16 BUSI images per class with ImageNet weights and one epoch per phase, so its clusters are
not meaningful. The tests check that saving and loading change nothing and that every file is accounted for.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bcembed.bundle import (BUNDLE_FILES, FORMAT_VERSION, MANIFEST_NAME, BundleError, assign, cluster_folder,
                            load_bundle, save_bundle, train_bundle)
from bcembed.core import Config

PER_CLASS = 16
_trained = {}  # one trained bundle shared by every test of this module


def training_config(busi_dir: Path, weights_file: Path, cache_dir: Path) -> Config:
    return Config(data_dir=str(busi_dir), classes=("benign", "malignant"), per_class=PER_CLASS, seed=0,
                  weights="imagenet", weights_path=str(weights_file), phase1_epochs=1, phase2_epochs=1,
                  batch_size=16, bank_views=2, k_max=4, pca_components=8, hdbscan_min_cluster_size=4,
                  cache_dir=str(cache_dir), device="cpu")


def new_image_folder(busi_dir: Path, root: Path) -> Path:
    "Link 6 normal images at the top and 2 benign images one level down, and add two unreadable files."
    root.mkdir(parents=True)
    for source in sorted((busi_dir / "normal").glob("*.png"))[:6]:
        (root / source.name).symlink_to(source)
    (root / "more").mkdir()
    for source in sorted((busi_dir / "benign").glob("*.png"))[-2:]:
        (root / "more" / source.name).symlink_to(source)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "empty.jpg").write_bytes(b"")
    return root


@pytest.fixture
def trained(busi_dir, weights_file, tmp_path_factory):
    "Train and save the bundle once; return (bundle, bundle folder, new-image folder)."
    if not _trained:
        root = tmp_path_factory.mktemp("bundle-test")
        bundle = train_bundle(training_config(busi_dir, weights_file, root / "cache"), progress=False)
        folder = save_bundle(bundle, root / "bundle")
        _trained.update(bundle=bundle, folder=folder, new=new_image_folder(busi_dir, root / "new"), root=root)
    return _trained


def test_bundle_manifest_and_files(trained):
    folder = trained["folder"]
    assert sorted(p.name for p in folder.iterdir()) == sorted((MANIFEST_NAME, *BUNDLE_FILES))
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["format"] == "bcembed-bundle"
    assert manifest["format_version"] == FORMAT_VERSION
    for name in ("bcembed", "torch", "scikit-learn", "hdbscan"):
        assert manifest["versions"][name], name
    assert manifest["class_names"] == ["benign", "malignant"]
    assert manifest["config"]["per_class"] == PER_CLASS
    assert manifest["training"]["per_class"] == {"benign": PER_CLASS, "malignant": PER_CLASS}
    with open(folder / "training_images.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * PER_CLASS
    assert all(row["path"].startswith(row["label"] + "/") for row in rows)


FRESH_PROCESS = textwrap.dedent("""
    import sys
    import numpy as np
    from bcembed.bundle import assign, load_bundle

    folder, new, out = sys.argv[1:4]
    bundle = load_bundle(folder)
    result = assign(bundle, new, progress=False, device="cpu")
    training = assign(bundle, [str(p) for p in sys.argv[4:]], progress=False, device="cpu")
    np.savez(out, paths=np.array(result.paths), embeddings=result.embeddings,
             kmeans_cluster=result.kmeans_cluster, kmeans_distance=result.kmeans_distance,
             silhouette=result.silhouette, hdbscan_cluster=result.hdbscan_cluster,
             hdbscan_strength=result.hdbscan_strength, outlier=result.outlier, skipped=len(result.skipped),
             training_embeddings=training.embeddings, training_kmeans=training.kmeans_cluster,
             stored_training_embeddings=bundle.train_embeddings)
""")


def test_fresh_process_gives_same_clusters(trained, busi_dir):
    bundle, folder, new = trained["bundle"], trained["folder"], trained["new"]
    here = assign(bundle, new, progress=False, device="cpu")
    out = trained["root"] / "fresh.npz"
    training_paths = [str(busi_dir / p) for p in bundle.train_paths]
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(folder), str(new), str(out), *training_paths],
                   check=True, env={**os.environ, "MPLBACKEND": "Agg"})
    with np.load(out) as there:
        assert there["paths"].tolist() == here.paths
        assert int(there["skipped"]) == len(here.skipped)
        assert np.array_equal(there["embeddings"], here.embeddings)
        for name in ("kmeans_cluster", "hdbscan_cluster", "outlier"):
            assert np.array_equal(there[name], getattr(here, name)), name
        for name in ("kmeans_distance", "silhouette", "hdbscan_strength"):
            assert np.array_equal(there[name], getattr(here, name)), name
        # The loaded network reproduces the embeddings and K-Means clusters of the training images exactly.
        assert np.array_equal(there["stored_training_embeddings"], bundle.train_embeddings)
        assert np.array_equal(there["training_embeddings"], bundle.train_embeddings)
        assert np.array_equal(there["training_kmeans"], bundle.kmeans.labels_)


def test_report_one_row_per_readable_image(trained):
    bundle, new = trained["bundle"], trained["new"]
    out = trained["root"] / "report"
    summary = cluster_folder(bundle, new, out, embeddings=True, samples_per_cluster=4, map_method="tsne",
                             progress=False, device="cpu")
    with open(out / "assignments.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    readable = sorted(p.name for p in new.glob("*.png") if p.name != "broken.png")
    readable += sorted(f"more/{p.name}" for p in (new / "more").iterdir())
    assert sorted(row["path"] for row in rows) == sorted(readable)
    assert len(rows) == 8
    assert list(rows[0])[:7] == ["path", "kmeans_cluster", "kmeans_distance", "silhouette", "hdbscan_cluster",
                                 "hdbscan_strength", "outlier"]
    assert [f"e{i}" for i in range(64)] == list(rows[0])[7:]
    assert all(-1 <= float(row["silhouette"]) <= 1 for row in rows)
    assert all(int(row["hdbscan_cluster"]) >= -1 for row in rows)

    with open(out / "skipped.csv", newline="") as f:
        skipped = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    assert sorted(skipped) == ["broken.png", "empty.jpg"]
    assert summary["skipped_count"] == 2
    assert summary["images"] == 8
    assert sum(entry["images"] for entry in summary["kmeans"]) == 8
    assert sum(entry["training_images"] for entry in summary["kmeans"]) == 2 * PER_CLASS
    for entry in summary["kmeans"]:
        if entry["images"]:
            assert (out / entry["sheet"]).stat().st_size > 0, entry
    assert (out / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "clusters.json").read_text())["images"] == 8


def edit_manifest(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    (target / MANIFEST_NAME).write_text(json.dumps({**manifest, **changes}))
    return target


def test_load_rejects_newer_format(trained):
    folder = edit_manifest(trained["folder"], trained["root"] / "newer", format_version=FORMAT_VERSION + 1)
    with pytest.raises(BundleError) as error:
        load_bundle(folder)
    message = str(error.value)
    assert str(folder / MANIFEST_NAME) in message
    assert f"format version {FORMAT_VERSION + 1}" in message
    assert f"reads format version(s) [{FORMAT_VERSION}]" in message
    assert "upgrade bcembed" in message


def test_load_rejects_older_format(trained):
    folder = edit_manifest(trained["folder"], trained["root"] / "older", format_version=0)
    with pytest.raises(BundleError, match="format version 0 .*train the bundle again"):
        load_bundle(folder)


def test_load_rejects_other_folders(trained, busi_dir, tmp_path):
    with pytest.raises(BundleError, match="bundle.json is missing"):
        load_bundle(busi_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bundle(tmp_path / "nothing-here")
    (tmp_path / "bundle.json").write_text('{"format": "something-else"}')
    with pytest.raises(BundleError, match="format is 'something-else'"):
        load_bundle(tmp_path)


def test_load_rejects_changed_or_missing_file(trained):
    changed = Path(shutil.copytree(trained["folder"], trained["root"] / "changed"))
    with open(changed / "hdbscan.joblib", "ab") as f:
        f.write(b"extra")
    with pytest.raises(BundleError, match="hdbscan.joblib has SHA-256"):
        load_bundle(changed)
    missing = Path(shutil.copytree(trained["folder"], trained["root"] / "missing"))
    (missing / "model.pt").unlink()
    with pytest.raises(BundleError, match="model.pt is missing"):
        load_bundle(missing)


def test_save_refuses_existing_bundle(trained):
    with pytest.raises(ValueError, match="already contains a bundle"):
        save_bundle(trained["bundle"], trained["folder"])


def test_load_rejects_unpicklable_estimator(trained):
    "An estimator pickle that needs a module this environment lacks is an incompatible bundle, not a crash."
    folder = Path(shutil.copytree(trained["folder"], trained["root"] / "unpicklable"))
    (folder / "kmeans.joblib").write_bytes(b"cbcembed_no_such_module\nSomeEstimator\n.")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["files"]["kmeans.joblib"] = hashlib.sha256((folder / "kmeans.joblib").read_bytes()).hexdigest()
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as error:
        load_bundle(folder)
    message = str(error.value)
    assert "kmeans.joblib does not unpickle" in message
    assert "ModuleNotFoundError" in message
    assert "train the bundle again" in message
