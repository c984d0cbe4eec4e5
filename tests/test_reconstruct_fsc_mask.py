"""FSC, resolution at a threshold, soft masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cryofastar_core.reconstruct import fsc, resolution_at, soft_circle_mask, soft_sphere_mask


def _numpy_fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Independent FSC (numpy, loops over shells)."""
    n = a.shape[0]
    fa = np.fft.fftshift(np.fft.fftn(a))
    fb = np.fft.fftshift(np.fft.fftn(b))
    k = np.arange(n) - n // 2
    r = np.round(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)).astype(int)
    out = []
    for s in range(n // 2 + 1):
        m = r == s
        out.append(np.real((fa[m] * np.conj(fb[m])).sum()) / np.sqrt((np.abs(fa[m]) ** 2).sum() * (np.abs(fb[m]) ** 2).sum()))
    return np.array(out)


@pytest.mark.parametrize("box", [20, 21])
def test_fsc_against_numpy_on_even_and_odd_boxes(box):
    """The half-transform FSC (Friedel pairs counted twice, the even box's Nyquist column once) equals the
    full-grid definition."""
    g = torch.Generator().manual_seed(box)
    a = torch.randn(box, box, box, generator=g, dtype=torch.float64)
    b = a + 0.7 * torch.randn(box, box, box, generator=g, dtype=torch.float64)
    assert np.allclose(fsc(a, b)[1].numpy(), _numpy_fsc(a.numpy(), b.numpy()), atol=1e-10)


def test_fsc_against_numpy_and_limits():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 20, 20, generator=g, dtype=torch.float64)
    b = a + 0.7 * torch.randn(20, 20, 20, generator=g, dtype=torch.float64)
    freq, c = fsc(a, b)
    assert freq.shape == (11,) and abs(float(freq[-1]) - 0.5) < 1e-12
    assert np.allclose(c.numpy(), _numpy_fsc(a.numpy(), b.numpy()), atol=1e-10)
    assert torch.allclose(fsc(a, a)[1], torch.ones(11, dtype=torch.float64))
    unrelated = fsc(a, torch.randn(20, 20, 20, generator=g, dtype=torch.float64))[1]
    assert float(unrelated[3:].abs().max()) < 0.2
    assert torch.allclose(fsc(a, 3.0 * a)[1], torch.ones(11, dtype=torch.float64))  # scale-invariant


def test_resolution_at_interpolates_and_defaults_to_nyquist():
    freq = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    curve = torch.tensor([1.0, 0.9, 0.6, 0.4, 0.2, 0.1])
    # 0.5 is crossed half-way between 0.2 (0.6) and 0.3 (0.4): f = 0.25 -> 2 Å / 0.25 = 8 Å
    assert abs(resolution_at(freq, curve, 2.0, 0.5) - 8.0) < 1e-6
    assert abs(resolution_at(freq, curve, 2.0, 0.143) - 2.0 / (0.4 + 0.1 * (0.2 - 0.143) / 0.1)) < 1e-6
    assert resolution_at(freq, torch.ones(6), 1.5, 0.143) == 3.0


def test_soft_masks():
    m = soft_sphere_mask(32, 10, 4)
    assert m.shape == (32, 32, 32) and float(m[16, 16, 16]) == 1.0
    assert float(m[16, 16, 16 + 10]) == 1.0 and float(m[16, 16, 16 + 14]) == 0.0
    assert 0.0 < float(m[16, 16, 16 + 12]) < 1.0 and abs(float(m[16, 16, 16 + 12]) - 0.5) < 1e-6
    c = soft_circle_mask(32, 10, 4)
    assert torch.allclose(c, m[16])
    hard = soft_circle_mask(16, 4, 0)
    assert set(hard.unique().tolist()) == {0.0, 1.0}
