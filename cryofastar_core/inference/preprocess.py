"""The one preprocessing path from raw particle pixels to model input, shared with training.

Training simulates images at the model box and passes them through ``normalize_images``; inference
must present real particles the same way: contrast sign applied, Fourier-cropped (or padded) to the
model box, then the same normalisation.
"""
from __future__ import annotations

import numpy as np
import torch

from cryofastar_core.physics.fourier import fourier_crop, fourier_pad
from cryofastar_core.physics.normalize import normalize_images


def to_model_input(images: np.ndarray | torch.Tensor, model_box: int, sign: np.ndarray | torch.Tensor | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Raw particles ``(B, D0, D0)`` -> model input ``(B, d, d)`` float32 on ``device``.

    ``sign`` (``(B,)``) multiplies each image first (CryoSPARC ``blob/sign``) so that protein density
    is positive, the convention the simulator trains with.
    """
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images, dtype=torch.float32, device=device)
    if sign is not None:
        s = torch.as_tensor(np.asarray(sign) if not torch.is_tensor(sign) else sign, dtype=torch.float32, device=device)
        x = x * s.reshape(-1, 1, 1)
    box = x.shape[-1]
    if box > model_box:
        x = fourier_crop(x, model_box)
    elif box < model_box:
        x = fourier_pad(x, model_box)
    return normalize_images(x)


def model_px_to_input_px(original_box: int, model_box: int) -> float:
    """Factor that converts a shift in model-box pixels to pixels of the original particle box."""
    return original_box / model_box
