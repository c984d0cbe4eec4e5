#!/usr/bin/env bash
# cryofastar-relion-wrapper.sh: the "External executable" for RELION when the job runs on a cluster node
# (or anywhere cryofastar-relion is not on RELION's PATH).
#
# RELION runs the External executable as a bare command: on a queue, the template line holding
# XXXcommandXXX is REPLACED by that command for any executable whose name lacks "relion_" (RELION 3.1,
# tests/test_relion_external_pipeline.py), so `srun`, `module load` or `conda activate` cannot live on that
# line. This wrapper does the set-up and then execs cryofastar-relion with RELION's arguments unchanged.
#
# Configure with environment variables (set them before starting the RELION GUI: Slurm passes the
# submitting environment on by default) or edit the defaults below in a site copy of this file:
#   CRYOFASTAR_SETUP        a shell file to source first (site set-up; anything you like)
#   CRYOFASTAR_MODULES      space-separated environment modules to `module load`, e.g. "cuda/12.1 miniforge"
#   CRYOFASTAR_CONDA_ENV    a conda environment name or prefix to activate
#   CRYOFASTAR_VENV         a Python virtual environment folder to activate
#   CRYOFASTAR_RELION_EXE   the program to run (default: cryofastar-relion); may include arguments,
#                           e.g. "python -m relion_external.main"
# If the set-up fails, the wrapper says why on stderr (run.err) and marks the job failed, so RELION does
# not wait for it for ever.
set -o pipefail

CRYOFASTAR_SETUP="${CRYOFASTAR_SETUP:-}"
CRYOFASTAR_MODULES="${CRYOFASTAR_MODULES:-}"
CRYOFASTAR_CONDA_ENV="${CRYOFASTAR_CONDA_ENV:-}"
CRYOFASTAR_VENV="${CRYOFASTAR_VENV:-}"
CRYOFASTAR_RELION_EXE="${CRYOFASTAR_RELION_EXE:-cryofastar-relion}"

# RELION's output folder (--o External/jobNNN/), for the failure marker.
outdir=""
prev=""
for arg in "$@"; do
    if [ "$prev" = "--o" ]; then outdir="$arg"; break; fi
    prev="$arg"
done

fail() {
    echo "cryofastar-relion-wrapper: error: $*" >&2
    if [ -n "$outdir" ]; then
        mkdir -p "$outdir" && : > "${outdir%/}/RELION_JOB_EXIT_FAILURE"
    fi
    exit 1
}

if [ -n "$CRYOFASTAR_SETUP" ]; then
    [ -r "$CRYOFASTAR_SETUP" ] || fail "CRYOFASTAR_SETUP file '$CRYOFASTAR_SETUP' cannot be read"
    # shellcheck disable=SC1090
    . "$CRYOFASTAR_SETUP" || fail "sourcing CRYOFASTAR_SETUP '$CRYOFASTAR_SETUP' failed"
fi

if [ -n "$CRYOFASTAR_MODULES" ]; then
    if ! command -v module >/dev/null 2>&1; then
        for init in /etc/profile.d/modules.sh /usr/share/lmod/lmod/init/bash /etc/profile.d/lmod.sh; do
            # shellcheck disable=SC1090
            [ -r "$init" ] && . "$init" && break
        done
    fi
    command -v module >/dev/null 2>&1 || fail "CRYOFASTAR_MODULES is set but the 'module' command is not available"
    for m in $CRYOFASTAR_MODULES; do
        module load "$m" || fail "module load $m failed"
    done
fi

if [ -n "$CRYOFASTAR_CONDA_ENV" ]; then
    if ! command -v conda >/dev/null 2>&1; then
        fail "CRYOFASTAR_CONDA_ENV is set but 'conda' is not on PATH (load its module with CRYOFASTAR_MODULES)"
    fi
    eval "$(conda shell.bash hook)" || fail "conda shell.bash hook failed"
    conda activate "$CRYOFASTAR_CONDA_ENV" || fail "conda activate $CRYOFASTAR_CONDA_ENV failed"
fi

if [ -n "$CRYOFASTAR_VENV" ]; then
    [ -r "$CRYOFASTAR_VENV/bin/activate" ] || fail "CRYOFASTAR_VENV '$CRYOFASTAR_VENV' has no bin/activate"
    # shellcheck disable=SC1091
    . "$CRYOFASTAR_VENV/bin/activate" || fail "activating $CRYOFASTAR_VENV failed"
fi

read -r -a exe <<< "$CRYOFASTAR_RELION_EXE"
[ "${#exe[@]}" -gt 0 ] || fail "CRYOFASTAR_RELION_EXE is empty"
command -v "${exe[0]}" >/dev/null 2>&1 \
    || fail "'${exe[0]}' not found on PATH after set-up (install CryoFastAR there, or set CRYOFASTAR_VENV/CRYOFASTAR_CONDA_ENV/CRYOFASTAR_RELION_EXE)"

exec "${exe[@]}" "$@"
