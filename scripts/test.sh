#!/usr/bin/env bash
# The README's test command: install torch first (a local CPU wheel here), then the project with its
# test extras, then run the suite. RELION 3.1 (Debian: apt-get install -y relion) must be on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python3 -m pytest -q tests "$@"
