"""Reference scores without training: frozen ImageNet features under the same folds as a bcembed run.

For each fold, a logistic regression is fitted on pooled MobileNetV3-Small features of the training folds (view 0
of the feature bank, no augmentation) and scored on the held-out fold. It is a supervised reference for a linear
read-out. The held-out features are also clustered with the same L2 + PCA + K-Means step as trained embeddings,
which shows what clustering gets without learning. Usage:

  python benchmarks/baseline_frozen.py --data ../shared/data/busi --group-by source
  python benchmarks/baseline_frozen.py --data ../shared/data/kaggle-busi-aug --group-by none
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bcembed.core import Config, set_threads
from bcembed.crossval import cluster_embeddings, prepare_data
from bcembed.metrics import summarize_folds
from bcembed.training import cached_bank

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/busi"), help="labelled image folder")
    parser.add_argument("--weights", default=str(REPO.parent / "shared/weights/mobilenet_v3_small_imagenet1k_v1_features.pth"))
    parser.add_argument("--group-by", default="source", choices=["source", "none"], help="fold protocol")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--unfreeze-blocks", type=int, default=4,
                        help="only selects which cached feature bank to reuse; the pooled features are the same")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    set_threads()
    started = time.perf_counter()
    cfg = Config(data_dir=args.data, weights_path=args.weights, group_by=args.group_by, folds=args.folds,
                 per_class=args.per_class, cache_dir=args.cache_dir, unfreeze_blocks=args.unfreeze_blocks).check()
    data = prepare_data(cfg, progress=False)
    features = cached_bank(cfg, data["images"]).pooled[:, 0].numpy()
    labels, folds = data["table"].labels, data["folds"]

    rows = []
    for fold in range(cfg.folds):
        train, test = folds != fold, folds == fold
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1)).fit(features[train], labels[train])
        clusters = cluster_embeddings(cfg, features[test], labels[test])
        rows.append({"logistic_accuracy": float(probe.score(features[test], labels[test])),
                     "kmeans_accuracy": clusters["kmeans_scores"]["accuracy"], "kmeans_ari": clusters["kmeans_scores"]["ari"]})

    summary = summarize_folds(rows, ("logistic_accuracy", "kmeans_accuracy", "kmeans_ari"))
    result = {"data": args.data, "group_by": args.group_by, "folds": cfg.folds, "images": int(len(labels)),
              "seconds": time.perf_counter() - started, **summary}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
