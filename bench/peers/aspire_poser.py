"""ASPIRE's ``CLSync3N`` behind the pose-model interface, so the model ladder measures it on its own draws.

``bench/model_accuracy.py --weights aspire-cl3n`` (or ``--baseline aspire-cl3n``) hands each sample's
preprocessed views to ASPIRE 0.14 (a bench extra: ``bench/README.md``, "Installing the peers") exactly
as our classical estimator gets them: centred on their centroids and under the same soft mask fitted to
the particle (:func:`cryofastar_core.commonlines.poser.prepare_views`), so the two differ only in their
common-line detection and synchronisation. ASPIRE's own settings are its defaults but for the ones that
must match ours: 360 in-plane angles, a relative-shift search of ±2 px in 1 px steps (the images are
already centred), and no second mask. Its rotations are ours as they are (``bench/README.md``,
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
