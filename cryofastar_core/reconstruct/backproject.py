"""CTF-aware direct Fourier back-projection (in the style of ``relion_reconstruct``), half maps.

Method. Each image is transformed on its own ``D x D`` grid (no real-space padding), un-shifted (conjugate
phase ramp) and multiplied by its CTF evaluated on that same grid. This matters: simulators,
``relion_project`` and particle extraction apply the CTF to the image's ``D``-grid transform (a circular
convolution in real space), so only a CTF evaluated on the ``D`` grid inverts it; zero-padding the image
first and dividing by the CTF on the finer grid fails once the CTF's point spread exceeds the box (high
defocus, small box: FSC 0.44 at 0.75 Nyquist before this change). ``CTF * F`` and ``CTF^2`` are then
splatted with trilinear weights at ``pad * R (kx, ky, 0)`` into a ``pad``-times oversampled 3D grid
(``(pad D)^3``, default ``pad = 2``), so the map's real-space field is ``pad D`` wide and the replicas that
the ``1 / D`` sample spacing creates fall outside the cropped box. Only half of each image transform is
inserted, and only half of the 3D spectrum is stored (``kx >= 0``: a sample that lands at ``kx < 0`` is
inserted, conjugated, at ``-k``), which halves the accumulators' memory; Friedel symmetry completes the
``kx = 0`` plane at ``finalize``. ``finalize`` divides
``numerator / (weight + c)`` voxel by voxel (``c`` a small Wiener-like constant), inverse-transforms the
half spectrum (slab by slab, cropping to ``D`` rows after each axis), and divides the ``D^3`` map by the
real-space transform of the trilinear kernel (``sinc^2`` per axis, the gridding correction).

Tried and not used: Pipe-Menon iterative preweighting of the weights (RELION's default), worse FSC
against the truth than the plain division at every tested size, and slower; real-space 2x padding of the
images. Accuracy and speed against ``relion_reconstruct``: ``bench/bench_physics.py`` (results in
``bench/results/2026-11-24-backprojection.md``); tests/test_reconstruct_backproject.py and
tests/test_relion_conventions.py hold the agreement with RELION.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from cryofastar_core.physics import compiled
from cryofastar_core.physics.ctf import CTFParams, ctf_at_frequencies
from cryofastar_core.physics.projection import gridding_kernel
from cryofastar_core.reconstruct.half_sets import random_half_sets

DEFAULT_RELATIVE_WIENER = 1e-3
FINALIZE_SLAB = 16  # kx columns per slab in finalize: (Dp, Dp, 16) complex is 34 MB at box 256


class Backprojector:
    """Accumulates ``sum CTF * F`` (``numerator``, complex) and ``sum CTF^2`` (``weight``, real) on the
    ``kx >= 0`` half of a Fourier grid of spacing ``1 / (pad * box)`` cycles/px: shape ``(n, n, n // 2)``
    with ``n = pad * box + 2 pad + 4`` (a margin around the ``(pad * box)^3`` grid), ``kz`` and ``ky``
    centred at index ``n // 2``, ``kx`` at index ``kx``. Both are public, contiguous tensors so that
    distributed ranks can ``torch.distributed.all_reduce`` them (SUM) before :meth:`finalize`.

    Each image contributes the samples of its own ``box``-grid transform (half of them, see the module
    docstring) at ``pad`` times their frequency index; ``pad = 1`` works but its real-space field is only
    one box wide (replicas of the kernel's attenuation fold back; lower FSC).
    ``r_max``: insertion radius in shells of the ``box`` image (default ``box / 2 + 0.5``: the whole
    Nyquist shell, as the FSC counts it; at most ``box / 2 + 1``).
    ``chunk_points``: Fourier samples scattered per step (bounds memory; about 100 bytes each).
    """

    def __init__(self, box: int, device=None, pad: int = 2, dtype: torch.dtype = torch.float32,
                 r_max: float | None = None, chunk_points: int = 1 << 21):
        if pad < 1:
            raise ValueError("pad must be >= 1")
        self.box, self.pad, self.dtype = box, pad, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        Dp = self.padded_box = box * pad
        # The accumulators carry a margin around the (Dp)^3 Fourier grid so that samples out to the
        # outer edge of the Nyquist shell keep all 8 trilinear neighbours inside; finalize crops it away.
        n = self._grid_n = Dp + 2 * pad + 4
        cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
        self.numerator = torch.zeros((n, n, n // 2), dtype=cdtype, device=self.device)
        self.weight = torch.zeros((n, n, n // 2), dtype=dtype, device=self.device)
        self.chunk_points = int(chunk_points)
        # Radius in padded-grid units; all 8 trilinear neighbours stay inside [1, n - 1] (kz, ky) and
        # [0, n // 2 - 1] (kx), so finalize can read the Friedel partner in the kx = 0 plane from the same array.
        r = (box / 2 + 0.5 if r_max is None else float(r_max)) * pad
        self.r_max_padded = min(r, Dp / 2 + pad)
        # Half of each image transform (kx > 0, plus kx = 0 with ky >= 0) on the image's own D grid,
        # read from rfft2's output; positions on the oversampled grid are these times pad.
        q = torch.arange(box, device=self.device, dtype=dtype) - box // 2
        qy, qx = torch.meshgrid(q, q, indexing="ij")
        half = (qx > 0) | ((qx == 0) & (qy >= 0))
        # For an even box the row ky = -D/2 of a real image's transform mixes the +-Nyquist samples (the
        # image cannot tell them apart), so it is not a sample at ky = -1/2: left out.
        keep = half & (qy > -(box // 2)) if box % 2 == 0 else half
        keep = (keep & ((qx * qx + qy * qy) * pad * pad <= self.r_max_padded ** 2)).reshape(-1)
        self._qx = qx.reshape(-1)[keep]                          # grid units of the image (D grid)
        self._qy = qy.reshape(-1)[keep]
        # position in rfft2(ifftshift(image)) (rows in FFT order, columns kx = 0 .. D / 2)
        self._pix = (torch.remainder(self._qy.long(), box) * (box // 2 + 1) + self._qx.long())

    @property
    def n_points(self) -> int:
        """Fourier samples inserted per image."""
        return int(self._pix.numel())

    def insert(self, images: Tensor, rotations: Tensor, shifts: Tensor | None = None, ctf: CTFParams | None = None,
               apix: float | Tensor | None = None, weights: Tensor | None = None) -> None:
        """Add ``B`` real images ``(B, D, D)`` with rotations ``(B, 3, 3)``, shifts ``(B, 2)`` px (origin
        convention; undone here), per-particle CTF (needs ``apix`` Å/px, float or ``(B,)``) and optional
        per-image weights ``(B,)``. Inputs are moved to the accumulator's device; processed in chunks."""
        if images.ndim != 3 or images.shape[-1] != self.box or images.shape[-2] != self.box:
            raise ValueError(f"insert expects images (B, {self.box}, {self.box}), got {tuple(images.shape)}")
        if ctf is not None and apix is None:
            raise ValueError("insert: apix (Å/px) is needed to evaluate the CTF")
        B = images.shape[0]
        step = max(1, self.chunk_points // max(1, self.n_points))
        for s in range(0, B, step):
            sl = slice(s, min(B, s + step))
            apix_c = apix[sl] if (torch.is_tensor(apix) and apix.ndim > 0) else apix
            self._insert_chunk(images[sl], rotations[sl], None if shifts is None else shifts[sl],
                               None if ctf is None else ctf.index(sl), apix_c,
                               None if weights is None else weights[sl])

    def _insert_chunk(self, images, rotations, shifts, ctf, apix, weights) -> None:
        dev, rdt, D = self.device, self.dtype, self.box
        images = images.to(device=dev, dtype=rdt)
        B = images.shape[0]
        ft = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1))).reshape(B, -1)[:, self._pix]  # (B, M)
        kx = self._qx / D   # cycles/px
        ky = self._qy / D
        if shifts is not None:
            s = shifts.to(device=dev, dtype=rdt)
            phase = -2 * torch.pi * (kx[None] * s[:, 0:1] + ky[None] * s[:, 1:2])
            ft = ft * torch.polar(torch.ones_like(phase), phase)
        if ctf is not None:
            a = torch.as_tensor(apix, dtype=rdt, device=dev).reshape(-1, 1)
            c = ctf_at_frequencies(ctf.to(dev), kx[None] / a, ky[None] / a).to(rdt)
            ft = ft * c
            w2 = c * c
        else:
            w2 = torch.ones((B, 1), device=dev, dtype=rdt).expand(B, ft.shape[1])
        if weights is not None:
            wb = weights.to(device=dev, dtype=rdt)[:, None]
            ft = ft * wb
            w2 = w2 * wb
        R = rotations.to(device=dev, dtype=rdt)
        qx, qy = self._qx * self.pad, self._qy * self.pad
        if compiled.usable_for(self.numerator, self.weight):
            compiled.insert_slices(R, qx, qy, ft, w2, self.numerator, self.weight)
            return
        coords = (qx[None, :, None] * R[:, None, :, 0] + qy[None, :, None] * R[:, None, :, 1]).reshape(-1, 3)
        values = ft.reshape(-1)
        # the stored half is kx >= 0: a sample at k with kx < 0 is the conjugate sample at -k
        mirror = coords[:, 0] < 0
        coords = torch.where(mirror[:, None], -coords, coords)
        values = torch.where(mirror, values.conj(), values)
        _splat_trilinear(coords, values, w2.reshape(-1), self.numerator.view(-1), self.weight.view(-1),
                         self.numerator.shape)

    def add_(self, other: "Backprojector") -> "Backprojector":
        """Accumulate another backprojector of the same geometry (e.g. half 1 + half 2)."""
        if (other.box, other.pad) != (self.box, self.pad):
            raise ValueError("cannot add backprojectors of different grids")
        self.numerator += other.numerator.to(self.device)
        self.weight += other.weight.to(self.device)
        return self

    def finalize(self, wiener_constant: float | None = None, gridding_correction: bool = True) -> Tensor:
        """The reconstructed ``(D, D, D)`` real map (the accumulators are left unchanged).

        ``vol_ft = numerator / (weight + c)`` inside the insertion sphere, 0 outside. ``wiener_constant``
        is ``c`` in units of ``sum CTF^2 * weights`` (a flat Wiener filter; for noisy data a value near
        ``1 / SNR`` of one image's Fourier sample is the classical choice); ``None`` uses ``1e-3 * mean(weight)`` over the sphere,
        which only tames voxels with almost no data (CTF zeros, gaps) and leaves well-sampled ones unbiased.
        RELION instead derives a per-shell ``1 / tau^2`` from the half-map FSC; not done here.

        Worked in slabs of ``kx`` columns: each slab is divided, transformed along ``kz`` and ``ky`` and
        cropped to the ``D`` central rows at once, and only the ``(D, D, Dp / 2 + 1)`` result meets the last
        transform; so no temporary of the padded grid's size is made (at box 256 the whole-grid form took
        1.6 GB beside the accumulators; bench/backprojector_memory.py).
        """
        Dp, D, hx = self.padded_box, self.box, self.padded_box // 2 + 1
        slabs = [(a, min(hx, a + FINALIZE_SLAB)) for a in range(0, hx, FINALIZE_SLAB)]
        yz2 = _radial_yz2(Dp, Dp // 2, self.device)
        if wiener_constant is None:
            total, count = 0.0, 0
            for a, b in slabs:
                wt = self._spectrum_slab(self.weight, a, b)
                live = _live_voxels(wt, yz2, self.r_max_padded, a)
                total += float(wt.masked_fill_(~live, 0).sum(dtype=torch.float64))
                count += int(live.count_nonzero())
            c = DEFAULT_RELATIVE_WIENER * total / count if count else 0.0
        else:
            c = float(wiener_constant)
        # the real-space origin sits at index 0 after the transforms: the D central voxels, wrapped
        crop = torch.remainder(torch.arange(D, device=self.device) - D // 2, Dp)
        half = torch.empty((D, D, hx), dtype=self.numerator.dtype, device=self.device)
        for a, b in slabs:
            num, wt = self._spectrum_slab(self.numerator, a, b), self._spectrum_slab(self.weight, a, b)
            live = _live_voxels(wt, yz2, self.r_max_padded, a)
            num.div_(wt.add_(c)).masked_fill_(~live, 0)
            del wt, live
            if Dp % 2:
                num = torch.fft.ifftshift(num, dim=(0, 1))   # origin at index 0
            half[:, :, a:b] = torch.fft.ifft(torch.fft.ifft(num, dim=0)[crop], dim=1)[:, crop]
        vol = torch.fft.irfft(half, n=Dp, dim=2)[:, :, crop]
        del half
        if Dp % 2 == 0:
            # the centred kz, ky axes put the origin at index Dp / 2: instead of an ifftshift, the transform
            # of the uncentred slab is the map times (-1)^(z + y), undone on the cropped box
            sign = 1.0 - 2.0 * (crop % 2).to(vol.dtype)
            vol = vol * sign[:, None, None] * sign[None, :, None]
        if gridding_correction:
            vol = vol / gridding_kernel(D, Dp, device=self.device, dtype=vol.dtype)
        return vol.contiguous()

    def _spectrum_slab(self, stored: Tensor, a: int, b: int) -> Tensor:
        """A copy of one accumulator (``numerator`` or ``weight``) as the half spectrum ``(Dp, Dp, b - a)`` at
        ``kx = a .. b - 1`` (``kz``, ``ky`` centred at ``Dp // 2``), completed where the stored half is not
        the spectrum: the ``kx = 0`` plane, where samples and their Friedel partners both landed (``S(0, k) =
        H(0, k) + conj(H(0, -k))``), and for an even ``Dp`` the Nyquist planes (:func:`_fold_nyquist_planes`).
        The conjugations leave the real weight as it is."""
        Dp, c0, h = self.padded_box, self._grid_n // 2, self.padded_box // 2
        zy = slice(c0 - h, c0 - h + Dp)
        slab = stored[zy, zy, a:b].clone()
        if a == 0:
            _complete_kx0_plane(slab, stored, c0, Dp)
        if Dp % 2 == 0:
            _fold_nyquist_planes(slab, stored, c0, h, a)
        return slab


def _live_voxels(wt: Tensor, yz2: Tensor, r_max: float, x0: int = 0) -> Tensor:
    """``(Dp, Dp, w)`` bool: voxels of the half-spectrum slab ``wt`` (kx from ``x0``) inside the insertion
    sphere of radius ``r_max`` that received data; ``yz2`` ``(Dp, Dp)``: ``kz^2 + ky^2`` of the slab's rows
    (float32 holds these integer sums exactly)."""
    fx2 = torch.arange(x0, x0 + wt.shape[-1], device=wt.device, dtype=torch.float32) ** 2
    return (wt > 0) & ((yz2[:, :, None] + fx2) <= r_max ** 2)


def _radial_yz2(Dp: int, h: int, device) -> Tensor:
    """``kz^2 + ky^2`` ``(Dp, Dp)`` float32 with both axes centred at ``h``."""
    f = (torch.arange(Dp, device=device, dtype=torch.float32) - h) ** 2
    return f[:, None] + f[None, :]


def _complete_kx0_plane(slab: Tensor, H: Tensor, c0: int, Dp: int) -> None:
    """The ``kx = 0`` plane of the half-spectrum slab ``(Dp, Dp, ·)`` completed in place with its Friedel
    partners, ``S(0, kz, ky) = H(0, kz, ky) + conj(H(0, -kz, -ky))``, read from the stored accumulator ``H``
    (centre ``c0``; a real weight is its own conjugate). For an even ``Dp`` the ``+Dp/2`` row and column
    (one line with ``-Dp/2`` on the periodic grid) are folded in too."""
    h = Dp // 2
    ext = slice(c0 - h, c0 + h + 1)  # kz, ky = -h .. +h: the flip maps k to -k
    plane = H[ext, ext, 0]
    full = plane + torch.flip(plane, dims=(0, 1)).conj()
    slab[:, :, 0] = full[:Dp, :Dp]
    if Dp % 2 == 0:
        slab[0, :, 0] += full[Dp, :Dp]
        slab[:, 0, 0] += full[:Dp, Dp]


def _fold_nyquist_planes(slab: Tensor, H: Tensor, c0: int, h: int, x0: int = 0) -> None:
    """Complete the ``-Dp/2`` planes of a half-spectrum slab (even ``Dp = 2 h``) in place, for its columns
    ``kx = x0 ..`` with ``kx > 0`` (:func:`_complete_kx0_plane` did ``kx = 0``).

    On the periodic ``Dp`` grid of the final transform the planes at ``-Dp/2`` and ``+Dp/2`` of each axis
    are one plane, so it gets the data inserted at both: ``slab`` ``(Dp, Dp, w)`` (kz, ky centred,
    kx = x0 .. x0 + w - 1) holds ``S(k)`` for kz, ky in ``[-h, h)``; the ``+h`` data come from the stored
    accumulator ``H`` (centre ``c0``, margin included). The cube's edges, where two axes are at Nyquist,
    lie outside the insertion sphere and are not completed.
    """
    lo, hi = max(x0, 1), min(x0 + slab.shape[-1], h + 1)   # columns kx = lo .. hi - 1 of this slab
    if lo < hi:
        zy, x, local = slice(c0 - h, c0 + h), slice(lo, hi), slice(lo - x0, hi - x0)
        slab[0, :, local] += H[c0 + h, zy, x]  # kz = +h is the plane kz = -h of the periodic grid
        slab[:, 0, local] += H[zy, c0 + h, x]  # ky = +h
    if not x0 <= h < x0 + slab.shape[-1]:
        return
    # kx = +h is stored; kx = -h is its Friedel partner within the plane: S(-h, ky, kz) = conj(S(h, -ky, -kz))
    col = h - x0
    plane = slab[:, :, col].clone()
    mirrored = torch.roll(torch.flip(plane, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))  # (ky, kz) -> (-ky, -kz)
    slab[:, :, col] = plane + mirrored.conj()


def _splat_trilinear(coords: Tensor, values: Tensor, weights: Tensor, numerator: Tensor, weight: Tensor,
                     shape: tuple[int, int, int]) -> None:
    """Add ``values`` (complex) and ``weights`` (real) at ``coords`` ``(M, 3)`` (x >= 0, y, z grid offsets
    from the centre of z and y, from index 0 of x) into the flat accumulators of ``shape`` ``(nz, ny, nx)``
    with trilinear weights.

    All 8 neighbours are known to lie inside the grid (the insertion radius guarantees it), so there are
    no bounds checks. One ``index_add_`` per corner and accumulator: complex ``index_add_`` is about 3x
    faster on CPU than adding ``(M, 2)`` real rows, and per-corner calls avoid ``(8, M)`` temporaries.
    """
    nz, ny, nx = shape
    g = coords + torch.tensor([0.0, float(ny // 2), float(nz // 2)], dtype=coords.dtype, device=coords.device)
    g0 = torch.floor(g)
    f = g - g0
    g0 = g0.long()
    base = (g0[:, 2] * ny + g0[:, 1]) * nx + g0[:, 0]
    fx, fy, fz = f.unbind(-1)
    for dz, wz in ((0, 1 - fz), (1, fz)):
        for dy, wy in ((0, 1 - fy), (1, fy)):
            wzy = wz * wy
            for dx, wx in ((0, 1 - fx), (1, fx)):
                w = wzy * wx
                idx = base + (dz * ny * nx + dy * nx + dx)
                numerator.index_add_(0, idx, values * w)
                weight.index_add_(0, idx, weights * w)


def reconstruct(images: Tensor, rotations: Tensor, shifts: Tensor | None = None, ctf: CTFParams | None = None,
                apix: float | Tensor | None = None, weights: Tensor | None = None, pad: int = 2,
                wiener_constant: float | None = None, device=None) -> Tensor:
    """One-shot reconstruction ``(D, D, D)`` from images ``(B, D, D)``; see :class:`Backprojector`."""
    bp = Backprojector(images.shape[-1], device=device if device is not None else images.device, pad=pad)
    bp.insert(images, rotations, shifts=shifts, ctf=ctf, apix=apix, weights=weights)
    return bp.finalize(wiener_constant)


def insert_half_sets(backprojectors: Sequence[Backprojector], images: Tensor, rotations: Tensor,
                     half_sets: np.ndarray | Tensor, shifts: Tensor | None = None, ctf: CTFParams | None = None,
                     apix: float | Tensor | None = None, weights: Tensor | None = None) -> None:
    """Insert each image ``(B, D, D)`` into the accumulator of its half set: ``half_sets`` ``(B,)`` in {1, 2}
    picks ``backprojectors[0]`` or ``[1]``. The one half-set insertion of every reconstruction (half maps,
    the job's per-rank shares, refinement's passes): a particle never reaches the other half's map.

    Each half receives its particles in their given order, one :meth:`Backprojector.insert` call per half
    per call here; the other arguments are as there (``apix`` a float or ``(B,)``). Index tensors follow
    each argument's device, so inputs may live on different devices.
    """
    h = half_sets if torch.is_tensor(half_sets) else torch.as_tensor(np.asarray(half_sets))
    h = h.cpu()

    def insert_half(bp: Backprojector, sel: Tensor) -> None:
        def pick(t: Tensor) -> Tensor:
            return t[sel.to(t.device)]

        bp.insert(pick(images), pick(rotations), shifts=None if shifts is None else pick(shifts),
                  ctf=None if ctf is None else ctf.index(sel.to(ctf.defocus_u.device)),
                  apix=pick(apix) if torch.is_tensor(apix) and apix.ndim > 0 else apix,
                  weights=None if weights is None else pick(weights))

    jobs = [partial(insert_half, bp, sel) for k, bp in enumerate(backprojectors, start=1)
            if (sel := torch.nonzero(h == k).flatten()).numel() > 0]
    _run_side_by_side(jobs, all(bp.device.type == "cpu" for bp in backprojectors))


def _run_side_by_side(jobs: list[Callable[[], None]], on_cpu: bool) -> None:
    """The half sets' insertions, each into its own accumulators: on the CPU with several threads, in two
    threads at once. ``index_add_``, most of an insertion's time, runs on one thread whatever torch's
    thread count; the two halves share nothing, so each accumulator receives the same sums in the same
    order either way (tests/test_reconstruct_backproject.py)."""
    if len(jobs) < 2 or not on_cpu or torch.get_num_threads() < 2:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


@dataclass
class ParticleChunk:
    """A chunk of particles for streaming reconstruction. ``half_sets``: ``(B,)`` values in {1, 2}."""

    images: Tensor
    rotations: Tensor
    half_sets: np.ndarray | Tensor
    shifts: Tensor | None = None
    ctf: CTFParams | None = None
    apix: float | Tensor | None = None
    weights: Tensor | None = None


def reconstruct_half_maps(data: Tensor | Iterable[ParticleChunk], rotations: Tensor | None = None,
                          shifts: Tensor | None = None, ctf: CTFParams | None = None,
                          apix: float | Tensor | None = None, half_sets: np.ndarray | Tensor | None = None,
                          weights: Tensor | None = None, box: int | None = None, pad: int = 2,
                          wiener_constant: float | None = None, device=None, chunk_size: int = 1024,
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(full, half1, half2)`` maps ``(D, D, D)``.

    ``data`` is either the images ``(N, D, D)`` (with ``rotations`` etc. as tensors; ``half_sets`` drawn
    with :func:`random_half_sets` if None) or an iterable of :class:`ParticleChunk` (streamed; ``box``
    is then taken from the first chunk). ``full`` is reconstructed from the summed accumulators.
    """
    chunks: Iterator[ParticleChunk]
    if torch.is_tensor(data):
        if rotations is None:
            raise ValueError("reconstruct_half_maps: rotations are required with an image tensor")
        n = data.shape[0]
        hs = random_half_sets(n, generator) if half_sets is None else half_sets
        chunks = (ParticleChunk(
            images=data[s:s + chunk_size], rotations=rotations[s:s + chunk_size],
            half_sets=hs[s:s + chunk_size], shifts=None if shifts is None else shifts[s:s + chunk_size],
            ctf=None if ctf is None else ctf.index(slice(s, s + chunk_size)),
            apix=apix[s:s + chunk_size] if torch.is_tensor(apix) and apix.ndim > 0 else apix,
            weights=None if weights is None else weights[s:s + chunk_size]) for s in range(0, n, chunk_size))
        box = data.shape[-1]
        device = device if device is not None else data.device
    else:
        chunks = iter(data)
    halves: list[Backprojector] | None = None
    for ch in chunks:
        if halves is None:
            box = box or ch.images.shape[-1]
            dev = device if device is not None else ch.images.device
            halves = [Backprojector(box, device=dev, pad=pad) for _ in range(2)]
        insert_half_sets(halves, ch.images, ch.rotations, ch.half_sets, shifts=ch.shifts, ctf=ch.ctf, apix=ch.apix,
                         weights=ch.weights)
    if halves is None:
        raise ValueError("reconstruct_half_maps: no particles")
    half1 = halves[0].finalize(wiener_constant)
    half2 = halves[1].finalize(wiener_constant)
    full = halves[0].add_(halves[1]).finalize(wiener_constant)
    return full, half1, half2
