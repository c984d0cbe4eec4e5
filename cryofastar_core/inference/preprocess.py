"""The one preprocessing path from raw particle pixels to model input, shared with training.

Training simulates images at the model box and passes them through :func:`correct_ctf` and
``normalize_images``; inference presents real particles the same way: contrast sign applied, the
model's CTF correction at the particles' own box and pixel size, Fourier-cropped (or padded) to the
model box, then the same normalisation. Which CTF correction a model expects is part of its
configuration (``ModelConfig.ctf_correction``), so weights and preprocessing cannot drift apart.
"""
from __future__ import annotations

import numpy as np
import torch

from cryofastar_core.physics.ctf import CTF_CORRECTIONS, CTFParams, phase_flip
from cryofastar_core.physics.fourier import fourier_crop, fourier_pad
from cryofastar_core.physics.normalize import normalize_images

def correct_ctf(images: torch.Tensor, ctf: CTFParams | None, apix: torch.Tensor | float, mode: str) -> torch.Tensor:
    """The model's CTF correction of images ``(..., B, D, D)`` at their own pixel size ``apix`` (Å/px).

    ``mode`` ``"none"`` returns the images; ``"phase_flip"`` flips the sign of every Fourier component
    where the CTF is negative (:func:`~cryofastar_core.physics.ctf.phase_flip`); without CTF
    parameters (simulated clean data, or a particle file without CTF) there is nothing to correct.
    """
    if mode not in CTF_CORRECTIONS:
        raise ValueError(f"unknown CTF correction {mode!r}; use one of {CTF_CORRECTIONS}")
    if mode == "none" or ctf is None:
        return images
    return phase_flip(images, ctf, apix)


def to_model_input(images: np.ndarray | torch.Tensor, model_box: int, sign: np.ndarray | torch.Tensor | None = None,
                   device: torch.device | str = "cpu", ctf: CTFParams | None = None,
                   apix: torch.Tensor | float = 1.0, ctf_correction: str = "none") -> torch.Tensor:
    """Raw particles ``(B, D0, D0)`` -> model input ``(B, d, d)`` float32 on ``device``.

    ``sign`` (``(B,)``) multiplies each image first (CryoSPARC ``blob/sign``) so that protein density
    is positive, the convention the simulator trains with. ``ctf`` (``B`` entries) and ``apix`` (Å/px
    of the raw particles) feed the model's ``ctf_correction`` (:func:`correct_ctf`).
    """
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images, dtype=torch.float32, device=device)
    if sign is not None:
        s = torch.as_tensor(np.asarray(sign) if not torch.is_tensor(sign) else sign, dtype=torch.float32, device=device)
        x = x * s.reshape(-1, 1, 1)
    x = correct_ctf(x, ctf, apix, ctf_correction)
    box = x.shape[-1]
    if box > model_box:
        x = fourier_crop(x, model_box)
    elif box < model_box:
        x = fourier_pad(x, model_box)
    return normalize_images(x)


def model_px_to_input_px(original_box: int, model_box: int) -> float:
    """Factor that converts a shift in model-box pixels to pixels of the original particle box."""
    return original_box / model_box
