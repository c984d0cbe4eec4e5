#!/usr/bin/env bash
# The README's test command. On a fresh Debian machine it installs RELION 3.1 (our reference
# implementation, used by the tests), torch first (a local CPU wheel here; an unsatisfied torch
# requirement would pull gigabytes of CUDA wheels), then the project with its test extras, then runs
# the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v relion_reconstruct >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq relion >/dev/null
fi
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
# Protein models for the training volume library, without their (unused) heavy dependencies.
python3 -m pip install -q --no-deps mdanalysistests==2.11.0 pdbfixer==1.12.0
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MPLBACKEND=Agg
python3 -m pytest -q tests "$@"
