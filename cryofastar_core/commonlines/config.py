"""Settings of the classical common-lines estimator (:mod:`cryofastar_core.commonlines`)."""
from __future__ import annotations

from dataclasses import dataclass

from cryofastar_core.physics.ctf import CTF_CORRECTIONS

COMMON_LINES = "common-lines"  # the ``--weights`` name that selects this estimator (no weights file)


@dataclass
class CommonLinesConfig:
    """``box``: the image side the estimator works at (images are Fourier-cropped to it by the job's
    one preprocessing path). ``n_lines``: in-plane angles over the full turn (360: 1° steps).
    ``band``: the radii used, as fractions of Nyquist (``D/2``): below the low end every line holds
    the molecule's overall blob, which does not tell lines apart; above the high end noise dominates.
    ``mask_radius``: the soft real-space mask's radius as a fraction of ``D/2``, or ``None`` to fit it
    to the particle (where the mean image's radial profile falls to a tenth of its peak).
    ``max_shift_px`` / ``shift_step_px``: the 1D search over a pair's relative shift along its common
    line, after every image is centred on its centroid. ``vote_sigma_deg``: width of the kernel the
    votes for an angle between two views are smoothed with; ``refine_iterations``: sweeps of the robust
    least-squares fit that follows the spectral synchronisation (:func:`~.sync.refine_rotations`).
    ``whiten``: how far each radius is evened out before lines are compared (:func:`~.detect.line_features`;
    1: fully, which lets radii without signal, such as a class average's beyond its resolution, count as
    much as the rest; 0.5 chosen on the model ladder's heldout split and on RELION class averages:
    docs/model-history.md, session 10). ``ctf_correction`` is the job's
    preprocessing contract (phase flipping keeps the sign of every common line's samples).
    ``proposal_window_deg``: with a learned encoder, its detections are proposals and the classical
    scores choose each common line within this many degrees of them (the encoder finds the right
    neighbourhood in noise; the untouched lines place it exactly: a CNN is not rotation-equivariant, and
    its own detections cost accuracy on clean images); ``None``: the encoder's detections as they are.
    Either way they compete with the classical detections, and the set whose triangles agree most is
    kept (:func:`~.poser.most_consistent`)."""

    box: int = 64
    n_lines: int = 360
    band: tuple[float, float] = (0.06, 0.5)
    mask_radius: float | None = None
    max_shift_px: float = 2.0
    shift_step_px: float = 1.0
    vote_sigma_deg: float = 3.0
    refine_iterations: int = 30
    whiten: float = 0.5
    ctf_correction: str = "phase_flip"
    proposal_window_deg: float | None = 3.0

    def __post_init__(self) -> None:
        if self.n_lines < 8 or self.n_lines % 2:
            raise ValueError(f"n_lines must be an even number >= 8, got {self.n_lines}")
        lo, hi = self.band
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"band must satisfy 0 <= low < high <= 1 (fractions of Nyquist), got {self.band}")
        if self.mask_radius is not None and not 0 < self.mask_radius <= 1:
            raise ValueError(f"mask_radius must be in (0, 1] (a fraction of D/2) or None, got {self.mask_radius}")
        if self.max_shift_px < 0 or self.shift_step_px <= 0:
            raise ValueError("max_shift_px must be >= 0 and shift_step_px > 0")
        if self.proposal_window_deg is not None and self.proposal_window_deg < 0:
            raise ValueError(f"proposal_window_deg must be >= 0 or None, got {self.proposal_window_deg}")
        if self.ctf_correction not in CTF_CORRECTIONS:
            raise ValueError(f"ctf_correction must be one of {CTF_CORRECTIONS}, got {self.ctf_correction!r}")

    @property
    def radii(self) -> tuple[float, ...]:
        """Radii of the line samples in Fourier pixels (cycles per box), one per pixel across the band."""
        nyq = self.box / 2
        lo, hi = max(1.0, self.band[0] * nyq), self.band[1] * nyq
        n = max(2, int(round(hi - lo)) + 1)
        return tuple(lo + (hi - lo) * i / (n - 1) for i in range(n))

    @property
    def shifts(self) -> tuple[float, ...]:
        """The relative shifts (px) searched per pair, symmetric about 0."""
        n = int(self.max_shift_px // self.shift_step_px)
        return tuple(self.shift_step_px * i for i in range(-n, n + 1))
