"""Model configuration: the architecture hyper-parameters and the named sizes."""
from __future__ import annotations

from dataclasses import dataclass

from cryofastar_core.physics.ctf import CTF_CORRECTIONS

# Encoder (d / layers / heads), decoder per stack (d / layers / heads) and head neck width.
MODEL_SIZES: dict[str, dict] = {
    "XS": dict(enc_dim=256, enc_depth=6, enc_heads=4, dec_dim=256, dec_depth=4, dec_heads=4, neck_dim=128),
    "S": dict(enc_dim=384, enc_depth=12, enc_heads=6, dec_dim=384, dec_depth=6, dec_heads=6, neck_dim=256),
    "M": dict(enc_dim=768, enc_depth=12, enc_heads=12, dec_dim=512, dec_depth=8, dec_heads=8, neck_dim=256),
    "L": dict(enc_dim=1024, enc_depth=24, enc_heads=16, dec_dim=768, dec_depth=12, dec_heads=12, neck_dim=256),
}

TOKENS_PER_SIDE = 8  # T = 64 tokens per view at every box size: the patch side grows with the box instead


@dataclass
class ModelConfig:
    """Architecture of :class:`~cryofastar_core.model.patch.network.CryoFastAR` and
    :class:`~cryofastar_core.model.lines.network.LineCryoFastAR`.

    ``box`` is the image side D in pixels, ``patch`` the ViT patch side p (``box % patch == 0``).
    ``xyz_grid_base``: the xyz heads predict a residual added to the planar grid ``ū/2 + 1/2``
    (the reference's own FPM for zero shift), so a freshly initialised model outputs a valid plane
    instead of a constant; switch off for a plain linear head.
    ``checkpointing``: activation checkpointing of every transformer block during training.

    ``arch`` chooses the model class (:func:`cryofastar_core.model.factory.build_model`): ``"patch"``
    (patch tokens, :class:`~cryofastar_core.model.patch.network.CryoFastAR`) or ``"lines"``
    (each view's 1D projections as tokens and a polar FPM,
    :class:`~cryofastar_core.model.lines.network.LineCryoFastAR`). Line models use ``n_lines`` angles,
    ``line_samples`` samples per line and ``line_radii`` FPM points per line. ``patch``,
    ``xyz_grid_base`` and ``denoise_head`` only concern the patch model. ``ctf_correction``
    (``"none"`` or ``"phase_flip"``) is how images are CTF-corrected before the model sees them, in
    training and inference alike (:func:`cryofastar_core.inference.preprocess.correct_ctf`).
    ``similarity_lag`` is a line-model option measured in docs/model-history.md
    (:func:`~cryofastar_core.model.lines.decoder.line_similarity`).
    """

    box: int
    patch: int
    enc_dim: int
    enc_depth: int
    enc_heads: int
    dec_dim: int
    dec_depth: int
    dec_heads: int
    mlp_ratio: float = 4.0
    neck_dim: int = 256
    rope_base: float = 100.0
    denoise_head: bool = True
    checkpointing: bool = False
    xyz_grid_base: bool = True
    arch: str = "patch"
    n_lines: int = 24
    line_samples: int = 32
    line_radii: int = 4
    ctf_correction: str = "none"
    similarity_lag: int = 0

    def __post_init__(self) -> None:
        if self.ctf_correction not in CTF_CORRECTIONS:
            raise ValueError(f"ctf_correction must be one of {CTF_CORRECTIONS}, got {self.ctf_correction!r}")
        if self.arch not in ("patch", "lines"):
            raise ValueError(f"arch must be 'patch' or 'lines', got {self.arch!r}")
        if self.arch == "lines":
            self._check_lines()
            return
        if self.patch <= 0 or self.box % self.patch:
            raise ValueError(f"box {self.box} is not a multiple of patch {self.patch}")
        for name, dim, heads in (("enc", self.enc_dim, self.enc_heads), ("dec", self.dec_dim, self.dec_heads)):
            if dim % heads:
                raise ValueError(f"{name}_dim {dim} is not divisible by {name}_heads {heads}")
            if (dim // heads) % 4:
                # 2D RoPE splits each head in a row half and a column half of rotation pairs.
                raise ValueError(f"{name} head dimension {dim // heads} must be a multiple of 4 for 2D RoPE")

    def _check_lines(self) -> None:
        if self.n_lines < 4 or self.n_lines % 2:
            raise ValueError(f"n_lines must be an even number >= 4, got {self.n_lines}")
        if not 0 <= self.similarity_lag < self.line_samples // 2:
            raise ValueError(f"similarity_lag must be in [0, line_samples/2), got {self.similarity_lag}")
        if self.line_samples < 4 or self.line_radii < 2:
            raise ValueError(f"need line_samples >= 4 and line_radii >= 2, got {self.line_samples}, {self.line_radii}")
        for name, dim, heads in (("enc", self.enc_dim, self.enc_heads), ("dec", self.dec_dim, self.dec_heads)):
            if dim % heads or (dim // heads) % 2:
                raise ValueError(f"{name}_dim {dim} must split into {name}_heads {heads} heads of even size")

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.box // self.patch

    @property
    def tokens(self) -> int:
        """Tokens per view T."""
        return self.n_lines if self.arch == "lines" else self.grid ** 2


def model_config(size: str, box: int, **overrides) -> ModelConfig:
    """The named size (``XS``, ``S``, ``M``, ``L``) at image side ``box``; patch = box // 8 (T = 64).

    Any :class:`ModelConfig` field may be overridden by keyword.
    """
    key = size.upper()
    if key not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    if box % TOKENS_PER_SIDE and "patch" not in overrides and overrides.get("arch") != "lines":
        raise ValueError(f"box {box} is not a multiple of {TOKENS_PER_SIDE}; pass patch= explicitly")
    params = dict(MODEL_SIZES[key], box=box, patch=max(1, box // TOKENS_PER_SIDE))
    params.update(overrides)
    return ModelConfig(**params)
