"""Peak memory and time of two half-set reconstructions at one box (the job's final reconstruction stage
without the reading): ``--n`` random images inserted into two Backprojectors, both finalized.

    python bench/backprojector_memory.py --box 256 --n 80 --threads 1

Run it in its own process: the peak resident memory it prints is the process's.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryofastar_core.geometry import random_rotations  # noqa: E402
from cryofastar_core.reconstruct.backproject import Backprojector  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--box", type=int, default=256)
    p.add_argument("--n", type=int, default=80)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    halves = [Backprojector(args.box), Backprojector(args.box)]
    t0 = time.perf_counter()
    for start in range(0, args.n, 20):
        k = min(20, args.n - start)
        images, rotations = torch.randn(k, args.box, args.box, generator=g), random_rotations(k, g)
        for bp in halves:
            bp.insert(images, rotations)
    inserted = time.perf_counter() - t0
    t0 = time.perf_counter()
    for bp in halves:
        bp.finalize()
    finalized = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
    print(f"box {args.box}: insert {args.n} images into both halves {inserted:.1f} s, finalize both "
          f"{finalized:.1f} s, peak RSS {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
