"""Cluster the mean direction of several finished runs' held-out embeddings, fold by fold.

Every run must hold out the same images in the same folds (same data, seed, folds and grouping; training settings
may differ). For each fold the script reads each run's saved embeddings (`folds/fold_NN.npz`), averages their unit
vectors image by image, and clusters and scores the result as a run does. It reports every combination of the
runs, so one table shows what averaging one, two or more sets of networks gives. No network is trained or loaded.

Usage:
  python benchmarks/combine_runs.py runs/a runs/b runs/c [--json out.json]
"""
import argparse
import csv
import itertools
import json
import logging
from pathlib import Path

import numpy as np

from bcembed.core import Config
from bcembed.crossval import cluster_embeddings, load_fold


def held_out(run: Path, folds: int) -> dict:
    "Map each held-out image's path to (fold, label, unit embedding) for one finished run, in the run's order."
    rows = list(csv.DictReader(open(run / "fold_assignments.csv", newline="", encoding="utf-8")))
    images = {}
    for fold in range(folds):
        saved = load_fold(run, fold)
        if saved is None:
            raise SystemExit(f"{run} has no finished fold {fold}; finish the run first (rerun its command to resume).")
        for i, z in zip(saved["index"], saved["embeddings"]):
            images[rows[i]["path"]] = (fold, rows[i]["label"], z / np.linalg.norm(z))
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="output folders of finished runs on the same folds")
    parser.add_argument("--json", help="also write the table to this JSON file")
    args = parser.parse_args()
    runs = [Path(r) for r in args.runs]
    cfg = Config.from_dict(json.loads((runs[0] / "config.json").read_text())["config"])
    logging.getLogger("bcembed").setLevel(logging.ERROR)  # the PCA size warnings repeat for every combination
    per_run = [held_out(run, cfg.folds) for run in runs]
    reference = per_run[0]
    for run, images in zip(runs[1:], per_run[1:]):
        if {p: v[:2] for p, v in images.items()} != {p: v[:2] for p, v in reference.items()}:
            raise SystemExit(f"Invalid run {run}: its held-out images or folds differ from those of {runs[0]}. Combine "
                             "runs with the same data, seed, folds and grouping.")
    names = sorted({label for _, label, _ in reference.values()})
    results = []
    for size in range(1, len(runs) + 1):
        for combo in itertools.combinations(range(len(runs)), size):
            accuracies = []
            for fold in range(cfg.folds):
                # The run's own order: K-Means initialisation depends on the order of the points.
                paths = [p for p, v in reference.items() if v[0] == fold]
                labels = np.array([names.index(reference[p][1]) for p in paths])
                mean = np.mean([np.stack([per_run[r][p][2] for p in paths]) for r in combo], axis=0)
                accuracies.append(cluster_embeddings(cfg, mean, labels)["kmeans_scores"]["accuracy"])
            results.append({"runs": [str(runs[r]) for r in combo], "kmeans_accuracy_mean": round(float(np.mean(accuracies)), 4),
                            "kmeans_accuracy_per_fold": [round(a, 3) for a in accuracies]})
            print(f"{np.mean(accuracies):.3f}  " + " + ".join(str(runs[r]) for r in combo), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
