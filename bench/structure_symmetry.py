"""How nearly each library structure repeats itself under a turn (``evaluation.symmetry``): the ones that
do are where common lines fail whole samples on the model ladder (``docs/model-history.md``, session 20).

    PYTHONPATH=. python bench/structure_symmetry.py --split eval --box 64

One row per structure: the order ``n`` whose turn by ``360° / n`` about a principal axis matches the map
best, that correlation, and the 2-fold's (orders 2-6; a smooth map turned by a small angle still overlaps
itself, so a symmetry is an order well above the others, near 1).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cryofastar_core.evaluation.symmetry import cyclic_self_matches  # noqa: E402
from cryofastar_core.training.volumes import VolumeLibrary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="eval", help="library split: eval, heldout or train")
    ap.add_argument("--box", type=int, default=64)
    args = ap.parse_args()
    lib = VolumeLibrary(box=args.box, split=args.split, cache_dir=None, n_pseudo=0, seed=0)
    print("| index | structure | best order | its correlation | 2-fold's | all orders 2-6 |")
    print("|---|---|---|---|---|---|")
    for i, spec in enumerate(lib.specs):
        volume, _ = lib.load(i)
        matches = cyclic_self_matches(volume)
        best = max(matches, key=lambda m: m.correlation)
        print(f"| {i} | {spec.name} | C{best.order} | {best.correlation:.2f} | {matches[0].correlation:.2f} | "
              + " ".join(f"{m.correlation:.2f}" for m in matches) + " |", flush=True)


if __name__ == "__main__":
    main()
