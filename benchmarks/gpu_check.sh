#!/usr/bin/env bash
# Everything a lent GPU should run, in one command, writing one JSON (see gpu_check.py):
#   benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
