"""On-the-fly training data, simulated on the training device.

A *sample* is ``V`` views of ONE volume: a Haar-uniform reference pose and auxiliary poses whose
viewing directions lie within the stage's current maximum tilt of the reference's (Haar-uniform at
180°), uniform shifts, optional per-view
CTF (random defocus and astigmatism) at a per-sample pixel size, white noise at the stage's SNR, and
then :func:`~cryofastar_core.physics.normalize.normalize_images`, the normalisation inference uses.
Targets are FPMs with view 0 as the reference.

Determinism: every random number of a sample comes from generators seeded by
``(seed, stream, step, global sample index)``. The data are therefore a pure function of the step,
identical after a resume and identical whatever the split of the global batch over distributed ranks
(rank ``r`` simulates global samples ``[r * b, (r + 1) * b)``). Small pose/CTF draws use a CPU
generator; the noise uses a generator on the training device, so nothing waits on a host transfer
of images.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from cryofastar_core.geometry import random_rotations, rotations_within_tilt
from cryofastar_core.physics.ctf import CTFParams
from cryofastar_core.physics.normalize import normalize_images
from cryofastar_core.physics.projection import VolumeFT, prepare_volume
from cryofastar_core.simulation.images import simulate_images

from cryofastar_core.training.config import StageConfig

TRAIN_STREAM = 0
VALIDATION_STREAM = 1


class VolumeSource(Protocol):
    """What the simulator needs from a volume library: a length and ``(D, D, D)`` float volumes."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Tensor: ...


@dataclass
class TrainingBatch:
    """One batch of ``B`` samples of ``V`` views, box ``D``, all on the training device.

    ``images``: ``(B, V, D, D)`` normalised noisy inputs. ``clean``: ``(B, V, D, D)`` the noise-free
    images under the SAME per-image affine normalisation (the denoising target). ``targets(grid)``:
    normalised FPMs at a model's in-plane points (view 0 the reference). ``rotations`` ``(B, V, 3, 3)``,
    ``shifts`` ``(B, V, 2)`` px (internal convention), ``volume_index`` ``(B,)`` int64, ``snr`` the
    requested SNR (``None``: clean), ``ctf``: whether a CTF was applied.
    """

    images: Tensor
    clean: Tensor
    rotations: Tensor
    shifts: Tensor
    volume_index: Tensor
    snr: float | None
    ctf: bool

    @property
    def views(self) -> int:
        return self.images.shape[1]

    def targets(self, grid: Tensor | None = None) -> Tensor:
        """Normalised FPM targets ``(B, V, *P, 3)`` at in-plane points ``grid`` ``(*P, 3)`` (default:
        the dense planar grid of the box, ``P = (D, D)``)."""
        from cryofastar_core.model.fpm import fpm_targets

        return fpm_targets(self.rotations[:, 0], self.rotations, self.shifts, self.images.shape[-1], grid)


class VolumeFTCache:
    """A bounded LRU cache of prepared volume transforms on one device (prepared once, reused)."""

    def __init__(self, source: VolumeSource, device: torch.device | str, capacity: int = 64, pad: int = 2):
        self.source, self.device, self.capacity, self.pad = source, torch.device(device), max(1, capacity), pad
        self._cache: OrderedDict[int, VolumeFT] = OrderedDict()

    def __len__(self) -> int:
        return len(self.source)

    def get(self, index: int) -> VolumeFT:
        vft = self._cache.get(index)
        if vft is not None:
            self._cache.move_to_end(index)
            return vft
        volume = torch.as_tensor(self.source[index], dtype=torch.float32).to(self.device)
        vft = prepare_volume(volume, pad=self.pad)
        self._cache[index] = vft
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return vft


def sample_seed(seed: int, stream: int, step: int, index: int) -> int:
    """A 63-bit seed for one sample, decorrelated from neighbours by numpy's SeedSequence hashing."""
    state = np.random.SeedSequence([seed, stream, step, index]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


@dataclass
class SampleDraw:
    """The random parameters of one sample (CPU tensors); the noise is drawn later, on the device."""

    volume_index: int
    rotations: Tensor  # (V, 3, 3) float32
    shifts: Tensor  # (V, 2) float32, px
    ctf: CTFParams | None  # V entries
    apix: float
    clean: bool = False  # a rung-1 sample (``StageConfig.clean_fraction``): no noise, CTF or shifts


def draw_sample(stage: StageConfig, n_volumes: int, views: int, generator: torch.Generator,
                max_tilt_deg: float = 180.0) -> SampleDraw:
    """Draw one sample's volume, poses, shifts and CTF from a CPU ``generator``; auxiliary views lie
    within ``max_tilt_deg`` of the reference's viewing direction."""
    g = generator
    if stage.volumes == "single":
        vol = stage.single_index
    else:
        vol = int(torch.randint(n_volumes, (1,), generator=g))
    if max_tilt_deg >= 180.0:
        rotations = random_rotations(views, generator=g, dtype=torch.float32)
    else:
        ref = random_rotations(1, generator=g, dtype=torch.float64)
        rel = rotations_within_tilt(views - 1, max_tilt_deg, generator=g, dtype=torch.float64)
        rotations = torch.cat([ref, ref @ rel]).float()  # R_i = R_0 Q_i, so the FPM rotation is Q_i
    shifts = (torch.rand(views, 2, generator=g, dtype=torch.float64) * 2 - 1) * stage.max_shift_px
    apix = stage.apix_min + (stage.apix_max - stage.apix_min) * float(torch.rand(1, generator=g, dtype=torch.float64))
    ctf = None
    if stage.ctf:
        u = torch.rand(views, 4, generator=g, dtype=torch.float64)
        mean_defocus = stage.defocus_min + (stage.defocus_max - stage.defocus_min) * u[:, 0]
        astig = stage.astigmatism_max * u[:, 1]
        ctf = CTFParams.from_arrays({
            "defocus_u": mean_defocus + astig / 2,
            "defocus_v": mean_defocus - astig / 2,
            "defocus_angle": 180.0 * u[:, 2],
            "voltage": torch.full((views,), stage.voltage, dtype=torch.float64),
            "cs": torch.full((views,), stage.cs, dtype=torch.float64),
            "amplitude_contrast": torch.full((views,), stage.amplitude_contrast, dtype=torch.float64),
            "bfactor": stage.bfactor_max * u[:, 3],
        })
    # Drawn last, and only when asked for, so stages without it keep their random streams.
    if stage.clean_fraction > 0 and float(torch.rand(1, generator=g, dtype=torch.float64)) < stage.clean_fraction:
        return SampleDraw(vol, rotations, torch.zeros(views, 2), None, apix, clean=True)
    return SampleDraw(vol, rotations, shifts.float(), ctf, apix)


def normalize_pair(noisy: Tensor, clean: Tensor) -> tuple[Tensor, Tensor]:
    """Normalise ``noisy`` ``(N, D, D)`` with :func:`normalize_images`, and ``clean`` with the same
    per-image affine map ``x -> a x + b``.

    The map is recovered by least squares between the raw and normalised noisy image (exact, since the
    shared normalisation is affine per image), so the clean image is the noise-free part of the input
    on the input's own scale: the conditional mean an L2 denoiser should output.
    """
    norm = normalize_images(noisy)
    x = noisy - noisy.mean(dim=(-2, -1), keepdim=True)
    y = norm - norm.mean(dim=(-2, -1), keepdim=True)
    var = (x * x).mean(dim=(-2, -1), keepdim=True)
    a = torch.where(var > 0, (x * y).mean(dim=(-2, -1), keepdim=True) / var.clamp_min(torch.finfo(var.dtype).tiny),
                    torch.zeros_like(var))
    b = norm.mean(dim=(-2, -1), keepdim=True) - a * noisy.mean(dim=(-2, -1), keepdim=True)
    return norm, a * clean + b


class BatchSimulator:
    """Simulates :class:`TrainingBatch` es for one stage's volume source on one device."""

    def __init__(self, volumes: VolumeFTCache, box: int, device: torch.device | str):
        self.volumes, self.box, self.device = volumes, box, torch.device(device)

    def make_batch(self, stage: StageConfig, *, seed: int, step: int, first_sample: int, n_samples: int,
                   views: int, snr: float | None, stream: int = TRAIN_STREAM,
                   max_tilt_deg: float = 180.0, ctf_correction: str = "none") -> TrainingBatch:
        """Samples ``first_sample .. first_sample + n_samples - 1`` of global step ``step``;
        ``ctf_correction``: the model's (:func:`cryofastar_core.inference.preprocess.correct_ctf`),
        applied to the noisy and the clean images alike, as inference applies it to particles."""
        from cryofastar_core.inference.preprocess import correct_ctf

        n_volumes = len(self.volumes)
        draws, noise_seeds = [], []
        for i in range(first_sample, first_sample + n_samples):
            s = sample_seed(seed, stream, step, i)
            draws.append(draw_sample(stage, n_volumes, views, torch.Generator().manual_seed(s), max_tilt_deg))
            noise_seeds.append(s ^ 0x2545F4914F6CDD1D)
        cleans, noisies = [], []
        for d, ns in zip(draws, noise_seeds):
            vft = self.volumes.get(d.volume_index)
            gen = torch.Generator(device=self.device).manual_seed(ns & ((1 << 63) - 1))
            ctf = d.ctf.to(self.device) if d.ctf is not None else None
            clean, noisy = simulate_images(vft, d.rotations.to(self.device), d.shifts.to(self.device), ctf,
                                           apix=d.apix, snr=None if d.clean else snr, generator=gen)
            clean, noisy = correct_ctf(torch.stack([clean, noisy]), ctf, d.apix, ctf_correction)
            cleans.append(clean)
            noisies.append(noisy)
        D = self.box
        noisy_all = torch.stack(noisies).reshape(n_samples * views, D, D)
        clean_all = torch.stack(cleans).reshape(n_samples * views, D, D)
        images, clean_n = normalize_pair(noisy_all, clean_all)
        rotations = torch.stack([d.rotations for d in draws]).to(self.device)
        shifts = torch.stack([d.shifts for d in draws]).to(self.device)
        return TrainingBatch(
            images=images.reshape(n_samples, views, D, D),
            clean=clean_n.reshape(n_samples, views, D, D),
            rotations=rotations,
            shifts=shifts,
            volume_index=torch.tensor([d.volume_index for d in draws], dtype=torch.int64),
            snr=snr,
            ctf=stage.ctf,
        )
