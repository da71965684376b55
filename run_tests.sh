#!/usr/bin/env bash
# Runs the test suite on a fresh machine, doing its own set-up:
#   bash run_tests.sh [pytest arguments]
# It makes (or reuses) a virtual environment keyed by the hash of the requirement files,
# installs the exact versions of constraints.txt into it with pip, and runs pytest with
# the model hub switched off. Set MDAUG_VENV_ROOT to keep the environments elsewhere.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
key=$(cat requirements.txt requirements-dev.txt constraints.txt | sha256sum | cut -c1-16)
key="$key-$("$python" -c 'import sys; print("py%d%d" % sys.version_info[:2])')"
venv="${MDAUG_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/microdoppler-aug/venvs}/$key"

# A venv is only reused when its install finished (the marker is written last).
if [ ! -f "$venv/.installed" ]; then
  echo "setting up $venv (pip install -r requirements-dev.txt -c constraints.txt)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r requirements-dev.txt -c constraints.txt
  touch "$venv/.installed"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
status=0
"$venv/bin/python" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  # pytest's "no tests collected": fine for a filter the user typed, a failure otherwise.
  if [ "$#" -gt 0 ]; then
    echo "no test matched the given arguments"
    exit 0
  fi
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
