#!/usr/bin/env bash
# Build a real RELION (4.0 or 5.0) from the unmodified source archives in ../shared/relion/, CPU only,
# no GUI, nothing downloaded, into a cache outside the repository. Idempotent: when the cache already
# holds a finished build of that version it prints its bin folder and returns at once.
#
#   bash scripts/build_relion.sh 5.0.1        # prints <cache>/relion-5.0.1/bin
#   CRYOFASTAR_RELION_CACHE=/somewhere bash scripts/build_relion.sh 4.0.2
#
# Only the programs our tests and users' next steps call are built (the pipeliner, refine, reconstruct,
# project, star handler, image handler): the library is the bulk of the work either way.
set -euo pipefail
version="${1:?usage: build_relion.sh VERSION (5.0.1 or 4.0.2)}"
here="$(cd "$(dirname "$0")/.." && pwd)"
archive="${CRYOFASTAR_RELION_SOURCES:-$here/../shared/relion}/relion-$version.tar.gz"
cache="${CRYOFASTAR_RELION_CACHE:-$HOME/.cache/cryofastar/relion}"
prefix="$cache/relion-$version"
jobs="${CRYOFASTAR_BUILD_JOBS:-$(nproc)}"
# RELION's CMake names each program's target without the relion_ prefix.
targets="pipeliner refine refine_mpi reconstruct project star_handler image_handler external_reconstruct"

if [[ -f "$prefix/BUILD_OK" ]]; then
  echo "$prefix/bin"
  exit 0
fi
if [[ ! -f "$archive" ]]; then
  echo "build_relion.sh: no source archive $archive; the sources live in ../shared/relion/ (see its README)" >&2
  exit 2
fi
if ! command -v cmake >/dev/null || ! command -v mpicxx >/dev/null || [[ ! -e /usr/include/fftw3.h ]]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq cmake build-essential libopenmpi-dev openmpi-bin libfftw3-dev libtiff-dev \
    libpng-dev libjpeg-dev zlib1g-dev >/dev/null
fi

work="$cache/build-$version"
rm -rf "$work" "$prefix"
mkdir -p "$work"
tar -xzf "$archive" -C "$work"
src="$work/relion-$version"
start=$(date +%s)
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGUI=OFF -DFETCH_WEIGHTS=OFF -DCUDA=OFF \
  -DALTCPU=OFF -DHIP=OFF -DSYCL=OFF -DFORCE_OWN_FFTW=OFF -DFORCE_OWN_TBB=OFF \
  -DCMAKE_INSTALL_PREFIX="$prefix" >"$work/cmake.log" 2>&1 || { tail -30 "$work/cmake.log" >&2; exit 1; }
# shellcheck disable=SC2086
make -C "$work/build" -j"$jobs" $targets >"$work/make.log" 2>&1 || { tail -40 "$work/make.log" >&2; exit 1; }
mkdir -p "$prefix/bin"
for t in $targets; do cp "$work/build/bin/relion_$t" "$prefix/bin/"; done
echo "$version built in $(( $(date +%s) - start )) s with $jobs jobs" > "$prefix/BUILD_OK"
rm -rf "$work"
echo "$prefix/bin"
