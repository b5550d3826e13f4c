"""Measure the caches against the plain loop on real images, side by side in one run.

Cases (each runs in its own subprocess so that its peak memory is its own):
  embed     images/s of `bcembed.training.embed` from the uint8 image cache, against the bare model forward on
            tensors that are already decoded, normalised and batched (the ceiling data handling can reach)
  fold      one fold's training and scoring with mode="cached" and with mode="plain", same fold, same epochs
  protocol  the whole K-fold protocol for each mode in --protocol-modes (default: cached), on the same folds
            (wall time, per-fold and mean K-Means accuracy)

Usage:
  python benchmarks/bench_training.py embed fold --data ../shared/data/kaggle-busi-aug --epochs 5 5
  python benchmarks/bench_training.py protocol --data ../shared/data/kaggle-busi-aug --group-by none
  python benchmarks/bench_training.py protocol --protocol-modes cached plain --per-class 1000 --epochs 5 5
Prints one JSON line per case and the ratios; --json FILE also writes them.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case_embed(args) -> dict:
    import numpy as np
    import torch
    from bcembed.core import Config, set_threads
    from bcembed.data import balance, load_images, scan_folder, to_model_input
    from bcembed.training import create_model, embed
    threads = set_threads()
    cfg = Config(data_dir=args.data, weights_path=args.weights, per_class=args.per_class)
    loaded = load_images(balance(scan_folder(cfg.data_dir, cfg.classes), cfg.per_class, 0), cache_dir=args.cache_dir)
    images = loaded.images[: args.embed_images]
    model = create_model(cfg).eval()
    batch = args.batch_size
    tensors = [to_model_input(np.asarray(images[i:i + batch])) for i in range(0, len(images), batch)]
    embed(model, np.arange(batch), images=images, batch_size=batch)  # warm-up
    with torch.inference_mode():
        model(tensors[0])
        start = time.perf_counter()
        for x in tensors:
            model(x)
        bare = time.perf_counter() - start
    start = time.perf_counter()
    embed(model, np.arange(len(images)), images=images, batch_size=batch)
    full = time.perf_counter() - start
    return {"case": "embed", "images": len(images), "threads": threads, "batch_size": batch,
            "bare_forward_images_per_s": len(images) / bare, "embed_images_per_s": len(images) / full,
            "fraction_of_bare": bare / full, "peak_rss_mib": peak_rss_mib()}


def case_fold(args, mode) -> dict:
    import numpy as np
    from bcembed.core import Config, set_threads
    from bcembed.crossval import prepare_data, run_fold
    from bcembed.model import N_BLOCKS
    from bcembed.training import build_bank, create_model
    set_threads()
    cfg = Config(data_dir=args.data, weights_path=args.weights, per_class=args.per_class, group_by=args.group_by,
                 mode=mode, phase1_epochs=args.epochs[0], phase2_epochs=args.epochs[1], cache_dir=args.cache_dir,
                 bank_views=args.bank_views, unfreeze_blocks=args.unfreeze_blocks, patience=10**6).check()
    data = prepare_data(cfg, progress=False)
    start = time.perf_counter()
    bank = None
    if mode == "cached":
        bank = build_bank(create_model(cfg), data["images"], N_BLOCKS - cfg.unfreeze_blocks, cfg.bank_views, cfg.seed,
                          cfg.rotation, cfg.zoom)
    bank_seconds = time.perf_counter() - start
    record = run_fold(cfg, 0, data["folds"], data["table"].labels, images=None if bank else data["images"], bank=bank,
                      groups=data["groups"] if cfg.group_by == "source" else None, progress=False)
    seconds = time.perf_counter() - start
    return {"case": f"fold-{mode}", "images": len(data["table"]), "epochs": args.epochs, "bank_seconds": bank_seconds,
            "seconds": seconds, "kmeans_accuracy": record["kmeans_scores"]["accuracy"],
            "train_images": int((data["folds"] != 0).sum()), "peak_rss_mib": peak_rss_mib()}


def case_protocol(args, mode) -> dict:
    import csv
    import shutil
    from bcembed.core import Config, set_threads
    from bcembed.crossval import run_crossval
    set_threads()
    out = Path(args.output or f"runs/bench-protocol-{args.group_by}") / mode
    if out.exists():
        shutil.rmtree(out)  # a resumed run would read finished folds back and time nothing
    cfg = Config(data_dir=args.data, weights_path=args.weights, per_class=args.per_class, group_by=args.group_by,
                 mode=mode, folds=args.folds, output_dir=str(out), cache_dir=args.cache_dir, bank_views=args.bank_views,
                 unfreeze_blocks=args.unfreeze_blocks, phase1_epochs=args.epochs[0], phase2_epochs=args.epochs[1]).check()
    if mode == "cached":  # time the feature bank too, so delete a bank that an earlier run left in the cache
        from bcembed.crossval import prepare_data
        from bcembed.training import bank_cache_path
        bank_cache_path(cfg, prepare_data(cfg, progress=False)["images"]).unlink(missing_ok=True)
    start = time.perf_counter()
    summary = run_crossval(cfg, progress=False)
    seconds = time.perf_counter() - start
    with open(out / "kmeans_folds.csv", newline="") as f:
        per_fold = [float(row["accuracy"]) for row in csv.DictReader(f)]
    return {"case": f"protocol-{mode}", "images": summary["images"], "folds": summary["folds"], "epochs": args.epochs,
            "unfreeze_blocks": args.unfreeze_blocks, "seconds": seconds, "fold_seconds": summary["fold_seconds"],
            "kmeans_accuracy": summary["kmeans"]["accuracy"], "kmeans_accuracy_per_fold": per_fold,
            "peak_rss_mib": peak_rss_mib(), "output_dir": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+",
                        choices=["embed", "fold", "protocol", "_embed", "_fold-cached", "_fold-plain", "_protocol-cached",
                                 "_protocol-plain"])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/kaggle-busi-aug"), help="labelled image folder")
    parser.add_argument("--weights", default=str(REPO.parent / "shared/weights/mobilenet_v3_small_imagenet1k_v1_features.pth"))
    parser.add_argument("--per-class", type=int, default=None, help="images per class (default: smallest class)")
    parser.add_argument("--group-by", default="none", choices=["none", "source"])
    parser.add_argument("--epochs", type=int, nargs=2, default=[15, 15], help="phase 1 and phase 2 epochs")
    parser.add_argument("--folds", type=int, default=10, help="folds of the protocol case")
    parser.add_argument("--bank-views", type=int, default=4)
    parser.add_argument("--unfreeze-blocks", type=int, default=4)
    parser.add_argument("--embed-images", type=int, default=2048, help="images timed in the embed case")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of the embed case")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--protocol-modes", nargs="+", default=["cached"], choices=["cached", "plain"],
                        help="training modes the protocol case runs, one after the other on the same folds")
    parser.add_argument("--output", default=None,
                        help="output folder of the protocol case; each mode writes to a subfolder named after it")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    internal = [c for c in args.cases if c.startswith("_")]
    if internal:
        case = internal[0]
        result = {"_embed": lambda: case_embed(args), "_fold-cached": lambda: case_fold(args, "cached"),
                  "_fold-plain": lambda: case_fold(args, "plain"),
                  "_protocol-cached": lambda: case_protocol(args, "cached"),
                  "_protocol-plain": lambda: case_protocol(args, "plain")}[case]()
        print("RESULT " + json.dumps(result), flush=True)
        return

    passthrough = [a for a in sys.argv[1:] if a not in args.cases]
    results = []
    subcases = {"embed": ["_embed"], "fold": ["_fold-cached", "_fold-plain"],
                "protocol": [f"_protocol-{mode}" for mode in args.protocol_modes]}
    for case in args.cases:
        for sub in subcases[case]:
            done = subprocess.run([sys.executable, __file__, sub, *passthrough], capture_output=True, text=True,
                                  env=dict(os.environ, MPLBACKEND="Agg"))
            lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if done.returncode or not lines:
                sys.exit(f"case {sub} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(lines[-1][7:]))
            print(json.dumps(results[-1]), flush=True)
    by_case = {r["case"]: r for r in results}
    if "fold-cached" in by_case and "fold-plain" in by_case:
        cached, plain = by_case["fold-cached"], by_case["fold-plain"]
        print(f"one fold: cached {cached['seconds']:.0f} s (bank {cached['bank_seconds']:.0f} s) vs plain {plain['seconds']:.0f} s "
              f"-> {plain['seconds'] / cached['seconds']:.1f}x faster; K-Means accuracy cached {cached['kmeans_accuracy']:.3f}, "
              f"plain {plain['kmeans_accuracy']:.3f}")
    if "protocol-cached" in by_case and "protocol-plain" in by_case:
        cached, plain = by_case["protocol-cached"], by_case["protocol-plain"]
        gaps = [c - p for c, p in zip(cached["kmeans_accuracy_per_fold"], plain["kmeans_accuracy_per_fold"])]
        print(f"{cached['folds']} folds: cached {cached['seconds']:.0f} s vs plain {plain['seconds']:.0f} s "
              f"-> {plain['seconds'] / cached['seconds']:.1f}x faster; mean K-Means accuracy cached "
              f"{cached['kmeans_accuracy']['mean']:.3f}, plain {plain['kmeans_accuracy']['mean']:.3f} "
              f"(cached minus plain per fold: {', '.join(f'{g:+.3f}' for g in gaps)})")
    if "embed" in by_case:
        e = by_case["embed"]
        print(f"embedding: {e['embed_images_per_s']:.0f} images/s = {e['fraction_of_bare']:.2f} of the bare forward "
              f"({e['bare_forward_images_per_s']:.0f} images/s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
