"""Contrast transfer function parameters (per particle) and the CTF itself."""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass
class CTFParams:
    """Per-particle CTF parameters, each a tensor of shape ``(B,)``, in RELION's units.

    ``defocus_u``/``defocus_v`` in Å (underfocus positive), ``defocus_angle`` in degrees,
    ``voltage`` in kV, ``cs`` in mm, ``amplitude_contrast`` as a fraction, ``phase_shift`` in degrees,
    ``bfactor`` in Å², ``scale`` dimensionless.
    """

    defocus_u: torch.Tensor
    defocus_v: torch.Tensor
    defocus_angle: torch.Tensor
    voltage: torch.Tensor
    cs: torch.Tensor
    amplitude_contrast: torch.Tensor
    phase_shift: torch.Tensor
    bfactor: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray | torch.Tensor], dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> "CTFParams":
        n = len(next(iter(arrays.values())))
        defaults = {"phase_shift": 0.0, "bfactor": 0.0, "scale": 1.0}
        out = {}
        for f in fields(cls):
            v = arrays.get(f.name, defaults.get(f.name))
            if v is None:
                raise KeyError(f"CTF parameter '{f.name}' is missing")
            t = torch.as_tensor(np.asarray(v, dtype=np.float64) if not torch.is_tensor(v) else v, dtype=dtype, device=device)
            out[f.name] = t.expand(n).clone() if t.ndim == 0 else t
        return cls(**out)

    def __len__(self) -> int:
        return self.defocus_u.shape[0]

    def index(self, idx: torch.Tensor | slice | np.ndarray) -> "CTFParams":
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx)
        return CTFParams(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "CTFParams":
        return CTFParams(**{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)})
