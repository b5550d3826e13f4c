#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv, or $BCEMBED_VENV) with bcembed and its tools.
# An existing environment is reused only when it imports everything and was built from the same setup files.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${BCEMBED_VENV:-.venv}
python=${PYTHON:-python3}
stamp=$(cat settings.ini setup.py pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)

if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.bcembed-stamp" 2>/dev/null)" = "$stamp" ] \
   && "$venv/bin/python" -c "import bcembed, torch, torchvision, hdbscan, sklearn, nbdev, papermill, pytest" 2>/dev/null; then
  echo "setup: reusing $venv"
  exit 0
fi

echo "setup: building $venv"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# These torch and torchvision releases install together from wheels; newer pairs are not needed.
"$venv/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$venv/bin/python" -m pip install --quiet -e ".[dev]"
"$venv/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
echo "$stamp" > "$venv/.bcembed-stamp"
echo "setup: done"
