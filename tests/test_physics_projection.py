"""Fourier-slice projection against a direct real-space projection in the internal convention."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cryofastar_core.geometry import random_rotations
from cryofastar_core.physics.projection import prepare_volume, project
from tests.conftest import make_asymmetric_map


def real_space_projection(vol: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``P(x, y) = sum_z V(R (x, y, z))`` by trilinear ``grid_sample`` on the map (independent of Fourier code)."""
    D = vol.shape[-1]
    c = torch.arange(D, dtype=torch.float64) - D // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    pts = torch.stack([x, y, z], -1).reshape(-1, 3)
    out = []
    for Ri in R.double():
        m = pts @ Ri.T + D // 2                     # map-frame voxel coordinates (x, y, z)
        grid = (2 * m / (D - 1) - 1).reshape(1, D, D, D, 3)
        s = F.grid_sample(vol.double()[None, None], grid, mode="bilinear", align_corners=True)
        out.append(s[0, 0].sum(0))                  # sum over the image-frame z
    return torch.stack(out).float()


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_project_matches_real_space_projection_and_convention():
    vol = torch.from_numpy(make_asymmetric_map(32, seed=3))
    R = random_rotations(6, torch.Generator().manual_seed(0))
    ref = real_space_projection(vol, R)
    ours = project(prepare_volume(vol, pad=2), R)
    cc = torch.corrcoef(torch.stack([ours.flatten(), ref.flatten()]))[0, 1]
    assert cc > 0.99
    assert _rel_err(ours, ref) < 0.1
    # the transposed rotation (RELION's A instead of R = A^T) is a different image
    wrong = project(prepare_volume(vol, pad=2), R.transpose(-1, -2))
    assert torch.corrcoef(torch.stack([wrong.flatten(), ref.flatten()]))[0, 1] < 0.9


def _gaussian_blobs(D: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pos = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * D * 0.45
    sig = 0.9 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    amp = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    c = torch.arange(D, dtype=torch.float64) - D // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = sum(a * torch.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * s * s))
              for p, s, a in zip(pos, sig, amp))
    return vol.float(), (pos, sig, amp)


def _analytic_projection(D: int, blobs, R: torch.Tensor) -> torch.Tensor:
    """Exact line integrals of the Gaussian blobs: a blob at map position p appears at R^T p (x, y)."""
    pos, sig, amp = blobs
    c = torch.arange(D, dtype=torch.float64) - D // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    out = []
    for Ri in R.double():
        q = pos @ Ri
        out.append(sum(a * (2 * torch.pi) ** 0.5 * s * torch.exp(-((x - qq[0]) ** 2 + (y - qq[1]) ** 2) / (2 * s * s))
                       for qq, s, a in zip(q, sig, amp)))
    return torch.stack(out).float()


def test_padding_and_gridding_correction_reduce_error():
    """Against exact projections of Gaussian blobs: padding and the sinc^2 pre-correction both help
    (measured: pad 1: 0.12 -> 0.085, pad 2: 0.034 -> 0.019)."""
    vol, blobs = _gaussian_blobs(32, 20, seed=0)
    R = random_rotations(4, torch.Generator().manual_seed(1))
    ref = _analytic_projection(32, blobs, R)
    err = {(pad, gc): _rel_err(project(prepare_volume(vol, pad=pad, gridding_correction=gc), R), ref)
           for pad in (1, 2) for gc in (False, True)}
    assert err[(2, True)] < 0.6 * err[(2, False)]
    assert err[(1, True)] < 0.8 * err[(1, False)]
    assert err[(2, False)] < 0.5 * err[(1, False)]
    assert err[(2, True)] < 0.03


def test_project_is_batched_and_dtype_device_follow_input():
    vol = torch.from_numpy(make_asymmetric_map(16, n_blobs=10, seed=5))
    R = random_rotations(5, torch.Generator().manual_seed(2))
    vft = prepare_volume(vol)
    batch = project(vft, R)
    one = torch.stack([project(vft, R[i:i + 1])[0] for i in range(5)])
    assert batch.shape == (5, 16, 16) and batch.dtype == torch.float32
    assert torch.allclose(batch, one, atol=1e-5)
    # identity rotation: the projection along z
    ident = project(vft, torch.eye(3)[None])[0]
    assert torch.corrcoef(torch.stack([ident.flatten(), vol.sum(0).flatten()]))[0, 1] > 0.995


def test_sampling_split_over_threads_gives_the_same_values():
    """``sample_ft`` splits its samples into one batch item per thread (grid_sample shares work by batch item
    only): any thread count and a batch that does not divide evenly give the one-thread values exactly."""
    from cryofastar_core.physics.projection import project_ft

    vol = torch.as_tensor(make_asymmetric_map(24))
    R = random_rotations(7, torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = project_ft(prepare_volume(vol), R)
        for n in (2, 3, 4):
            torch.set_num_threads(n)
            assert torch.equal(project_ft(prepare_volume(vol), R), one)
    finally:
        torch.set_num_threads(threads)


def test_compiled_band_sampling_matches_grid_sample(monkeypatch):
    """``project_at`` through the compiled kernel gives grid_sample's trilinear values (same grid, zeros
    outside it; positions rounded differently: ~1e-5 of the largest value), split over any thread count."""
    from cryofastar_core.physics import compiled
    from cryofastar_core.physics.projection import project_at

    assert compiled.backend() == "compiled"
    vol = torch.as_tensor(make_asymmetric_map(24))
    R = random_rotations(9, torch.Generator().manual_seed(3))
    R[0] = torch.eye(3)                                   # samples exactly on grid points
    index = torch.arange(24 * 24)                         # the whole image: corners leave a pad-1 grid
    threads = torch.get_num_threads()
    try:
        for pad in (1, 2):
            vft = prepare_volume(vol, pad=pad)
            got = [project_at(vft, R, index)]
            for n in (1, 3):
                torch.set_num_threads(n)
                got.append(project_at(vft, R, index))
            monkeypatch.setenv("CRYOFASTAR_NO_COMPILED", "1")
            ref = project_at(vft, R, index)
            monkeypatch.delenv("CRYOFASTAR_NO_COMPILED")
            torch.set_num_threads(threads)
            scale = float(ref.abs().max())
            for g in got:
                assert torch.allclose(g, ref, rtol=0, atol=1e-5 * scale), float((g - ref).abs().max()) / scale
            if pad == 1:
                assert bool((ref == 0).any()) and torch.equal(got[0] == 0, ref == 0)
    finally:
        torch.set_num_threads(threads)
