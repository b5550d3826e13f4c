"""Score one configuration change on the folds of a data set: mean held-out K-Means accuracy over the first N folds.

A quick way to compare settings without writing a full run. Note that choosing settings by these scores tunes on
the evaluation folds; confirm a choice with another seed before trusting it. Example:

  python benchmarks/sweep.py '{"loss": "softmax"}' --folds-run 10 --data ../shared/data/busi
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

from bcembed.core import Config, set_threads
from bcembed.crossval import prepare_data, run_fold
from bcembed.training import cached_bank

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("changes", help="JSON object of Config fields to change, e.g. '{\"margin\": 0.3}'")
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/busi"), help="labelled image folder")
    parser.add_argument("--weights", default=str(REPO.parent / "shared/weights/mobilenet_v3_small_imagenet1k_v1_features.pth"))
    parser.add_argument("--folds-run", type=int, default=10, help="how many of the 10 folds to train and score")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    set_threads()
    cfg = Config(data_dir=args.data, weights_path=args.weights, cache_dir=args.cache_dir, **json.loads(args.changes)).check()
    data = prepare_data(cfg, progress=False)
    started = time.perf_counter()
    bank = cached_bank(cfg, data["images"]) if cfg.mode == "cached" else None
    accuracies = []
    for fold in range(args.folds_run):
        record = run_fold(cfg, fold, data["folds"], data["table"].labels, images=data["images"],
                          bank=bank, groups=data["groups"] if cfg.group_by == "source" else None, progress=False)
        accuracies.append(record["kmeans_scores"]["accuracy"])
    print(json.dumps({"changes": json.loads(args.changes), "seconds": round(time.perf_counter() - started),
                      "kmeans_accuracy_mean": round(float(np.mean(accuracies)), 3),
                      "per_fold": [round(a, 3) for a in accuracies]}))


if __name__ == "__main__":
    main()
