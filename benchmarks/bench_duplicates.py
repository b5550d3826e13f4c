"""Measure the near-duplicate detector on the real BUSI and Kaggle folders and print what it finds.

Usage: python benchmarks/bench_duplicates.py [--data DIR] [--max-distance BITS] [--hash-size H] [--out DIR]

For each data set the script decodes every image at 224 x 224 with PIL, hashes it, finds near-duplicate pairs
and groups the images. It prints the decode, hash and pair times separately, the group counts, and the
label conflicts with their file names. For the Kaggle set it also prints the Hamming distances of true
copies and of different sources, the numbers behind the default threshold.
"""
from __future__ import annotations

import argparse
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from bcembed.core import usable_cores
from bcembed.groups import (DEFAULT_HASH_SIZE, DEFAULT_MAX_DISTANCE, duplicates_report, label_conflicts,
                            near_duplicate_pairs, perceptual_hashes, source_groups, source_id_from_name)

KAGGLE_SOURCES = 496  # BUSI images the Kaggle set was built from (286 benign, 210 malignant)


def decode(path: Path, size: int = 224) -> np.ndarray:
    "Decode one file to a size x size x 3 uint8 array, as the training pipeline's cache holds it."
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


def scan(folder: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    "List the images under `folder`; the label is the name of the parent folder (the class)."
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"}
                   and "_mask" not in p.name)
    class_names = sorted({p.parent.name for p in paths})
    labels = np.array([class_names.index(p.parent.name) for p in paths])
    return paths, labels, class_names


def timed(label: str, count: int, function, *args, **kwargs):
    "Run `function`, print its wall time and throughput, and return its result."
    start = time.perf_counter()
    result = function(*args, **kwargs)
    seconds = time.perf_counter() - start
    print(f"  {label:<24s} {seconds:7.2f} s  ({count / seconds:7.0f} images/s)")
    return result


def group_counts(groups: np.ndarray) -> str:
    "Summarise a group array as counts of groups, groups with copies and the largest group."
    sizes = np.bincount(groups)
    return (f"{len(sizes)} groups, {(sizes > 1).sum()} with >1 image containing {sizes[sizes > 1].sum()} images, "
            f"largest {sizes.max()}")


def print_conflicts(conflicts: list[dict]) -> None:
    "Print each label conflict as its sources (or file names), their classes and image counts."
    print(f"  label conflicts: {len(conflicts)} groups")
    for conflict in conflicts:
        members = Counter((source_id_from_name(f["path"]) or Path(f["path"]).name, f["label"]) for f in conflict["files"])
        listed = ", ".join(f"{source} [{label}] x{count}" for (source, label), count in sorted(members.items()))
        print(f"    group {conflict['group']}: {listed}")


def pair_distances(hashes: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    "Return the detector's distance (minimum over the 8 transforms of `first`) for each pair of indices."
    xor = hashes[first][:, :, :] ^ hashes[second][:, None, 0, :]
    return np.bitwise_count(xor).sum(-1).min(1)


def kaggle_distances(paths: list[Path], hashes: np.ndarray) -> None:
    "Print Hamming distances of copies of one source (by augmentation) and of different sources."
    sources = np.array([source_id_from_name(p) for p in paths])
    rotated = np.array(["rotated" in p.name for p in paths])
    by_source = defaultdict(list)
    for index, source in enumerate(sources):
        by_source[source].append(index)
    plain_pairs = [(i, j) for members in by_source.values() for a, i in enumerate(members) for j in members[a + 1:]
                   if not rotated[i] and not rotated[j]]
    rotated_pairs = [(i, j) for members in by_source.values() for a, i in enumerate(members) for j in members[a + 1:]
                     if rotated[i] != rotated[j]]
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, len(paths), size=(2, 200_000))
    keep = sources[first] != sources[second]
    bits = 64 * hashes.shape[-1]
    print(f"  Hamming distances ({bits}-bit hash; percentiles 1/50/99/max):")
    for label, (a, b) in [("same source, no rotation", np.array(plain_pairs).T),
                          ("same source, one rotated", np.array(rotated_pairs).T),
                          ("different sources (200k)", (first[keep], second[keep]))]:
        distance = pair_distances(hashes, a, b)
        print(f"    {label:<26s} n={len(distance):6d}  {np.percentile(distance, [1, 50, 99]).round(1)}  {distance.max()}")


def run(name: str, folder: Path, max_distance: int, hash_size: int, out: Path | None) -> None:
    "Decode, hash and group one data set, printing times and counts."
    paths, labels, class_names = scan(folder)
    print(f"\n{name}: {len(paths)} images in {folder} (classes {class_names})")
    images = timed("decode at 224 (PIL)", len(paths), lambda: np.stack([decode(p) for p in paths]))
    hashes = timed("perceptual hashes", len(paths), perceptual_hashes, images, hash_size)
    pairs = timed("near-duplicate pairs", len(paths), near_duplicate_pairs, hashes, max_distance)

    by_names = source_groups(paths, use_pixels=False)
    by_pixels = source_groups(paths, use_names=False, hashes=hashes, max_distance=max_distance)
    both = source_groups(paths, hashes=hashes, max_distance=max_distance)
    sources = [source_id_from_name(p) for p in paths]
    across = sum(sources[i] != sources[j] for i, j in pairs)
    print(f"  near-duplicate pairs: {len(pairs)} ({across} between different name ids)")
    print(f"  names only:     {group_counts(by_names)}")
    print(f"  pixels only:    {group_counts(by_pixels)}")
    print(f"  names + pixels: {group_counts(both)}")
    split = Counter(len(set(by_pixels[by_names == g])) > 1 for g in np.unique(by_names))
    print(f"  name sources split over several pixel groups: {split[True]} of {len(np.unique(by_names))}")
    if name == "kaggle-busi-aug":
        print(f"  expected sources: {KAGGLE_SOURCES}; name ids found: {len(set(sources))}")
        kaggle_distances(paths, hashes)
    print_conflicts(label_conflicts(both, labels, [p.relative_to(folder) for p in paths], class_names))
    if out is not None:
        summary = duplicates_report(paths, labels, class_names, images, out / name, root=folder,
                                    max_distance=max_distance, hash_size=hash_size, hashes=hashes)
        print(f"  report written to {out / name} ({summary['pixel_pairs_not_joined_by_names']} pixel pairs "
              "not joined by names)")


def main() -> None:
    default_data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data,
                        help="folder containing busi/ and kaggle-busi-aug/ (default: ../shared/data from the repository)")
    parser.add_argument("--max-distance", type=int, default=DEFAULT_MAX_DISTANCE,
                        help=f"Hamming threshold in bits (default {DEFAULT_MAX_DISTANCE})")
    parser.add_argument("--hash-size", type=int, default=DEFAULT_HASH_SIZE,
                        help=f"pHash side h, giving an h*h-bit hash (default {DEFAULT_HASH_SIZE})")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write duplicates_report files under this folder; they show patient images, so do not commit them")
    args = parser.parse_args()

    print(f"bench_duplicates: hash_size={args.hash_size}, max_distance={args.max_distance}, "
          f"{usable_cores()} usable cores, single-threaded decode and hashing")
    found = False
    for name in ("busi", "kaggle-busi-aug"):
        folder = args.data / name
        if not folder.is_dir():
            print(f"\n{name}: not found at {folder}; skipped")
            continue
        found = True
        run(name, folder, args.max_distance, args.hash_size, args.out)
    if not found:
        raise SystemExit(f"No data set found under {args.data}. Pass --data with the folder containing busi/ "
                         "and kaggle-busi-aug/.")


if __name__ == "__main__":
    main()
