"""centroid_shifts: the shift that puts each image's centre of mass at the box centre."""
from __future__ import annotations

import pytest
import torch

from cryofastar_core.geometry import random_rotations
from cryofastar_core.physics.centre import centroid_shifts
from cryofastar_core.physics.noise import add_noise
from cryofastar_core.physics.normalize import normalize_images
from cryofastar_core.physics.projection import project
from cryofastar_core.physics.shift import shift_images
from tests._volumes import blob_volume

BOX = 48


def _blob(box: int, x: float, y: float, sigma: float, weight: float) -> torch.Tensor:
    c = torch.arange(box, dtype=torch.float32) - box // 2
    py, px = torch.meshgrid(c, c, indexing="ij")
    return weight * torch.exp(-((px - x) ** 2 + (py - y) ** 2) / (2 * sigma ** 2))


def test_an_image_whose_mass_is_centred_needs_no_shift_and_a_shift_is_found():
    # Two unequal blobs balanced about the centre: its centre of mass, not its brightest point, is the origin.
    img = _blob(BOX, -4.0, 1.5, 2.5, 2.0) + _blob(BOX, 8.0, -3.0, 2.5, 1.0)
    assert centroid_shifts(img[None]).abs().max() < 0.05
    s = torch.tensor([[2.3, -1.7], [-3.0, 0.4]])
    # The origin convention: image(p) = centred(p + s), and the estimate is s itself.
    torch.testing.assert_close(centroid_shifts(shift_images(img.expand(2, -1, -1), s)), s, atol=0.05, rtol=0)


def test_projections_of_one_volume_move_with_their_shifts_also_in_noise():
    g = torch.Generator().manual_seed(0)
    images = project(blob_volume(BOX), random_rotations(64, generator=g))
    s = (torch.rand(64, 2, generator=g) * 2 - 1) * 3.0
    base = centroid_shifts(images)
    err = (centroid_shifts(shift_images(images, s)) - base - s).norm(dim=-1)
    # The mask (0.4 D) clips the widest projections' edges a little, more so when shifted.
    assert err.median() < 0.05 and err.max() < 0.25
    noisy = normalize_images(add_noise(shift_images(images, s), 1.0, generator=g))
    err_noisy = (centroid_shifts(noisy) - base - s).norm(dim=-1).median()
    assert err_noisy < 0.6 < float(s.norm(dim=-1).median())  # far better than assuming no shift


def test_bad_shapes_are_refused_and_blank_images_stay_put():
    with pytest.raises(ValueError, match="B, D, D"):
        centroid_shifts(torch.zeros(4, 8, 6))
    assert torch.equal(centroid_shifts(-torch.ones(2, 16, 16)), torch.zeros(2, 2))
