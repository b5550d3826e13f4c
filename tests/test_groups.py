"""Integration tests of bcembed.groups on real BUSI and Kaggle images.

The data folder is ../shared/data next to the repository, or the folder in $BCEMBED_DATA. Tests that need a
data set skip with the path they looked for when it is absent.
"""
from __future__ import annotations

import io
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from bcembed.groups import (DEFAULT_MAX_DISTANCE, label_conflicts, make_folds, near_duplicate_pairs,
                            perceptual_hashes, source_groups, source_id_from_name)

DATA = Path(os.environ.get("BCEMBED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
BUSI = DATA / "busi"
KAGGLE = DATA / "kaggle-busi-aug"

# Six BUSI images without a near-duplicate in BUSI. Benign (102) is one of the RGB files with a colour overlay.
DISTINCT_SOURCES = ["benign/benign (100).png", "benign/benign (102).png", "malignant/malignant (1).png",
                    "malignant/malignant (100).png", "normal/normal (10).png", "normal/normal (100).png"]


def require(folder: Path) -> None:
    if not folder.is_dir():
        pytest.skip(f"real data not found at {folder}. Set BCEMBED_DATA to the folder containing busi/ and kaggle-busi-aug/.")


def to_224(image: Image.Image) -> np.ndarray:
    "Decode as the image cache does: 8-bit RGB squashed to 224 x 224."
    return np.asarray(image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


# Edits applied to the full-resolution file. Each result is then decoded at 224 like a real copy.
EDITS = {
    "rotate 90": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "rotate 180": lambda im: im.transpose(Image.Transpose.ROTATE_180),
    "rotate 270": lambda im: im.transpose(Image.Transpose.ROTATE_270),
    "flip left-right": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "flip top-bottom": lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    "resize to 40%": lambda im: im.resize((im.width * 2 // 5, im.height * 2 // 5), Image.Resampling.BICUBIC),
    "resize to 300x300": lambda im: im.resize((300, 300), Image.Resampling.BILINEAR),
    "sharpen": lambda im: im.filter(ImageFilter.SHARPEN),
    "gaussian blur r=1": lambda im: im.filter(ImageFilter.GaussianBlur(1)),
    "median 3x3": lambda im: im.filter(ImageFilter.MedianFilter(3)),
    "jpeg q=50": lambda im: jpeg(im, 50),
    "rotate 90 + sharpen + jpeg q=75": lambda im: jpeg(im.transpose(Image.Transpose.ROTATE_90).filter(ImageFilter.SHARPEN), 75),
}
# Edits applied after decoding at 224, where a filter changes more of the hashed low frequencies.
EDITS_AT_224 = {
    "sharpen twice at 224": lambda im: im.filter(ImageFilter.SHARPEN).filter(ImageFilter.SHARPEN),
    "median 3x3 at 224": lambda im: im.filter(ImageFilter.MedianFilter(3)),
    "jpeg q=50 at 224": lambda im: jpeg(im, 50),
}


@pytest.fixture(scope="module")
def busi_copies():
    "Return (images, source index per image, description per image) for the sources and their edited copies."
    require(BUSI)
    images, source_of, description = [], [], []
    for source, relative in enumerate(DISTINCT_SOURCES):
        with Image.open(BUSI / relative) as file:
            original = file.convert("RGB")
        decoded = to_224(original)
        images.append(decoded)
        source_of.append(source)
        description.append(relative)
        for name, edit in EDITS.items():
            images.append(to_224(edit(original)))
            source_of.append(source)
            description.append(f"{relative} / {name}")
        for name, edit in EDITS_AT_224.items():
            images.append(to_224(edit(Image.fromarray(decoded))))
            source_of.append(source)
            description.append(f"{relative} / {name}")
    return np.stack(images), np.array(source_of), description


def test_edited_copies_join_source_group(busi_copies):
    images, source_of, description = busi_copies
    anonymous = [f"image-{i}.png" for i in range(len(images))]  # names carry no source, so only pixels can join
    groups = source_groups(anonymous, images, use_names=False)
    originals = np.flatnonzero([d in DISTINCT_SOURCES for d in description])
    for index in range(len(images)):
        expected = groups[originals[source_of[index]]]
        assert groups[index] == expected, f"{description[index]} is in group {groups[index]}, its source in {expected}"


def test_distinct_sources_stay_apart(busi_copies):
    images, source_of, description = busi_copies
    groups = source_groups([f"image-{i}.png" for i in range(len(images))], images, use_names=False)
    assert len(np.unique(groups)) == len(DISTINCT_SOURCES), f"{len(DISTINCT_SOURCES)} sources gave groups {groups}"


def test_edited_copies_within_half_threshold(busi_copies):
    # A margin check: every edit stays within half the default threshold of its source, so the default
    # still has room for stronger edits than these.
    images, source_of, description = busi_copies
    hashes = perceptual_hashes(images)
    originals = {source_of[i]: i for i, d in enumerate(description) if d in DISTINCT_SOURCES}
    close = set(near_duplicate_pairs(hashes, DEFAULT_MAX_DISTANCE // 2))
    for index in range(len(images)):
        source = originals[source_of[index]]
        if index != source:
            assert (min(source, index), max(source, index)) in close, f"{description[index]} is over {DEFAULT_MAX_DISTANCE // 2} bits away"


def test_busi_known_duplicates_grouped():
    # Pairs verified by eye: the same image filed twice, once under two classes.
    require(BUSI)
    files = ["benign/benign (226).png", "benign/benign (263).png", "benign/benign (399).png",
             "malignant/malignant (93).png", "benign/benign (100).png"]
    images = []
    for relative in files:
        with Image.open(BUSI / relative) as file:
            images.append(to_224(file))
    groups = source_groups(files, np.stack(images))
    assert groups[0] == groups[1], "benign (226) and benign (263) are one image"
    assert groups[2] == groups[3], "benign (399) and malignant (93) are one image"
    assert len(np.unique(groups)) == 3, f"groups {groups}"
    conflicts = label_conflicts(groups, [Path(f).parent.name for f in files], files)
    assert [c["classes"] for c in conflicts] == [{"benign": 1, "malignant": 1}]


def test_kaggle_grouped_folds_keep_sources_together():
    require(KAGGLE)
    paths = sorted(KAGGLE.rglob("*.jpg"))
    assert len(paths) == 6000, f"expected the 6,000-image sample, found {len(paths)} files under {KAGGLE}"
    labels = np.array([p.parent.name for p in paths])
    sources = np.array([source_id_from_name(p) for p in paths])
    assert (sources != None).all(), "every Kaggle file name should carry its BUSI source"  # noqa: E711

    groups = source_groups(paths, use_pixels=False)
    assert len(np.unique(groups)) == 496
    folds = make_folds(labels, groups, n_folds=10, seed=0)
    folds_of_source = defaultdict(set)
    for source, fold in zip(sources, folds):
        folds_of_source[source].add(int(fold))
    straddling = sorted(s for s, f in folds_of_source.items() if len(f) > 1)
    assert straddling == [], f"sources in more than one fold: {straddling[:10]}"
    for fold in range(10):
        assert set(labels[folds == fold]) == {"benign", "malignant"}, f"fold {fold} lacks a class"
        share = (labels[folds == fold] == "malignant").mean()
        assert abs(share - 0.5) <= 0.05, f"fold {fold} is {share:.3f} malignant, overall 0.5"


def test_kaggle_random_folds_leak():
    # The ungrouped split that the grouped one replaces: nearly every source straddles folds.
    require(KAGGLE)
    paths = sorted(KAGGLE.rglob("*.jpg"))
    labels = np.array([p.parent.name for p in paths])
    folds = make_folds(labels, n_folds=10, seed=0)
    folds_of_source = defaultdict(set)
    for path, fold in zip(paths, folds):
        folds_of_source[source_id_from_name(path)].add(int(fold))
    straddling = sum(len(f) > 1 for f in folds_of_source.values())
    assert straddling >= 0.9 * len(folds_of_source), f"only {straddling} of {len(folds_of_source)} sources straddle folds"
