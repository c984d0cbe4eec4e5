#!/usr/bin/env bash
# The README's test command, and exactly what CI runs (.ci/run).
#
# 1. RELION, our reference implementation: 3.1 from Debian, and 5.0 and 4.0 built from the source
#    archives in ../shared/relion/ into a cache outside the repository (scripts/build_relion.sh; the first
#    build takes minutes, later calls return at once). The RELION tests run against every version built.
# 2. A fresh virtual environment (.venv-test), so the packages a new user resolves today are the ones
#    tested: torch first (a local CPU wheel here; an unsatisfied torch requirement would pull gigabytes
#    of CUDA wheels), then the project with its test extras.
# 3. The whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v relion_reconstruct >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq relion >/dev/null
fi
versions="${CRYOFASTAR_RELION_BUILDS:-5.0.1 4.0.2}"
for version in $versions; do
  start=$(date +%s)
  bin=$(bash scripts/build_relion.sh "$version")
  echo "RELION $version: $bin ($(( $(date +%s) - start )) s)"
done
export CRYOFASTAR_RELION_BUILDS="$versions"

venv="${CRYOFASTAR_TEST_VENV:-.venv-test}"
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# Protein models for the training volume library, without their (unused) heavy dependencies.
python -m pip install -q --no-deps mdanalysistests==2.11.0 pdbfixer==1.12.0
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MPLBACKEND=Agg
python -m pytest -q tests "$@"
