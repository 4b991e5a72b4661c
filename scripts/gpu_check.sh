#!/usr/bin/env bash
# Every figure only a GPU can show, in one command: benchmarks/gpu_check.py does the work.
#   scripts/gpu_check.sh                  # one CUDA device, under 8 min: JSON + markdown in benchmarks/results/
#   scripts/gpu_check.sh --dry-run        # no GPU: every stage on CPU at tiny sizes (tests/test_gpu_check.py)
#   scripts/gpu_check.sh --fetch-wheels   # on a host with a package registry, before an offline device run
#   scripts/gpu_check.sh --help           # stages, --only / --skip / --budget
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
