"""Score the fold models of a finished run with and without mirror-image averaging of the held-out embeddings.

Reads <run>/config.json and <run>/models/fold_NN.pt, embeds each held-out fold both ways, and clusters and
scores the embeddings exactly as the run did. This isolates what `flip_average` adds to the same trained models.
For a run with `ensemble_size` > 1, both ways use the whole ensemble; `--each-network` also scores every network
of the ensemble alone (with the run's own `flip_average`), which shows what averaging the networks adds.

Usage:
  python benchmarks/rescore_flip.py runs/busi-plain-flip [--each-network]
Prints one JSON line with the per-fold and mean K-Means accuracy of each embedding.
"""
import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from bcembed.core import Config, set_threads
from bcembed.crossval import cluster_embeddings, ensemble_embed, load_fold_model, prepare_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="output folder of a finished run, with its models/ folder")
    parser.add_argument("--each-network", action="store_true", help="also score every network of an ensemble alone")
    args = parser.parse_args()
    run = Path(args.run)
    saved = json.loads((run / "config.json").read_text())["config"]
    known = {f.name for f in dataclasses.fields(Config)}
    cfg = Config.from_dict({k: v for k, v in saved.items() if k in known})
    set_threads()
    data = prepare_data(cfg, progress=False)
    labels, folds, images = data["table"].labels, data["folds"], data["images"]
    ways = {"without_flip": (None, False), "with_flip": (None, True)}
    if args.each_network:
        ways.update({f"network_{m}": (m, cfg.flip_average) for m in range(cfg.ensemble_size)})
    scores = {name: [] for name in ways}
    for fold in range(cfg.folds):
        checkpoint = run / "models" / f"fold_{fold:02d}.pt"
        models = [load_fold_model(checkpoint, cfg, network=m)[0] for m in range(cfg.ensemble_size)]
        index = np.flatnonzero(folds == fold)
        for name, (network, flip) in ways.items():
            chosen = models if network is None else [models[network]]
            embeddings = ensemble_embed(chosen, index, images=images, flip_average=flip)
            scores[name].append(cluster_embeddings(cfg, embeddings, labels[index])["kmeans_scores"]["accuracy"])
    print(json.dumps({"run": str(run), "flip_average_in_run": cfg.flip_average, "ensemble_size": cfg.ensemble_size,
                      **{f"{name}_mean": round(float(np.mean(values)), 4) for name, values in scores.items()},
                      **{f"{name}_per_fold": [round(v, 3) for v in values] for name, values in scores.items()}}))


if __name__ == "__main__":
    main()
