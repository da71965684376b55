#!/usr/bin/env bash
# Runs the test suite on a fresh machine, doing its own set-up:
#   bash run_tests.sh [pytest arguments]
#   bash run_tests.sh --floors [pytest arguments]
#   bash run_tests.sh [--floors] --install        (set up the environment only)
# It makes (or reuses) a virtual environment keyed by the hash of the requirement files,
# installs the exact versions of constraints.txt into it with pip, and runs pytest with
# the model hub switched off. With --floors: the oldest versions requirements.txt allows
# (constraints-min.txt) on Python 3.10, and only the tests marked `floors` (the tiny
# pipeline, resume, the generator folder). Set MDAUG_VENV_ROOT to keep the environments
# elsewhere, PYTHON / PYTHON_FLOORS to choose the interpreters.
set -euo pipefail
cd "$(dirname "$0")"

floors=0
install_only=0
while [ "$#" -gt 0 ]; do
  case "$1" in
    --floors) floors=1; shift ;;
    --install) install_only=1; shift ;;
    *) break ;;
  esac
done

floors_python() {
  # Pillow 9.1 and numpy 1.23.0 have wheels up to Python 3.10 only.
  local candidate
  for candidate in "${PYTHON_FLOORS:-}" python3.10 "$(pyenv root 2>/dev/null)"/versions/3.10*/bin/python3.10; do
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if [ "$floors" -eq 1 ]; then
  constraints=constraints-min.txt
  if ! python=$(floors_python); then
    echo "floors check skipped: no Python 3.10 here (set PYTHON_FLOORS to one)" >&2
    exit 0
  fi
else
  constraints=constraints.txt
  python=${PYTHON:-python3}
fi
key=$(cat requirements.txt requirements-dev.txt "$constraints" | sha256sum | cut -c1-16)
key="$key-$("$python" -c 'import sys; print("py%d%d" % sys.version_info[:2])')"
venv="${MDAUG_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/microdoppler-aug/venvs}/$key"

# A venv is only reused when its install finished (the marker is written last).
if [ ! -f "$venv/.installed" ]; then
  echo "setting up $venv (pip install -r requirements-dev.txt -c $constraints)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r requirements-dev.txt -c "$constraints"
  touch "$venv/.installed"
fi
if [ "$install_only" -eq 1 ]; then
  exit 0
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
given=$#
if [ "$floors" -eq 1 ]; then
  set -- -m floors "$@"
fi
status=0
"$venv/bin/python" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  # pytest's "no tests collected": fine for a filter the user typed, a failure otherwise.
  if [ "$given" -gt 0 ]; then
    echo "no test matched the given arguments"
    exit 0
  fi
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
