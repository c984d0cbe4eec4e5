"""ASPIRE's ``CLSync3N`` behind the pose-model interface, so the model ladder measures it on its own draws.

``bench/model_accuracy.py --weights aspire-cl3n`` (or ``--baseline aspire-cl3n``) hands each sample's
preprocessed views to ASPIRE 0.14 (a bench extra: ``bench/README.md``, "Installing the peers") exactly
as our classical estimator gets them: centred on their centroids and under the same soft mask fitted to
the particle (:func:`cryofastar_core.commonlines.poser.prepare_views`), so the two differ only in their
common-line detection and synchronisation. ASPIRE's own settings are its defaults but for the ones that
must match ours: 360 in-plane angles, a relative-shift search of ±2 px in 1 px steps (the images are
already centred), and no second mask. Its J-synchronisation (the hand of each relative rotation) is the
stock one, vectorised: the same signs, in seconds instead of minutes to hours. Its rotations are ours as they are (``bench/README.md``,
conventions); the errors are taken after the best global rotation and hand, so neither matters here.

Its output is built as :class:`~cryofastar_core.commonlines.poser.CommonLinesPoser` builds its own: exact
FPM planes at the rotations found, which Kabsch recovers exactly; every view's confidence is 1 (ASPIRE
gives no per-view support).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cryofastar_core.commonlines.config import CommonLinesConfig
from cryofastar_core.commonlines.poser import prepare_views
from cryofastar_core.model.fpm import fpm_targets
from cryofastar_core.model.lines.head import polar_grid
from cryofastar_core.model.output import ModelOutput

ASPIRE_CL3N = "aspire-cl3n"  # the --weights / --baseline name
_GRID = (8, 4)


def _configure_aspire(log_dir: Path) -> None:
    """Point ASPIRE's log files (by default ``./logs`` and ``./aspire.err.log``) into ``log_dir``: its
    configuration is read once, when ``aspire`` is first imported, from ``$ASPIREDIR/config.yaml``."""
    if "aspire" in sys.modules:
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "config.yaml").write_text(f"logging:\n  log_dir: {log_dir.resolve()}\n  log_exceptions: 0\n")
    os.environ["ASPIREDIR"] = str(log_dir.resolve())


def _triplet_signs(n: int, pairs_to_linear: np.ndarray, rijs: np.ndarray) -> tuple[np.ndarray, ...]:
    """For every triangle ``i < j < k``, the linear pair indices ``(ij, jk, ik)`` and the signs ASPIRE's
    J-synchronisation gives its three sides ``(s_ij_jk, s_ik_jk, s_ij_ik)``: which of the four J
    conjugations makes ``Rij Rjk`` closest to ``Rik`` (its ``_signs_times_v_host`` without J weighting)."""
    i, j, k = (a.ravel() for a in np.meshgrid(*(np.arange(n),) * 3, indexing="ij"))
    keep = (i < j) & (j < k)
    i, j, k = i[keep], j[keep], k[keep]
    ij, jk, ik = pairs_to_linear[i, j], pairs_to_linear[j, k], pairs_to_linear[i, k]
    flip = np.diag([1.0, 1.0, -1.0])
    r_ij, r_jk, r_ik = rijs[ij], rijs[jk], rijs[ik]
    conj = lambda r: flip @ r @ flip  # noqa: E731 (J R J)
    c = np.stack([((r_ij @ r_jk - r_ik) ** 2).sum((1, 2)), ((conj(r_ij) @ r_jk - r_ik) ** 2).sum((1, 2)),
                  ((r_ij @ conj(r_jk) - r_ik) ** 2).sum((1, 2)), ((r_ij @ r_jk - conj(r_ik)) ** 2).sum((1, 2))], 1)
    confs = np.array([[1, 1, 1], [-1, 1, -1], [-1, -1, 1], [1, -1, -1]], dtype=np.float64)
    signs = confs[np.argmin(c, axis=1)]
    return ij, jk, ik, signs[:, 0], signs[:, 1], signs[:, 2]


def _vectorised_signs_times_v(self, rijs: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """ASPIRE 0.14's J-synchronisation power-method product, vectorised (the stock one is a Python loop
    over all triangles: 70 of 74 s for 64 views, hours at low SNR). The signs depend only on ``rijs``,
    so they are found once per power method."""
    if self.J_weighting:
        return _STOCK_SIGNS_TIMES_V(self, rijs, vec)
    cached = getattr(self, "_cryofastar_signs", None)
    if cached is None or cached[0] is not rijs:
        cached = (rijs, _triplet_signs(self.n_img, self._pairs_to_linear, rijs))
        self._cryofastar_signs = cached
    ij, jk, ik, s_ij_jk, s_ik_jk, s_ij_ik = cached[1]
    out = np.zeros_like(vec)
    np.add.at(out, ij, s_ij_jk * vec[jk] + s_ij_ik * vec[ik])
    np.add.at(out, jk, s_ij_jk * vec[ij] + s_ik_jk * vec[ik])
    np.add.at(out, ik, s_ij_ik * vec[ij] + s_ik_jk * vec[jk])
    return out


_STOCK_SIGNS_TIMES_V = None


def _vectorise_j_sync() -> None:
    """Replace ASPIRE's CPU J-synchronisation product by :func:`_vectorised_signs_times_v` (equal results:
    tests/test_bench_harness.py)."""
    global _STOCK_SIGNS_TIMES_V
    from aspire.abinitio.J_sync import JSync

    if _STOCK_SIGNS_TIMES_V is None:
        _STOCK_SIGNS_TIMES_V = JSync._signs_times_v_host
        JSync._signs_times_v_host = _vectorised_signs_times_v


class AspireSync3N(nn.Module):
    """``CLSync3N`` of ASPIRE 0.14 on each sample of ``(B, V, D, D)`` preprocessed views (view 0 the reference)."""

    def __init__(self, log_dir: Path, cfg: CommonLinesConfig | None = None, n_theta: int = 360, seed: int = 0):
        super().__init__()
        self.cfg = cfg or CommonLinesConfig()
        self.n_theta, self.seed = n_theta, seed
        _configure_aspire(Path(log_dir))

    def rotations(self, views: Tensor) -> np.ndarray:
        """``(V, 3, 3)`` rotations of one sample's views ``(V, D, D)``."""
        from aspire.abinitio import CLSync3N
        from aspire.source import ArrayImageSource

        _vectorise_j_sync()
        prepared = prepare_views(views.float().cpu(), self.cfg)
        src = ArrayImageSource(prepared.masked.double().numpy(), pixel_size=1.0)  # any: lines only
        box = self.cfg.box
        orient = CLSync3N(src, n_theta=self.n_theta, max_shift=self.cfg.max_shift_px / box,
                          shift_step=self.cfg.shift_step_px, mask=False, seed=self.seed, disable_gpu=True)
        orient.estimate_rotations()
        return np.asarray(orient.rotations, np.float64)

    def forward(self, images: Tensor) -> ModelOutput:
        if images.ndim != 4:
            raise ValueError(f"images must be (B, V, D, D), got {tuple(images.shape)}")
        grid = polar_grid(*_GRID, device=images.device)
        xyz = []
        for sample in images:
            rot = torch.as_tensor(self.rotations(sample), dtype=torch.float64, device=images.device)
            shifts = prepare_views(sample.float(), self.cfg).shifts.double()
            xyz.append(fpm_targets(rot[None, 0], rot[None], shifts[None], self.cfg.box, grid)[0])
        xyz = torch.stack(xyz).float()
        conf = torch.full(xyz.shape[:-1], 2.0, device=images.device)  # every view equal (1 − 1/C = 0.5)
        return ModelOutput(xyz=xyz, conf=conf, denoised=None, grid=grid)
