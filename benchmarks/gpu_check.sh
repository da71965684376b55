#!/usr/bin/env bash
# The GPU check: run on a GPU machine whenever one is available (under 8 minutes on an
# H100-class card), then put its table in the README's results section with the card named.
#
#   bash benchmarks/gpu_check.sh [--out results/gpu_check]
#
# Stage-1 and stage-2 training of the standard presets at 256x256 in fp16 and bf16
# (images/s, steps/s, peak GPU memory, whether stage 2 at batch 16 fits 16 GB), the latent
# cache speed-up, generation images/s per scheduler, and 31 users x 100 images at 256x256
# timed end to end (goal: <= 60 s). Prints the table and writes OUT.md and OUT.json.
set -euo pipefail
OUT=results/gpu_check
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (usage: bash benchmarks/gpu_check.sh [--out PREFIX])" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA GPU is visible; run it on a GPU machine (the CPU smoke run is run_benchmarks.py --quick)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PYTHON" benchmarks/run_benchmarks.py --device cuda --precisions fp16 bf16 --generation_images 8 \
    --generation_batch 8 --goal_images 3100 --out "$OUT"
