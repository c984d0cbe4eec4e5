"""Model configuration: the architecture hyper-parameters and the named sizes (design brief §2.2)."""
from __future__ import annotations

from dataclasses import dataclass

# Encoder (d / layers / heads), decoder per stack (d / layers / heads) and head neck width.
MODEL_SIZES: dict[str, dict] = {
    "XS": dict(enc_dim=256, enc_depth=6, enc_heads=4, dec_dim=256, dec_depth=4, dec_heads=4, neck_dim=128),
    "S": dict(enc_dim=384, enc_depth=12, enc_heads=6, dec_dim=384, dec_depth=6, dec_heads=6, neck_dim=256),
    "M": dict(enc_dim=768, enc_depth=12, enc_heads=12, dec_dim=512, dec_depth=8, dec_heads=8, neck_dim=256),
    "L": dict(enc_dim=1024, enc_depth=24, enc_heads=16, dec_dim=768, dec_depth=12, dec_heads=12, neck_dim=256),
}

TOKENS_PER_SIDE = 8  # T = 64 tokens per view at every box size (brief §2.2)


@dataclass
class ModelConfig:
    """Architecture of :class:`~cryofastar_core.model.network.CryoFastAR`.

    ``box`` is the image side D in pixels, ``patch`` the ViT patch side p (``box % patch == 0``).
    ``xyz_grid_base``: the xyz heads predict a residual added to the planar grid ``ū/2 + 1/2``
    (the reference's own FPM for zero shift), so a freshly initialised model outputs a valid plane
    instead of a constant; switch off for a plain linear head as in the official code.
    ``head``: ``"linear"`` (per-pixel linear as in the official code, the default) or ``"affine"``
    (each token writes ``A ū + b`` over its pixels); see :mod:`cryofastar_core.model.heads`.
    ``abs_pos``: add a fixed sine-cosine embedding of each patch's position to the encoder's tokens
    (besides RoPE); see :class:`~cryofastar_core.model.encoder.Encoder`. Both alternatives are
    experiments: on CPU budgets neither stopped the collapse described in the model card, so the
    defaults stay the form the paper trained at scale.
    ``ref_channel``: early fusion, each view's patches are embedded with the reference image's as a
    second channel (an experiment; the paper fuses views only in the decoder).
    ``stem``: ``"patch"`` (one p×p linear patch embedding, the paper's) or ``"conv"`` (stride-2 3×3
    convolutions down to the patch grid; needs a power-of-two patch); see
    :func:`~cryofastar_core.model.encoder.conv_stem`.
    ``checkpointing``: activation checkpointing of every transformer block during training.
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
    head: str = "linear"
    abs_pos: bool = False
    ref_channel: bool = False
    stem: str = "patch"

    def __post_init__(self) -> None:
        if self.abs_pos and self.enc_dim % 4:
            raise ValueError(f"enc_dim {self.enc_dim} must be a multiple of 4 for the position embedding")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "conv" and (self.patch < 2 or self.patch & (self.patch - 1)):
            raise ValueError(f"stem 'conv' needs a power-of-two patch size, got {self.patch}")
        if self.head not in ("affine", "linear"):
            raise ValueError(f"head must be 'affine' or 'linear', got {self.head!r}")
        if self.patch <= 0 or self.box % self.patch:
            raise ValueError(f"box {self.box} is not a multiple of patch {self.patch}")
        for name, dim, heads in (("enc", self.enc_dim, self.enc_heads), ("dec", self.dec_dim, self.dec_heads)):
            if dim % heads:
                raise ValueError(f"{name}_dim {dim} is not divisible by {name}_heads {heads}")
            if (dim // heads) % 4:
                # 2D RoPE splits each head in a row half and a column half of rotation pairs.
                raise ValueError(f"{name} head dimension {dim // heads} must be a multiple of 4 for 2D RoPE")

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.box // self.patch

    @property
    def tokens(self) -> int:
        """Tokens per view T."""
        return self.grid ** 2


def model_config(size: str, box: int, **overrides) -> ModelConfig:
    """The named size (``XS``, ``S``, ``M``, ``L``) at image side ``box``; patch = box // 8 (T = 64).

    Any :class:`ModelConfig` field may be overridden by keyword.
    """
    key = size.upper()
    if key not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    if box % TOKENS_PER_SIDE and "patch" not in overrides:
        raise ValueError(f"box {box} is not a multiple of {TOKENS_PER_SIDE}; pass patch= explicitly")
    params = dict(MODEL_SIZES[key], box=box, patch=box // TOKENS_PER_SIDE)
    params.update(overrides)
    return ModelConfig(**params)
