"""Settings of pose refinement (:class:`RefineConfig`) and the matching band they schedule.

What each setting does is told in :mod:`cryofastar_core.refine.driver`'s module docstring; the passes
(:mod:`cryofastar_core.refine.passes`) read them from here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from cryofastar_core.reconstruct import resolution_at


@dataclass
class RefineConfig:
    """Settings of :func:`~cryofastar_core.refine.driver.refine_poses` (see the driver's module docstring for
    what each does).

    Angles in degrees, shifts in pixels of the input box, resolution limits in Fourier shells of the
    input box. ``mask_radius`` ``None`` means ``0.45 * D - mask_width``.
    """

    iterations: int = 3
    angle_step_deg: float = 5.0
    angle_radius_deg: float = 15.0
    shift_step_px: float = 1.0
    shift_radius_px: float = 2.0
    shrink: float = 0.5
    first_fsc_threshold: float = 0.5
    fsc_threshold: float = 0.143
    extra_shells: float = 2.0
    min_shells: float = 4.0
    max_shells: float | None = None
    # Local iterations match no further out than the shell where one angular step moves a sample by this many
    # Fourier pixels (None: no such cap): finer shells cannot tell neighbouring candidates apart smoothly
    # and cost most (the scale phase of cryofastar_core/job/work_scale.py sets it).
    step_motion_px: float | None = None
    chunk_size: int = 512
    batch_points: int = 1 << 20
    use_ctf: bool = True
    whiten: bool = True
    fsc_weighting: bool = True
    mask_radius: float | None = None
    mask_width: float = 3.0
    pad: int = 2
    subgrid: bool = True
    soft: bool = True
    global_step_deg: float | None = 15.0
    global_passes: int = 20
    global_shift_step_px: float = 1.0
    global_shift_radius_px: float = 3.0
    global_max_shells: float = 8.0
    global_settle_fraction: float = 0.05
    global_keep_better: bool = True
    register_halves: bool = True
    register_radius_deg: float = 20.0
    register_max_shift_px: float = 3.0
    centre_origin: bool = True
    # Junk (refine/junk.py): flagged in every global pass from the data; excluded from the maps unless off.
    detect_junk: bool = True
    exclude_junk: bool = True
    junk_null_every: int = 8
    junk_min_bic_gain: float = 10.0
    # Pose mates of a pseudo-symmetric map (refine/mates.py): at most this many passes before the last local
    # iteration (0: off; the job asks for MATE_PASSES), stopping once two passes in a row (one of each
    # sub-half) change no more than this fraction of the particles.
    mate_passes: int = 0
    mate_settle_fraction: float = 0.005
    # Several classes (refine/classes.py): "fit" starts them from the particles ranked by how well the
    # consensus fits them, "dealt" from a random deal.
    class_start: str = "fit"

    def validate(self) -> None:
        """Raise ``ValueError`` on a setting no pass can work with."""
        if self.iterations < 0:
            raise ValueError("RefineConfig.iterations must be >= 0")
        for name in ("angle_step_deg", "angle_radius_deg", "shift_step_px", "chunk_size", "batch_points"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RefineConfig.{name} must be > 0")
        if self.shift_radius_px < 0:
            raise ValueError("RefineConfig.shift_radius_px must be >= 0")
        if not 0 < self.shrink <= 1:
            raise ValueError("RefineConfig.shrink must be in (0, 1]")
        if self.pad < 1:
            raise ValueError("RefineConfig.pad must be >= 1")
        if self.junk_null_every < 1:
            raise ValueError("RefineConfig.junk_null_every must be at least 1")
        if self.class_start not in ("fit", "dealt"):
            raise ValueError("RefineConfig.class_start must be 'fit' or 'dealt'")
        if self.global_step_deg is not None and not 3.0 <= self.global_step_deg <= 45.0:
            raise ValueError("RefineConfig.global_step_deg must be None (off) or in [3, 45]")


def matching_shells(freq: Tensor, curve: Tensor, box: int, threshold: float, cfg: RefineConfig) -> float:
    """Matching radius (shells of ``box``): the FSC ``threshold`` crossing plus ``extra_shells``, clamped.

    ``freq``, ``curve`` ``(S,)``: a half-map FSC as :func:`cryofastar_core.reconstruct.fsc` returns it.
    """
    res = resolution_at(freq, curve, 1.0, threshold)  # apix 1: resolution in px
    cross = box / res if math.isfinite(res) and res > 0 else 0.0
    upper = box / 2 - 1 if cfg.max_shells is None else min(cfg.max_shells, box / 2 - 1)
    return float(min(max(cross + cfg.extra_shells, cfg.min_shells), upper))


def step_limited_shells(r_lim: float, angle_step_deg: float, cfg: RefineConfig) -> float:
    """``r_lim`` lowered to the shell where one angular step of ``angle_step_deg`` moves a sample by
    ``step_motion_px`` Fourier pixels (unchanged when that is ``None``), never below ``min_shells`` (or
    ``r_lim`` if smaller)."""
    if cfg.step_motion_px is None:
        return r_lim
    return max(min(r_lim, cfg.step_motion_px / math.radians(angle_step_deg)), min(cfg.min_shells, r_lim))
