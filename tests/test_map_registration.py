"""Registering one map onto another (``cryofastar_core.refine.map_registration``): known rotations come back, the
identity stays the identity (the sampling does not favour grid nodes), the hand is found by the coarse
search, and noisy maps with FSC shell weights still register to a fraction of a degree."""
from __future__ import annotations

import torch
from _volumes import blob_volume

from cryofastar_core.geometry import rotation_angle_deg, rotations_at_angle
from cryofastar_core.refine.map_registration import register_map
from cryofastar_core.evaluation.metrics import apply_alignment, flip_hand, rotate_volume
from cryofastar_core.physics.shift import shift_volume
from cryofastar_core.reconstruct import fsc

BOX = 32


def blobs(seed: int = 0) -> torch.Tensor:
    return blob_volume(BOX, seed=seed)


def _angle(A: torch.Tensor, B: torch.Tensor) -> float:
    return float(rotation_angle_deg(A[None], B[None])[0])


def test_known_rotations_come_back_and_the_identity_stays():
    vol = blobs()
    g = torch.Generator().manual_seed(1)
    for deg in (0.0, 1.0, 4.0, 12.0):
        G0 = rotations_at_angle(1, deg, g)[0]
        moving = rotate_volume(vol, G0.T).float()         # moving(w) = vol(G0 w): G0 brings it back
        reg = register_map(moving, vol, shells=10)
        assert not reg.mirrored
        assert _angle(reg.G, G0) < 0.5, (deg, _angle(reg.G, G0))
        assert reg.correlation >= reg.identity_correlation
        # The registered map is the fixed one.
        back = rotate_volume(moving, reg.G).float()
        assert torch.corrcoef(torch.stack([back.flatten(), vol.flatten()]))[0, 1] > 0.98


def test_poses_follow_the_registration():
    """Particles behind ``moving`` had poses ``G0^T R``: ``G R`` puts them back at ``R``."""
    vol = blobs(seed=3)
    G0 = rotations_at_angle(1, 9.0, torch.Generator().manual_seed(4))[0]
    reg = register_map(rotate_volume(vol, G0.T).float(), vol, shells=10)
    R = rotations_at_angle(5, 40.0, torch.Generator().manual_seed(5))
    back = apply_alignment(G0.T @ R, reg.G, reg.mirrored)
    assert float(rotation_angle_deg(back, R).max()) < 0.5


def test_the_hand_is_found_by_the_coarse_search():
    vol = blobs(seed=7)
    G0 = rotations_at_angle(1, 70.0, torch.Generator().manual_seed(8))[0]
    moving = flip_hand(rotate_volume(vol, G0.T)).float()
    reg = register_map(moving, vol, shells=10, coarse_step_deg=15.0, allow_mirror=True)
    assert reg.mirrored
    local = register_map(moving, vol, shells=10)           # a local search cannot change the hand
    assert not local.mirrored and local.correlation < reg.correlation


def test_noisy_maps_register_with_fsc_weights():
    vol = blobs(seed=11)
    g = torch.Generator().manual_seed(12)
    G0 = rotations_at_angle(1, 6.0, g)[0]
    noise = 0.08 * float(vol.max())
    moving = rotate_volume(vol, G0.T).float() + noise * torch.randn(vol.shape, generator=g)
    fixed = vol + noise * torch.randn(vol.shape, generator=g)
    _, curve = fsc(rotate_volume(moving, G0).float(), fixed)
    f = curve.double().clamp(0.0, 0.99)
    reg = register_map(moving, fixed, shells=12, shell_weights=f / (1 - f))
    assert _angle(reg.G, G0) < 1.0, _angle(reg.G, G0)


def test_a_3d_offset_is_found_with_the_rotation():
    vol = blobs(seed=13)
    t0 = torch.tensor([1.3, -0.7, 2.1], dtype=torch.float64)
    G0 = rotations_at_angle(1, 5.0, torch.Generator().manual_seed(14))[0]
    moving = rotate_volume(vol, G0.T).float()
    # fixed(w) = vol(w - t0): moving registered is rotated back by G0, then moved by t0.
    fixed = shift_volume(vol.double(), t0).float()
    reg = register_map(moving, fixed, shells=12, max_shift_px=3.0)
    assert float((reg.t - t0).norm()) < 0.2, reg.t
    assert _angle(reg.G, G0) < 0.75
    assert float(register_map(moving, fixed, shells=12).t.norm()) == 0.0   # no offset searched by default
