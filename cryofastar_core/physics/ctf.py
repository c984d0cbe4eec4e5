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
            t = torch.as_tensor(np.array(v, dtype=np.float64) if not torch.is_tensor(v) else v, dtype=dtype, device=device)
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


def electron_wavelength(voltage_kv: torch.Tensor) -> torch.Tensor:
    """Relativistic electron wavelength in Å for an accelerating voltage in kV (RELION's constants)."""
    v = voltage_kv * 1e3
    return 12.2643247 / torch.sqrt(v * (1.0 + v * 0.978466e-6))


def compute_ctf(params: CTFParams, box: int, apix: torch.Tensor | float) -> torch.Tensor:
    """Centred CTF images ``(B, D, D)`` for ``B`` particles, as RELION computes them (compared pixel by pixel
    with ``relion_project --ctf`` in ``tests/test_physics_relion.py``).

    ``CTF(k) = -scale * exp(-B |k|^2 / 4) * sin(pi*lambda*(-dz(k))*|k|^2 + pi/2*Cs*lambda^3*|k|^4 - phase_shift - w)``
    with ``w = atan(Q / sqrt(1 - Q^2))`` (amplitude contrast ``Q``), ``k`` in 1/Å and
    ``dz(k) = (U + V)/2 + (U - V)/2 * cos(2 (atan2(ky, kx) - angle))`` (underfocus positive), so the CTF is
    positive at low frequency and the defocus-angle 0 puts ``U`` along x (image columns). ``apix``: float or
    ``(B,)`` Å/px. Per-particle constants are formed in float64; the per-pixel phase runs in ``params``'
    dtype (float32: CTF error up to 1e-4 at box 256, 1 Å/px, 3 µm; float64 matches RELION to 1e-7).
    """
    dev = params.defocus_u.device
    dt = params.defocus_u.dtype if params.defocus_u.is_floating_point() else torch.float64
    apix_t = torch.as_tensor(apix, dtype=torch.float64, device=dev).reshape(-1, 1, 1)
    k = (torch.arange(box, device=dev, dtype=torch.float64) - box // 2) / box
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    return ctf_at_frequencies(params, (kx[None] / apix_t).to(dt), (ky[None] / apix_t).to(dt))


def ctf_at_frequencies(params: CTFParams, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """The CTF of :func:`compute_ctf` at arbitrary frequencies ``kx, ky`` in 1/Å, shape ``(B, ...)``
    (broadcast against the ``(B,)`` parameters).

    Computed in the dtype of ``kx`` (float32 is enough for simulation and back-projection: the phase
    error stays below 1e-4 rad) and returned in ``params``' dtype.
    """
    dt = kx.dtype if kx.is_floating_point() else torch.float64
    kx, ky = kx.to(dt), ky.to(dt)
    extra = (1,) * (max(kx.ndim, ky.ndim) - 1)
    p = {name: getattr(params, name).to(device=kx.device, dtype=torch.float64).reshape(-1, *extra) for name in (
        "defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast", "phase_shift", "bfactor",
        "scale")}
    lam = electron_wavelength(p["voltage"])
    q = p["amplitude_contrast"]
    a = torch.deg2rad(p["defocus_angle"])
    # Per-particle constants in float64; only the per-frequency terms run in ``dt``.
    # cos(2 (theta - a)) = ((kx^2 - ky^2) cos 2a + 2 kx ky sin 2a) / k^2 avoids atan2; at DC the
    # astigmatic term vanishes with k^2, which is RELION's "mean defocus at DC".
    mean_term = (-torch.pi * lam * 0.5 * (p["defocus_u"] + p["defocus_v"])).to(dt)
    astig = -torch.pi * lam * 0.5 * (p["defocus_u"] - p["defocus_v"])
    astig_c, astig_s = (astig * torch.cos(2 * a)).to(dt), (astig * 2 * torch.sin(2 * a)).to(dt)
    cs_term = (0.5 * torch.pi * (p["cs"] * 1e7) * lam ** 3).to(dt)
    offset = (torch.deg2rad(p["phase_shift"]) + torch.atan(q / torch.sqrt(1 - q * q))).to(dt)
    k2 = kx * kx + ky * ky
    chi = mean_term * k2 + astig_c * (kx * kx - ky * ky) + astig_s * (kx * ky) + cs_term * k2 * k2 - offset
    ctf = -torch.sin(chi) * (torch.exp((-p["bfactor"] / 4.0).to(dt) * k2) * p["scale"].to(dt))
    return ctf.to(params.defocus_u.dtype)


CTF_CORRECTIONS = ("none", "phase_flip")  # what a model may ask its input images to get


def phase_flip(images: torch.Tensor, params: CTFParams, apix: torch.Tensor | float) -> torch.Tensor:
    """Images ``(..., B, D, D)`` (``B`` = ``len(params)``) with each Fourier component multiplied by
    the sign of its CTF.

    Undoes the CTF's contrast reversals without amplifying noise (the amplitudes keep the CTF's
    envelope); at low SNR the standard first step before comparing particles of different defocus.
    """
    from cryofastar_core.physics.fourier import fft2c, ifft2c

    box = images.shape[-1]
    apix = torch.as_tensor(apix, dtype=torch.float64, device=images.device)
    ctf = compute_ctf(params.to(images.device), box, apix)
    x = images if images.is_floating_point() else images.float()
    return ifft2c(fft2c(x) * torch.sign(ctf).to(x.dtype)).real
