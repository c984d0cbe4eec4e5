"""Is a candidate weights file better than the shipped one? Paired differences on the ladder's draws.

The ladder's samples are drawn from fixed random streams, so two weights files evaluated with the same
``--seed`` and ``--samples`` see exactly the same images: the comparison is paired. A cell's verdict
is the bootstrap 95 % interval of ``median(candidate errors) - median(baseline errors)`` over the
samples (resampled in pairs): ``better`` when the whole interval lies below 0, ``worse`` when above,
``same`` otherwise. Samples of one structure are not independent (the heldout split has 4), so the
intervals are optimistic there; they are still far tighter than comparing two unpaired medians.

Shipping rule (model card, "Held-out accuracy"): a candidate replaces the shipped weights when no
cell is ``worse`` and at least one is ``better``. With 32 unpaired samples a median moved by up to
10 deg between two runs of the same file's quality, and a cell at chance (rung 3) decided by a
coin flip whether anything could ship.
"""
from __future__ import annotations

import numpy as np

VERDICTS = ("better", "same", "worse")


def paired_median_difference(candidate: np.ndarray, baseline: np.ndarray, n_boot: int = 2000,
                             seed: int = 0) -> dict[str, float | str]:
    """``median(candidate) - median(baseline)`` over paired samples ``(S,)`` with a bootstrap 95 % interval."""
    c, b = np.asarray(candidate, dtype=float), np.asarray(baseline, dtype=float)
    if c.shape != b.shape or c.ndim != 1 or c.size < 2:
        raise ValueError(f"need two equal 1-D arrays of paired errors, got shapes {c.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, c.size, size=(n_boot, c.size))
    boot = np.median(c[idx], axis=1) - np.median(b[idx], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    verdict = "better" if hi < 0 else "worse" if lo > 0 else "same"
    return {"difference": float(np.median(c) - np.median(b)), "low": float(lo), "high": float(hi),
            "candidate_wins": float(np.mean(c < b)), "verdict": verdict}


def ship_decision(verdicts: list[str]) -> bool:
    """The shipping rule: no cell worse, at least one better."""
    unknown = set(verdicts) - set(VERDICTS)
    if unknown:
        raise ValueError(f"unknown verdicts {sorted(unknown)}; expected {VERDICTS}")
    return "worse" not in verdicts and "better" in verdicts
