"""ASPIRE 0.14 common-lines orientation estimation on a RELION STAR, run as its own process.

Particles are phase-flipped and background-normalised. With ``--classes K`` (needed at low SNR),
``DefaultClassAvgSource`` classifies (RIR bispectrum + nearest neighbours) and the neighbour-variance
selector with repulsion picks ``K`` class averages; each average is aligned to its centre particle,
so the rotation found for an average is that particle's pose. With ``--classes 0`` the particles
themselves go to common lines. ``CLSyncVoting(n_theta=...)`` estimates the rotations.

Writes ``OUT.npz``: ``indices`` (particles posed) and ``rotations`` (ASPIRE's matrices; in 0.14 they
equal the internal convention, see tests/test_bench_harness.py).
"""
import argparse

import numpy as np

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("star")
    ap.add_argument("--data-folder", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--classes", type=int, default=0)
    ap.add_argument("--n-nbor", type=int, default=10)
    ap.add_argument("--n-theta", type=int, default=72)
    a = ap.parse_args()

    import os
    from pathlib import Path

    # ASPIRE writes its log files under ./logs: keep them inside this run's output folder.
    a.star, a.data_folder = str(Path(a.star).resolve()), str(Path(a.data_folder).resolve())
    a.out = str(Path(a.out).resolve())
    os.chdir(Path(a.out).parent)

    from aspire.abinitio import CLSyncVoting
    from aspire.classification import NeighborVarianceClassSelector
    from aspire.denoising import DefaultClassAvgSource
    from aspire.source import RelionSource

    src = RelionSource(a.star, data_folder=a.data_folder).phase_flip().normalize_background().cache()
    if a.classes > 0:
        from aspire.classification import RIRClass2D

        # ASPIRE's defaults (400 FSPCA / 300 bispectrum components) need more than ~600 images;
        # smaller sets get proportionally fewer components.
        classifier = RIRClass2D(src, fspca_components=min(400, max(8, src.n // 2)),
                                bispectrum_components=min(300, max(4, src.n // 3)), n_nbor=a.n_nbor,
                                large_pca_implementation="legacy", nn_implementation="sklearn",
                                bispectrum_implementation="legacy")
        avgs = DefaultClassAvgSource(src, n_nbor=a.n_nbor, classifier=classifier,
                                     class_selector=NeighborVarianceClassSelector())
        from aspire.source import ArrayImageSource

        selected = np.asarray(avgs.selection_indices, dtype=np.int64)  # classifies and selects; n may shrink
        k = min(a.classes, avgs.n, len(selected))
        indices = selected[:k]  # class i is centred on particle i
        cl_src = ArrayImageSource(avgs.images[:k], pixel_size=src.pixel_size)
    else:
        indices = np.arange(src.n, dtype=np.int64)
        cl_src = src
    orient = CLSyncVoting(cl_src, n_theta=a.n_theta)
    orient.estimate_rotations()
    np.savez(a.out, indices=indices, rotations=np.asarray(orient.rotations, np.float64))
