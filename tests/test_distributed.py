"""Multi-process training under torchrun with gloo: it runs, and its embeddings cluster as well as one process's."""
import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    from bcembed.core import Config, setup_logging
    from bcembed.crossval import run_crossval
    setup_logging()
    run_crossval(Config.from_dict(json.loads(sys.argv[1])), progress=False)
""")


def run_experiment(tmp_path, name, config, processes):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    config = dict(config, output_dir=str(tmp_path / name))
    if processes == 1:
        command = [sys.executable, str(script), json.dumps(config)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(script), json.dumps(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / name / "summary.json").read_text()), done.stderr


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path, busi_dir, weights_file):
    config = {"data_dir": str(busi_dir), "per_class": 40, "folds": 2, "weights_path": str(weights_file),
              "phase1_epochs": 6, "phase2_epochs": 3, "batch_size": 32, "bank_views": 2, "k_max": 4,
              "cache_dir": str(tmp_path / "cache"), "device": "cpu", "val_fraction": 0.0}
    single, _ = run_experiment(tmp_path, "one", config, 1)
    # A cache of its own, so that the two processes start without a feature bank: the first builds it, the
    # second loads it from the cache folder once the first has written it.
    double, log = run_experiment(tmp_path, "two", dict(config, cache_dir=str(tmp_path / "cache-two")), 2)
    assert "rank 1 of 2" in log, log[-2000:]
    assert log.count("Loaded the feature bank") == 1, log[-2000:]
    single_accuracy = single["kmeans"]["accuracy"]["mean"]
    double_accuracy = double["kmeans"]["accuracy"]["mean"]
    # Both processes see the same global batches; only batch-norm statistics are computed on half batches.
    assert abs(single_accuracy - double_accuracy) <= 0.1, (single_accuracy, double_accuracy)
    assert double_accuracy >= 0.6, double_accuracy
