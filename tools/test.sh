#!/usr/bin/env bash
# Set up the environment, then run the notebook tests (nbdev_test) and the pytest suite.
# BCEMBED_REQUIRE_SHARED=1 turns skips for a missing ../shared folder into failures (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
venv=${BCEMBED_VENV:-.venv}
export PATH="$PWD/$venv/bin:$PATH" MPLBACKEND=Agg PYTHONUNBUFFERED=1
export BCEMBED_CACHE=${BCEMBED_CACHE:-$PWD/.cache/bcembed}

echo "== notebook tests (nbdev_test)"
nbdev_test --n_workers 1 --timing
echo "== pytest"
python -m pytest tests "$@"
