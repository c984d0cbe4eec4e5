"""The one half-set policy: which particles go into half map 1 and which into half map 2.

Gold-standard FSC needs two independent halves, each non-empty. A file's own split
(``rlnRandomSubset`` or CryoSPARC's ``alignments3D/split``) is kept when it holds both halves and
nothing else; otherwise (absent, a single value such as every particle in subset 1, or other values)
the particles are split at random, balanced, with one fixed seed, so `cryofastar run`,
`cryofastar reconstruct`, refinement and the connectors all draw the same split of the same file.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

HALF_SPLIT_SEED = 1234


def random_half_sets(n: int, generator: torch.Generator | None = None) -> np.ndarray:
    """A balanced random split ``(n,)`` into half sets 1 and 2 (sizes differ by at most one)."""
    perm = torch.randperm(n, generator=generator).numpy()
    out = np.empty(n, dtype=np.int64)
    out[perm[: (n + 1) // 2]] = 1
    out[perm[(n + 1) // 2:]] = 2
    return out


def half_sets(labels: np.ndarray | None, n: int, source: str = "the particles") -> np.ndarray:
    """Half-set labels ``(n,)`` int64 in {1, 2}: ``labels`` when they hold exactly the values 1 and 2,
    else a balanced random split seeded with :data:`HALF_SPLIT_SEED` (logged when ``labels`` were
    given but unusable, naming ``source``)."""
    if labels is not None:
        arr = np.asarray(labels)
        if arr.shape != (n,):
            raise ValueError(f"half-set labels of {source}: expected shape ({n},), got {arr.shape}")
        values = set(np.unique(arr).tolist())
        if values == {1, 2}:
            return arr.astype(np.int64)
        log.warning("the half-set column of %s holds %s, not both 1 and 2: using a random balanced split instead",
                    source, sorted(values)[:5])
    return random_half_sets(n, torch.Generator().manual_seed(HALF_SPLIT_SEED))
