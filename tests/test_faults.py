"""Bad input, degenerate results and damaged files: each entry point uses what it can and reports the rest.

Images that cannot be used are skipped with a warning naming the file and the reason. Parameters that cannot
work with the data stop `run_crossval` before any training. Undefined metrics are NaN with a reason. Caches and
result files survive an interrupted write. The broken images are made in tmp_path from real BUSI images, so
these tests skip when ../shared/data/busi is absent.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from threadpoolctl import threadpool_limits

import bcembed.crossval as crossval
from bcembed.core import Config, atomic_torch_save, atomic_write_bytes
from bcembed.crossval import check_against_data, cluster_embeddings, prepare_data, run_crossval
from bcembed.data import (ImageLoadError, ImageTable, balance, load_image, load_images, scan_folder,
                          to_model_input)
from bcembed.losses import ArcFaceHead
from bcembed.metrics import clustering_scores
from bcembed.model import N_BLOCKS, EmbeddingNet
from bcembed.training import build_bank, cached_bank, create_model, train_embedding

from conftest import DATA, WEIGHTS, require

GREY = "benign/benign (1).png"  # an 8-bit greyscale BUSI image, 562 x 471
COLOUR = "benign/benign (102).png"  # one of the 16 BUSI images stored as RGB, with colour markings


@pytest.fixture(autouse=True)
def bcembed_warnings(caplog):
    "Capture the bcembed logger's warnings in every test."
    caplog.set_level(logging.WARNING, logger="bcembed")
    return caplog


def grey_crop(busi_dir: Path, side: int = 64) -> np.ndarray:
    "Return a side x side uint8 crop from the middle of a real greyscale BUSI image."
    image = np.asarray(Image.open(busi_dir / GREY))
    assert image.ndim == 2
    assert image.dtype == np.uint8
    return image[100:100 + side, 200:200 + side].copy()


def rgb3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def loading_error(path) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as caught:
        load_image(path, 64)
    assert caught.value.path == str(path)
    return caught.value


# ---------------------------------------------------------------------------------------------------------------
# Files that cannot be used

def write_broken_variants(busi_dir: Path, folder: Path) -> dict:
    "Write broken copies of a real BUSI image into `folder`; return {file name: expected start of the reason}."
    folder.mkdir(parents=True, exist_ok=True)
    png = (busi_dir / GREY).read_bytes()
    buffer = io.BytesIO()
    Image.open(busi_dir / GREY).save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()

    (folder / "truncated.png").write_bytes(png[:len(png) // 2])
    (folder / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    damaged = bytearray(png)
    start = png.index(b"IDAT") + 4
    assert int.from_bytes(png[start - 8:start - 4], "big") > 2000, "the first IDAT chunk is too short to damage"
    for i in range(start + 100, start + 2000, 7):
        damaged[i] ^= 0xFF
    (folder / "damaged pixels.png").write_bytes(bytes(damaged))
    header = bytearray(png)
    header[20] ^= 0xFF  # the first byte of the IHDR height, so the chunk checksum no longer matches
    (folder / "damaged header.png").write_bytes(bytes(header))
    (folder / "notes.png").write_text("Lesion measurements, not an image.\n")
    (folder / "report.jpg").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n")
    (folder / "empty.png").write_bytes(b"")
    unreadable = "not an image file PIL can identify (a corrupt header, or another kind of file with an image extension)"
    return {"truncated.png": "truncated or corrupt image data (OSError: image file is truncated",
            "truncated.jpg": "truncated or corrupt image data (OSError: image file is truncated",
            "damaged pixels.png": "truncated or corrupt image data (",
            "damaged header.png": unreadable,
            "notes.png": unreadable,
            "report.jpg": unreadable,
            "empty.png": "empty file (0 bytes)"}


def test_broken_files_raise_with_reason(busi_dir, tmp_path):
    expected = write_broken_variants(busi_dir, tmp_path)
    for name, reason in expected.items():
        error = loading_error(tmp_path / name)
        assert error.reason.startswith(reason), (name, error.reason)
        assert str(error) == f"{tmp_path / name}: {error.reason}"


def test_missing_file_reason(tmp_path):
    error = loading_error(tmp_path / "gone.png")
    assert error.reason == "file not found"


def test_broken_files_skipped_and_counted(busi_dir, tmp_path, bcembed_warnings):
    expected = write_broken_variants(busi_dir, tmp_path / "broken")
    good = grey_crop(busi_dir)
    Image.fromarray(good).save(tmp_path / "good.png")
    Image.fromarray(255 - good).save(tmp_path / "inverted.png")
    paths = [str(tmp_path / "good.png")] + [str(tmp_path / "broken" / n) for n in expected] + [str(tmp_path / "inverted.png")]
    table = ImageTable(paths, [0] * (len(paths) - 1) + [1], ("a", "b"), tmp_path)

    loaded = load_images(table, size=64, cache_dir=tmp_path / "cache")

    assert loaded.table.paths == [str(tmp_path / "good.png"), str(tmp_path / "inverted.png")]
    assert loaded.table.labels.tolist() == [0, 1]
    np.testing.assert_array_equal(loaded.images[0], rgb3(good))
    np.testing.assert_array_equal(loaded.images[1], rgb3(255 - good))
    assert len(loaded.skipped) == len(expected) == 7
    for (path, reason), (name, start) in zip(loaded.skipped, expected.items()):
        assert path == str(tmp_path / "broken" / name)
        assert reason.startswith(start), (name, reason)
        assert any(path in message and reason in message for message in bcembed_warnings.messages), path
    assert "Skipped 7 of 9 images that cannot be used" in bcembed_warnings.text

    # The cached result lists the same skipped files, with the same reasons.
    again = load_images(table, size=64, cache_dir=tmp_path / "cache")
    assert again.skipped == loaded.skipped
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(loaded.images))


# ---------------------------------------------------------------------------------------------------------------
# Image modes: each usable one gives the pixels its mode defines

def test_sixteen_bit_png_scaled(busi_dir, tmp_path):
    grey = grey_crop(busi_dir)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    offset = np.minimum(grey.astype(np.uint32) * 257 + 128, 65535).astype(np.uint16)
    Image.fromarray(offset).save(tmp_path / "g16 offset.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"

    # 257 * c is c in 8 bits (255 / 65535 = 1 / 257); clipping to 255 would turn almost every pixel white.
    np.testing.assert_array_equal(load_image(tmp_path / "g16.png", 64), rgb3(grey))
    # (257 c + 128) / 257 = c + 0.498 rounds to c (and 65535 stays 255).
    np.testing.assert_array_equal(load_image(tmp_path / "g16 offset.png", 64), rgb3(grey))


def palette_image(busi_dir: Path):
    "Return (indices, palette rgb 256 x 3, PIL P image) built from a real BUSI crop."
    indices = grey_crop(busi_dir)
    level = np.arange(256)
    palette = np.stack([255 - level, level, level // 2], axis=1).astype(np.uint8)
    image = Image.frombytes("P", indices.shape[::-1], indices.tobytes())  # the grey values become palette indices
    image.putpalette(palette.ravel().tolist())
    return indices, palette, image


def test_palette_png(busi_dir, tmp_path):
    indices, palette, image = palette_image(busi_dir)
    image.save(tmp_path / "palette.png")
    reread = Image.open(tmp_path / "palette.png")
    assert reread.mode == "P"
    assert "transparency" not in reread.info
    np.testing.assert_array_equal(np.asarray(reread), indices)

    np.testing.assert_array_equal(load_image(tmp_path / "palette.png", 64), palette[indices])


def test_palette_png_with_transparency(busi_dir, tmp_path):
    indices, palette, image = palette_image(busi_dir)
    transparent = int(np.bincount(indices.ravel()).argmax())  # the most frequent grey level
    image.save(tmp_path / "one transparent.png", transparency=transparent)
    alpha = (np.arange(256) * 7 % 256).astype(np.uint8)
    image.save(tmp_path / "alpha table.png", transparency=alpha.tobytes())
    assert Image.open(tmp_path / "one transparent.png").info["transparency"] == transparent

    expected = palette[indices].copy()
    expected[indices == transparent] = 0
    np.testing.assert_array_equal(load_image(tmp_path / "one transparent.png", 64), expected)

    a = alpha[indices][..., None].astype(np.uint32)
    expected = (palette[indices].astype(np.uint32) * a + 127) // 255  # round(c * a / 255)
    np.testing.assert_array_equal(load_image(tmp_path / "alpha table.png", 64), expected.astype(np.uint8))


def test_la_png_composited(busi_dir, tmp_path):
    grey = grey_crop(busi_dir)
    alpha = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (64, 1))
    Image.fromarray(np.stack([grey, alpha], -1), "LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"

    expected = (grey.astype(np.uint32) * alpha + 127) // 255
    loaded = load_image(tmp_path / "la.png", 64)
    np.testing.assert_array_equal(loaded, rgb3(expected.astype(np.uint8)))
    assert loaded[:, 0].max() == 0  # alpha 0: no echo
    np.testing.assert_array_equal(loaded[:, -1, 0], grey[:, -1])  # alpha 255: unchanged


def test_rgba_png_composited(busi_dir, tmp_path):
    rgb = np.asarray(Image.open(busi_dir / COLOUR))[8:72, 464:528]
    assert rgb.shape == (64, 64, 3)
    assert (rgb[..., 0] != rgb[..., 1]).any(), "the crop should contain colour markings"
    alpha = np.tile(np.linspace(255, 0, 64).round().astype(np.uint8)[:, None], (1, 64))
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")

    expected = (rgb.astype(np.uint32) * alpha[..., None] + 127) // 255
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png", 64), expected.astype(np.uint8))
    np.testing.assert_array_equal(load_image(busi_dir / COLOUR, 64).shape, (64, 64, 3))


def test_cmyk_jpeg_converted(busi_dir, tmp_path):
    grey = grey_crop(busi_dir)
    zero = np.zeros_like(grey)
    Image.fromarray(np.stack([zero, zero, zero, 255 - grey], -1), "CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"

    loaded = load_image(tmp_path / "cmyk.jpg", 64).astype(int)
    # Black ink K = 255 - grey prints the grey image; JPEG at quality 100 changes a pixel by at most a few levels.
    assert (loaded[..., 0] == loaded[..., 1]).all()
    assert (loaded[..., 1] == loaded[..., 2]).all()
    assert np.abs(loaded[..., 0] - grey).max() <= 3
    assert np.abs(loaded[..., 0] - grey).mean() < 0.5


@pytest.mark.parametrize("orientation, clockwise_quarter_turns", [(6, 1), (8, -1)])
def test_exif_orientation_jpeg(busi_dir, tmp_path, orientation, clockwise_quarter_turns):
    upright = grey_crop(busi_dir)
    upright[:8, :16] = 255  # a white mark in the top-left corner of the upright image
    stored = np.rot90(upright, k=clockwise_quarter_turns)  # what a camera that was turned writes
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    path = tmp_path / f"orientation {orientation}.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)

    decoded = np.asarray(Image.open(path))  # the stored pixels as decoded, without the tag applied
    loaded = load_image(path, 64)
    # Tag 6 means the stored pixels are shown turned 90 degrees clockwise, tag 8 counter-clockwise.
    np.testing.assert_array_equal(loaded[..., 0], np.rot90(decoded, k=-clockwise_quarter_turns))
    assert loaded[:8, :16, 0].min() > 200  # the mark is back in the top-left corner
    assert np.abs(loaded[..., 0].astype(int) - upright).mean() < 3


def test_tiny_images(busi_dir, tmp_path):
    grey = grey_crop(busi_dir)
    Image.fromarray(grey[:1, :1]).save(tmp_path / "1x1.png")
    two = grey[30:32, 30:32]
    assert len(np.unique(two)) > 1
    Image.fromarray(two).save(tmp_path / "2x2.png")

    np.testing.assert_array_equal(load_image(tmp_path / "1x1.png", 224), np.full((224, 224, 3), grey[0, 0], np.uint8))
    np.testing.assert_array_equal(load_image(tmp_path / "2x2.png", 2), rgb3(two))
    big = load_image(tmp_path / "2x2.png", 224)[..., 0]
    # Bilinear upsampling keeps each corner pixel and stays within the range of the four inputs.
    assert [big[0, 0], big[0, -1], big[-1, 0], big[-1, -1]] == [two[0, 0], two[0, 1], two[1, 0], two[1, 1]]
    assert big.min() >= two.min()
    assert big.max() <= two.max()

    # Both reach the network as full-size inputs, so 3 x 3 convolutions and strides apply as usual.
    table = ImageTable([str(tmp_path / "1x1.png"), str(tmp_path / "2x2.png")], [0, 1], ("a", "b"), tmp_path)
    loaded = load_images(table, size=64, use_cache=False)
    with torch.inference_mode():
        embeddings = EmbeddingNet(weights=None).eval()(to_model_input(loaded.images))
    assert embeddings.shape == (2, 64)
    assert torch.isfinite(embeddings).all()


def test_decompression_bomb_limit(busi_dir, tmp_path, monkeypatch):
    path = busi_dir / GREY
    pixels = 562 * 471
    assert Image.open(path).size == (562, 471)
    Image.fromarray(grey_crop(busi_dir)).save(tmp_path / "small.png")

    # Between the limit and twice the limit PIL only warns; load_image still rejects the file.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels - 1)
    error = loading_error(path)
    assert error.reason == (f"562x471 = {pixels} pixels, more than the decompression-bomb limit of {pixels - 1} "
                            "pixels; raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted")
    # Beyond twice the limit PIL raises DecompressionBombError itself.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels // 3)
    error = loading_error(path)
    assert error.reason.startswith(f"more than the decompression-bomb limit of {pixels // 3} pixels (")

    # The cache remembers the skip only for that limit: raising it lets the image load.
    table = ImageTable([str(path), str(tmp_path / "small.png")], [0, 1], ("a", "b"), tmp_path)
    first = load_images(table, 32, cache_dir=tmp_path / "cache")
    assert [p for p, _ in first.skipped] == [str(path)] and len(first.table) == 1
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10 * pixels)
    reloaded = load_images(table, 32, cache_dir=tmp_path / "cache")
    assert reloaded.skipped == []
    assert len(reloaded.table) == 2


def test_unusual_file_names(busi_dir, tmp_path):
    names = ["benign (7) copy [v2].png", "échographie ü 超音波.png", " leading space.png", "50% {x} #1; ok.png"]
    grey = grey_crop(busi_dir)
    expected = {}
    for shift, name in enumerate(names):
        (tmp_path / "benign").mkdir(exist_ok=True)
        image = np.roll(grey, 5 * shift, axis=1)
        Image.fromarray(image).save(tmp_path / "benign" / name)
        expected[f"benign/{name}"] = image
    (tmp_path / "cyst [old]").mkdir()
    Image.fromarray(grey).save(tmp_path / "cyst [old]" / "cyst (1).png")

    table = scan_folder(tmp_path, ("benign", "cyst [old]"))
    loaded = load_images(table, 64, cache_dir=tmp_path / "cache")

    assert loaded.skipped == []
    assert sorted(loaded.table.relative_paths()) == sorted(list(expected) + ["cyst [old]/cyst (1).png"])
    for relative, image in zip(loaded.table.relative_paths(), loaded.images):
        np.testing.assert_array_equal(image, rgb3(expected.get(relative, grey)))


def run_with_timeout(function, seconds: float):
    "Run `function` in a daemon thread; fail the test when it does not return within `seconds`."
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # reported in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function} did not return within {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_symlink_loops_do_not_hang(busi_dir, tmp_path):
    data = tmp_path / "data"
    for name in ("benign", "malignant"):
        (data / name).mkdir(parents=True)
        Image.fromarray(grey_crop(busi_dir)).save(data / name / f"{name} (1).png")
    (data / "benign" / "back to root").symlink_to(data)
    (data / "malignant" / "itself").symlink_to(data / "malignant")
    (data / "benign" / "a.png").symlink_to(data / "benign" / "b.png")
    (data / "benign" / "b.png").symlink_to(data / "benign" / "a.png")
    (data / "malignant" / "moved.png").symlink_to(tmp_path / "no such file.png")
    elsewhere = tmp_path / "other disk" / "malignant"
    elsewhere.mkdir(parents=True)
    Image.fromarray(grey_crop(busi_dir)).save(elsewhere / "malignant (2).png")
    (data / "malignant" / "linked").symlink_to(elsewhere)

    table = run_with_timeout(lambda: scan_folder(data, ("benign", "malignant")), 60)

    # Each image once: the loops are entered once, and the linked folder is read like any other.
    assert table.relative_paths() == ["benign/a.png", "benign/b.png", "benign/benign (1).png",
                                      "malignant/malignant (1).png", "malignant/moved.png",
                                      "malignant/linked/malignant (2).png"]
    loaded = load_images(table, 32, use_cache=False)
    assert {Path(p).name: reason for p, reason in loaded.skipped} == {
        "a.png": "cannot read the file (Too many levels of symbolic links)",
        "b.png": "cannot read the file (Too many levels of symbolic links)",
        "moved.png": "file not found"}
    assert loaded.table.counts() == {"benign": 1, "malignant": 2}


def test_hidden_and_mask_files_left_out(busi_dir, tmp_path):
    (tmp_path / "benign").mkdir()
    (tmp_path / "malignant" / ".thumbnails").mkdir(parents=True)
    Image.fromarray(grey_crop(busi_dir)).save(tmp_path / "benign" / "benign (1).png")
    Image.fromarray(grey_crop(busi_dir)).save(tmp_path / "benign" / "benign (1)_mask.png")
    (tmp_path / "benign" / "._benign (1).png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    Image.fromarray(grey_crop(busi_dir)).save(tmp_path / "malignant" / "malignant (1).png")
    Image.fromarray(grey_crop(busi_dir)).save(tmp_path / "malignant" / ".thumbnails" / "malignant (1).png")

    assert scan_folder(tmp_path).relative_paths() == ["benign/benign (1).png", "malignant/malignant (1).png"]


# ---------------------------------------------------------------------------------------------------------------
# Folders and parameters: an error before any training

def link_busi(busi_dir: Path, root: Path, counts: dict, start: int = 1) -> Path:
    "Link `counts[class]` real BUSI images of each class into `root/<class>/`, numbered from `start`."
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for number in range(start, start + count):
            (root / name / f"{name} ({number}).png").symlink_to(busi_dir / name / f"{name} ({number}).png")
    return root


def small_config(tmp_path: Path, data_dir: Path, **changes) -> Config:
    "A configuration that runs a fold in seconds: 64-pixel images, one epoch per phase, two folds."
    values = dict(data_dir=str(data_dir), output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                  weights="imagenet", weights_path=str(WEIGHTS), image_size=64, folds=2, phase1_epochs=1,
                  phase2_epochs=1, batch_size=8, bank_views=2, k_max=4, pca_components=4,
                  hdbscan_min_cluster_size=3, device="cpu")
    values.update(changes)
    return Config(**values)


@pytest.fixture
def no_training(monkeypatch):
    "Make any training, bank building or fold fail loudly, so a test proves that validation came first."
    def started(*args, **kwargs):
        raise AssertionError("training started although the input is invalid")

    for name in ("run_fold", "cached_bank", "build_bank", "train_embedding"):
        if hasattr(crossval, name):
            monkeypatch.setattr(crossval, name, started)


def assert_nothing_trained(cfg: Config) -> None:
    out = Path(cfg.output_dir)
    assert not (out / "folds").exists(), sorted(out.rglob("*"))
    assert not (out / "models").exists(), sorted(out.rglob("*"))


@pytest.fixture
def two_classes(busi_dir, tmp_path) -> Path:
    return link_busi(busi_dir, tmp_path / "data", {"benign": 8, "malignant": 8})


@pytest.mark.parametrize("setup, error, message", [
    ("missing", FileNotFoundError, "does not exist; pass the folder that contains the class folders"),
    ("empty", ValueError, "No images found in"),
    ("empty class folders", ValueError, "No images found in"),
    ("only benign", ValueError, "Class folder(s) ['malignant'] contain no images"),
])
def test_missing_or_empty_folders(busi_dir, tmp_path, no_training, setup, error, message):
    data = tmp_path / "data"
    if setup != "missing":
        data.mkdir()
    if setup == "empty class folders":
        (data / "benign").mkdir()
        (data / "malignant").mkdir()
    if setup == "only benign":
        link_busi(busi_dir, data, {"benign": 4})
    cfg = small_config(tmp_path, data)

    with pytest.raises(error) as caught:
        run_crossval(cfg, progress=False)

    assert message in str(caught.value)
    assert str(data) in str(caught.value)
    assert not Path(cfg.output_dir).exists()


@pytest.mark.parametrize("changes, message", [
    ({"classes": ("benign",)}, "Invalid classes=('benign',): give at least two distinct class names."),
    ({"classes": ("benign", "benign")}, "Invalid classes=('benign', 'benign'): give at least two distinct class names."),
    ({"margin": 2.0}, "Invalid margin=2.0: ArcFace needs an angle in radians in [0, pi/2)."),
    ({"margin": -0.1}, "Invalid margin=-0.1: ArcFace needs an angle in radians in [0, pi/2)."),
    ({"margin": math.nan}, "Invalid margin=nan: ArcFace needs an angle in radians in [0, pi/2)."),
    ({"scale": 0.0}, "Invalid scale=0.0: use a positive logit scale such as 30."),
    ({"scale": -30.0}, "Invalid scale=-30.0: use a positive logit scale such as 30."),
    ({"loss": "cosface", "margin": 1.5}, "Invalid margin=1.5: CosFace needs a cosine margin in [0, 1)."),
    ({"folds": 1}, "Invalid folds=1: use an integer >= 2."),
    ({"k_min": 5, "k_max": 3}, "Invalid k_max=3: K-Means needs 2 <= k_min <= k_max."),
    ({"per_class": 1}, "Invalid per_class=1: use None (smallest class size) or an integer >= 2."),
])
def test_invalid_parameters_rejected(two_classes, tmp_path, no_training, changes, message):
    cfg = small_config(tmp_path, two_classes, **changes)
    with pytest.raises(ValueError) as caught:
        run_crossval(cfg, progress=False)
    assert str(caught.value) == message
    assert not Path(cfg.output_dir).exists()


@pytest.mark.parametrize("scale", [math.inf])
def test_infinite_scale_rejected(two_classes, tmp_path, no_training, scale):
    cfg = small_config(tmp_path, two_classes, scale=scale)
    with pytest.raises(ValueError, match=r"Invalid scale=inf: "):
        run_crossval(cfg, progress=False)
    assert not Path(cfg.output_dir).exists()


@pytest.mark.parametrize("changes, message", [
    ({"classes": ("benign", "cyst")},
     "Class folder(s) ['cyst'] contain no images under {data!r}; folders with images there: ['benign', 'malignant']. "
     "Check the class names or the data folder."),
    ({"per_class": 9},
     "per_class=9 exceeds the images of class(es) {{'benign': 8, 'malignant': 8}}; use per_class <= 8 or None for "
     "the smallest class's size."),
    ({"k_min": 8, "k_max": 8},
     "k_min=8 needs more than 8 images per held-out fold, which contains about 8; use k_min <= 7 or fewer folds."),
    ({"pca_components": 80}, "pca_components=80 exceeds embedding_dim=64; use pca_components <= 64."),
    ({"folds": 6}, "folds=6 leaves 2 image(s) per held-out fold from 16 images; use folds <= 5."),
])
def test_parameters_that_do_not_fit_the_data(two_classes, tmp_path, no_training, changes, message):
    cfg = small_config(tmp_path, two_classes, **changes)
    with pytest.raises(ValueError) as caught:
        run_crossval(cfg, progress=False)
    assert str(caught.value) == message.format(data=str(two_classes))
    assert_nothing_trained(cfg)


def test_more_folds_than_images_in_class(busi_dir, tmp_path, no_training):
    data = link_busi(busi_dir, tmp_path / "data", {"benign": 3, "malignant": 3})
    cfg = small_config(tmp_path, data, folds=4)
    with pytest.raises(ValueError) as caught:
        run_crossval(cfg, progress=False)
    assert str(caught.value) == "folds=4 leaves 1 image(s) per held-out fold from 6 images; use folds <= 2."
    assert_nothing_trained(cfg)


def link_copies(busi_dir: Path, root: Path, name: str, copies: list) -> None:
    "Link copies[i] files named after source image i + 1 of class `name`: one original and its copies."
    (root / name).mkdir(parents=True, exist_ok=True)
    for number, count in enumerate(copies, start=1):
        for copy in range(count):
            file_name = f"{name} ({number}).png" if copy == 0 else f"{name} ({number})-copy{copy}.png"
            (root / name / file_name).symlink_to(busi_dir / name / f"{name} ({number}).png")


def test_more_folds_than_source_groups(busi_dir, tmp_path, no_training):
    data = link_busi(busi_dir, tmp_path / "data", {"benign": 16})
    link_copies(busi_dir, data, "malignant", [4, 4, 4, 4])  # 16 images of 4 source images
    cfg = small_config(tmp_path, data, folds=5)
    with pytest.raises(ValueError) as caught:
        run_crossval(cfg, progress=False)
    assert str(caught.value).startswith("Invalid n_folds=5: class ")
    assert "has only 4 source groups" in str(caught.value)
    assert "Use n_folds <= 4" in str(caught.value)
    assert_nothing_trained(cfg)


def test_fold_error_names_the_class(busi_dir, tmp_path, no_training):
    data = link_busi(busi_dir, tmp_path / "data", {"benign": 16})
    link_copies(busi_dir, data, "malignant", [4, 4, 4, 4])
    cfg = small_config(tmp_path, data, folds=5)
    with pytest.raises(ValueError, match=r"class 'malignant' has only 4 source groups"):
        run_crossval(cfg, progress=False)


def test_k_min_checked_against_smallest_fold(busi_dir, tmp_path, no_training):
    # Grouped folds are uneven: 32 images in 3 folds give held-out folds of 12, 12 and 8 images here, so
    # k_min=9 passes a check against 32 // 3 = 10 images but not the fold of 8.
    data = tmp_path / "data"
    for name in ("benign", "malignant"):
        link_copies(busi_dir, data, name, [9, 2, 1, 1, 1, 1, 1])
    folds = prepare_data(small_config(tmp_path, data, folds=3), progress=False)["folds"]
    assert sorted(np.bincount(folds).tolist()) == [8, 12, 12]
    cfg = small_config(tmp_path, data, folds=3, k_min=9, k_max=9)

    with pytest.raises(ValueError, match=r"k_min=9 .*8"):
        run_crossval(cfg, progress=False)
    assert_nothing_trained(cfg)


def test_k_max_beyond_fold_is_clipped_with_warning(bcembed_warnings):
    check_against_data(Config(folds=2, k_max=50), 16, smallest_fold=8)
    assert "k_max=50 exceeds what a held-out fold of about 8 images allows; K-Means tries k up to 7." in bcembed_warnings.messages


def test_pca_beyond_fold_is_clipped_with_warning(bcembed_warnings):
    embeddings = np.random.default_rng(0).normal(size=(10, 64))
    clusters = cluster_embeddings(Config(pca_components=16, k_max=4, hdbscan_min_cluster_size=3), embeddings,
                                  np.repeat([0, 1], 5))
    assert clusters["reducer"].n_components_ == 10
    assert clusters["reduced"].shape == (10, 10)
    assert "PCA n_components=16 is more than min(n_samples=10, n_features=64), so using 10." in bcembed_warnings.messages


def write_unreadable_class(busi_dir: Path, root: Path) -> Path:
    "12 real benign images, and 12 malignant files of which 8 are real and 4 cannot be decoded."
    link_busi(busi_dir, root, {"benign": 12, "malignant": 8})
    for number in range(9, 13):
        (root / "malignant" / f"malignant ({number}).png").write_bytes((busi_dir / GREY).read_bytes()[:300])
    return root


def test_balance_counts_only_readable_images(busi_dir, tmp_path):
    cfg = small_config(tmp_path, write_unreadable_class(busi_dir, tmp_path / "data"))
    data = prepare_data(cfg, progress=False)
    assert len(data["skipped"]) == 4
    assert data["table"].counts() == {"benign": 8, "malignant": 8}


def test_class_without_readable_images_is_an_error(busi_dir, tmp_path, no_training):
    data = link_busi(busi_dir, tmp_path / "data", {"benign": 6})
    (data / "malignant").mkdir()
    for number in range(1, 7):
        (data / "malignant" / f"malignant ({number}).png").write_text("not an image")
    cfg = small_config(tmp_path, data)
    with pytest.raises(ValueError, match=r"\['malignant'\] have no usable images"):
        run_crossval(cfg, progress=False)
    assert_nothing_trained(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Degenerate results: undefined metrics are NaN with a reason

def test_hdbscan_all_noise_scored_as_missing():
    rng = np.random.default_rng(0)
    embeddings = np.concatenate([rng.normal(0, 0.05, (10, 64)) + 1, rng.normal(0, 0.05, (10, 64)) - 1])
    labels = np.repeat([0, 1], 10)
    # min_cluster_size is clipped to the 20 points, and two clusters of 20 cannot fit in 20 points.
    clusters = cluster_embeddings(Config(pca_components=4, k_max=4, hdbscan_min_cluster_size=50), embeddings, labels)

    assert (clusters["hdbscan"].labels_ == -1).all()
    scores = clusters["hdbscan_scores"]
    assert scores["n_clusters"] == 0
    assert scores["noise_fraction"] == 1.0
    assert scores["accuracy"] == 0.0  # noise points count as errors
    assert scores["f1"] == 0.0
    assert math.isnan(scores["silhouette"])
    assert scores["missing"] == {"silhouette": "silhouette needs at least 2 clusters, got 0"}
    assert clusters["kmeans"].k_ == 2
    assert clusters["kmeans_scores"]["accuracy"] == 1.0
    assert clusters["kmeans_scores"]["missing"] == {}


def test_collapsed_embeddings_give_one_cluster(bcembed_warnings):
    labels = np.repeat([0, 1], 6)
    clusters = cluster_embeddings(Config(pca_components=4, k_max=4, hdbscan_min_cluster_size=3), np.ones((12, 64)), labels)

    scores = clusters["kmeans_scores"]
    assert scores["n_clusters"] == 1
    assert scores["matching"] == "majority"
    assert scores["accuracy"] == 0.5  # every point mapped to one class, 6 of 12 right
    assert math.isnan(scores["silhouette"])
    assert scores["missing"] == {"silhouette": "silhouette needs at least 2 clusters, got 1"}
    assert all(math.isnan(s) for s in clusters["kmeans"].silhouette_curve_.values())
    assert "The silhouette is undefined for every k in [2, 4], so keeping k=2." in bcembed_warnings.messages


def test_hdbscan_one_cluster_scores():
    scores = clustering_scores([0, 0, 0, 1, 1, 1], [0, 0, 0, 0, -1, -1], X=np.eye(6))
    assert scores["n_clusters"] == 1
    assert scores["matching"] == "majority"
    assert scores["accuracy"] == 0.5  # cluster 0 maps to class 0; 3 of 6 right, noise counts as wrong
    assert math.isnan(scores["silhouette"])
    assert scores["missing"] == {"silhouette": "silhouette needs at least 2 clusters, got 1"}


# ---------------------------------------------------------------------------------------------------------------
# Non-finite losses

@pytest.fixture(scope="module")
def busi_bank():
    "Cached activations and labels of 12 real BUSI images per class at 64 pixels, shared by the tests of this module."
    busi_dir = require(DATA / "busi", "BUSI images")
    require_weights()
    table = balance(scan_folder(busi_dir, ("benign", "malignant")), per_class=12, seed=0)
    images = load_images(table, 64, use_cache=False).images
    cfg = bank_config()
    return build_bank(create_model(cfg), images, N_BLOCKS - cfg.unfreeze_blocks, cfg.bank_views, cfg.seed), table.labels


def require_weights() -> Path:
    return require(WEIGHTS, "MobileNetV3-Small ImageNet weights")


def bank_config(**changes) -> Config:
    values = dict(weights="imagenet", weights_path=str(WEIGHTS), image_size=64, batch_size=8, bank_views=2,
                  phase1_epochs=2, phase2_epochs=0, val_fraction=0.25, device="cpu")
    values.update(changes)
    return Config(**values)


def poison_loss(monkeypatch, after_calls: int, value: float) -> dict:
    "Make ArcFace training losses (gradient enabled) equal `value` from call `after_calls + 1` on; count the calls."
    calls = {"training": 0}
    original = ArcFaceHead.loss

    def loss(self, embeddings, labels):
        result = original(self, embeddings, labels)
        if torch.is_grad_enabled():
            calls["training"] += 1
            if calls["training"] > after_calls:
                return result * value if math.isnan(value) else result + value
        return result

    monkeypatch.setattr(ArcFaceHead, "loss", loss)
    return calls


def state_of(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_loss_keeps_last_good_weights(busi_bank, monkeypatch, value):
    bank, labels = busi_bank
    train = np.arange(len(labels))
    calls = poison_loss(monkeypatch, after_calls=10**9, value=value)
    clean = train_embedding(bank_config(phase1_epochs=2), labels, train, bank=bank, progress=False)
    steps_in_two_epochs = calls["training"]

    calls = poison_loss(monkeypatch, after_calls=steps_in_two_epochs, value=value)
    poisoned = train_embedding(bank_config(phase1_epochs=3), labels, train, bank=bank, progress=False)

    assert [h["epoch"] for h in poisoned.history] == [1, 2]
    assert poisoned.notes[-1].startswith("phase 1 epoch 3: non-finite loss; stopped the phase and kept the weights of "
                                         "the epoch with validation loss ")
    assert calls["training"] == steps_in_two_epochs + 1  # the phase stopped at the first bad step
    assert_same_state(state_of(poisoned.model), state_of(clean.model))
    assert_same_state(state_of(poisoned.head), state_of(clean.head))


def test_nonfinite_loss_from_first_step(busi_bank, monkeypatch):
    bank, labels = busi_bank
    cfg = bank_config(phase1_epochs=2, phase2_epochs=2)
    initial = state_of(create_model(cfg))
    poison_loss(monkeypatch, after_calls=0, value=math.nan)

    result = train_embedding(cfg, labels, np.arange(len(labels)), bank=bank, progress=False)

    assert result.history == []
    assert [note.split(":")[0] for note in result.notes] == ["phase 1 epoch 1", "phase 2 epoch 1"]
    assert all("non-finite loss; stopped the phase and kept the weights the phase started with" in note
               for note in result.notes), result.notes
    assert_same_state(state_of(result.model), initial)


def test_nonfinite_weights_without_validation_split(busi_bank, monkeypatch):
    # Without a validation split the best weights are those after an epoch's last step, whose result no loss has
    # seen yet. A step that overflows the weights must not become the "best" state.
    bank, labels = busi_bank
    cfg = bank_config(phase1_epochs=3, val_fraction=0.0)
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    original_step = torch.optim.AdamW.step
    steps = {"n": 0}

    def step(self, *args, **kwargs):
        out = original_step(self, *args, **kwargs)
        steps["n"] += 1
        if steps["n"] == steps_per_epoch:  # the last step of epoch 1 overflows
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(math.inf)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    result = train_embedding(cfg, labels, np.arange(len(labels)), bank=bank, progress=False)

    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values() if v.is_floating_point())
    assert any("non-finite" in note for note in result.notes), result.notes


def test_full_run_reports_skips_noise_and_nonfinite_loss(busi_dir, tmp_path, monkeypatch):
    require_weights()
    data = link_busi(busi_dir, tmp_path / "data", {"benign": 8, "malignant": 8})
    expected = write_broken_variants(busi_dir, tmp_path / "broken")
    for name, number in (("truncated.png", 901), ("empty.png", 902)):
        (tmp_path / "broken" / name).rename(data / "benign" / f"benign ({number}).png")
    for name, number in (("notes.png", 901), ("damaged header.png", 902)):
        (tmp_path / "broken" / name).rename(data / "malignant" / f"malignant ({number}).png")
    poison_loss(monkeypatch, after_calls=0, value=math.nan)
    tsne_map = crossval.tsne_map

    def tsne_one_thread(*args, **kwargs):
        # Many tiny OpenMP steps make t-SNE take up to a minute on a busy machine; the figures are not checked here.
        with threadpool_limits(1, user_api="openmp"):
            return tsne_map(*args, **kwargs)

    monkeypatch.setattr(crossval, "tsne_map", tsne_one_thread)
    # min_cluster_size 50 is clipped to the 8 points of a fold, so HDBSCAN finds no cluster and marks all noise.
    cfg = small_config(tmp_path, data, hdbscan_min_cluster_size=50)

    summary = run_crossval(cfg, progress=False)

    out = Path(cfg.output_dir)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["skipped_images"] == summary["skipped_images"] == 4
    assert {(Path(s["path"]).name, s["reason"][:30]) for s in saved["skipped"]} == {
        ("benign (901).png", expected["truncated.png"][:30]), ("benign (902).png", expected["empty.png"][:30]),
        ("malignant (901).png", expected["notes.png"][:30]), ("malignant (902).png", expected["damaged header.png"][:30])}
    assert saved["images"] == 16
    assert saved["per_class"] == {"benign": 8, "malignant": 8}

    assert saved["hdbscan"]["missing"] == {f"fold {f}": {"silhouette": "silhouette needs at least 2 clusters, got 0"}
                                           for f in (0, 1)}
    assert saved["hdbscan"]["silhouette"] == {"mean": None, "std": None, "n": 0}
    assert saved["hdbscan"]["accuracy"] == {"mean": 0.0, "std": 0.0, "n": 2}
    assert saved["hdbscan"]["noise_fraction"]["mean"] == 1.0
    rows = (out / "hdbscan_folds.csv").read_text().splitlines()
    assert rows[0] == "fold,accuracy,f1,ari,nmi,silhouette,noise_fraction,n_clusters"
    assert rows[1:] == ["0,0.0,0.0,0.0,0.0,,1.0,0", "1,0.0,0.0,0.0,0.0,,1.0,0"]
    assert json.loads((out / "folds" / "fold_00.json").read_text())["hdbscan"]["silhouette"] is None

    for fold in (0, 1):
        notes = saved["notes"][f"fold {fold}"]
        assert [note.split(":")[0] for note in notes] == ["phase 1 epoch 1", "phase 2 epoch 1"], notes
        assert all("non-finite loss" in note for note in notes)


# ---------------------------------------------------------------------------------------------------------------
# Damaged caches and interrupted writes

@pytest.fixture
def cached_busi(busi_dir, tmp_path):
    "Four real BUSI images decoded at 32 pixels into a cache in tmp_path: (table, first load, cache folder)."
    table = scan_folder(link_busi(busi_dir, tmp_path / "data", {"benign": 2, "malignant": 2}))
    first = load_images(table, 32, cache_dir=tmp_path / "cache")
    assert first.cache_file is not None and first.cache_file.exists()
    return table, first, tmp_path / "cache"


def damage_flip_byte(array_file: Path, meta_file: Path) -> None:
    with open(array_file, "r+b") as f:
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0x01]))


def damage_truncate(array_file: Path, meta_file: Path) -> None:
    array_file.write_bytes(array_file.read_bytes()[:5000])


def damage_no_meta(array_file: Path, meta_file: Path) -> None:
    meta_file.unlink()  # as left by a run killed between writing the array and its JSON


def damage_meta_garbage(array_file: Path, meta_file: Path) -> None:
    meta_file.write_text('{"checksum": "abc", "ok": [tru')


def damage_meta_wrong_length(array_file: Path, meta_file: Path) -> None:
    meta = json.loads(meta_file.read_text())
    meta["ok"] = meta["ok"][:-1]
    meta_file.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, warning", [
    (damage_flip_byte, "does not match its checksum (corrupted or partly written); rebuilding it."),
    (damage_truncate, "is unreadable (ValueError: "),
    (damage_no_meta, None),
    (damage_meta_garbage, "is unreadable (JSONDecodeError: "),
    (damage_meta_wrong_length, "does not fit the request (array shape (4, 32, 32, 3), 3 per-file flags; expected 4 "
                               "images of side 32); rebuilding it."),
])
def test_damaged_cache_rebuilt(cached_busi, bcembed_warnings, damage, warning):
    table, first, _ = cached_busi
    meta_file = first.cache_file.with_suffix(".json")
    expected = np.asarray(first.images).copy()
    damage(first.cache_file, meta_file)
    bcembed_warnings.clear()

    rebuilt = load_images(table, 32, cache_dir=first.cache_file.parents[1])

    np.testing.assert_array_equal(np.asarray(rebuilt.images), expected)
    if warning is not None:
        assert any(str(first.cache_file) in m and warning in m for m in bcembed_warnings.messages), bcembed_warnings.messages
    # The rebuilt cache is whole again: the next call reads it without a warning.
    bcembed_warnings.clear()
    again = load_images(table, 32, cache_dir=first.cache_file.parents[1])
    np.testing.assert_array_equal(np.asarray(again.images), expected)
    assert bcembed_warnings.messages == []


def test_cache_folder_not_writable(busi_dir, tmp_path, bcembed_warnings):
    table = scan_folder(link_busi(busi_dir, tmp_path / "data", {"benign": 1, "malignant": 1}))
    (tmp_path / "cache").write_text("a file where the cache folder should be")

    loaded = load_images(table, 32, cache_dir=tmp_path / "cache")

    assert loaded.cache_file is None
    assert len(loaded.table) == 2
    np.testing.assert_array_equal(loaded.images[0], load_image(table.paths[0], 32))
    assert any("Cannot write the image cache" in m and "continuing without it" in m for m in bcembed_warnings.messages)


def truncate_bank(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def flip_bank_byte(path: Path) -> None:
    "Flip one bit in the middle of the largest tensor stored in the bank's zip file."
    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    header = entry.header_offset
    name_length = int.from_bytes(data[header + 26:header + 28], "little")
    extra_length = int.from_bytes(data[header + 28:header + 30], "little")
    data[header + 30 + name_length + extra_length + entry.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    truncate_bank,
    flip_bank_byte,
])
def test_damaged_bank_cache_rebuilt(busi_dir, tmp_path, damage):
    require_weights()
    table = scan_folder(link_busi(busi_dir, tmp_path / "data", {"benign": 4, "malignant": 4}))
    images = load_images(table, 64, use_cache=False).images
    cfg = bank_config(cache_dir=str(tmp_path / "cache"))
    first = cached_bank(cfg, images)
    (path,) = (tmp_path / "cache" / "banks").glob("*.pt")
    damage(path)

    again = cached_bank(cfg, images)

    for name in ("clean", "views", "pooled"):
        assert torch.equal(getattr(again, name), getattr(first, name)), name


@pytest.mark.parametrize("write", [
    lambda path: atomic_write_bytes(path, b"new content"),
    lambda path: atomic_torch_save(path, {"model": {"w": torch.ones(2)}}),
])
def test_interrupted_write_keeps_old_file(tmp_path, monkeypatch, write):
    target = tmp_path / "result.bin"
    target.write_bytes(b"old content")

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left on device"):
        write(target)

    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.bin"]  # no temporary file left behind
