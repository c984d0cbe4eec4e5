"""Pose mates of a pseudo-symmetric map (``cryofastar_core.refine.mates``): the map's mate is found, and a
set split half and half between poses and their mates is resolved by the mate passes."""
from __future__ import annotations

import numpy as np
import torch

from _volumes import blob_particles, blob_volume
from cryofastar_core.geometry import rotation_angle_deg
from cryofastar_core.refine.driver import RefineConfig, refine_poses
from cryofastar_core.refine.map_registration import shifts_after_moving_map
from cryofastar_core.evaluation.metrics import resample_volume
from cryofastar_core.refine.mates import find_mate, half_turns, hemisphere_axes
from cryofastar_core.refine.state import sub_half, subsets

BOX, APIX = 32, 3.0
AXIS = torch.tensor([[0.48, -0.36, 0.8]], dtype=torch.float64)
OFFSET = torch.tensor([1.2, 1.6, 0.0], dtype=torch.float64)      # at right angles to AXIS: M(M(x)) = x


def _pseudo_dimer() -> tuple[torch.Tensor, torch.Tensor]:
    """Blobs plus a copy of themselves turned by a half turn about AXIS through a point off the box centre
    (``x -> S x + OFFSET``), the copy with two small blobs of its own: alike at low resolution, told apart
    by the detail."""
    S = half_turns(AXIS)[0]
    blobs = blob_volume(BOX, n_blobs=8, seed=3)
    extra = blob_volume(BOX, n_blobs=2, seed=11)
    return blobs + resample_volume(blobs + extra, S.T, OFFSET), S


def test_hemisphere_axes_cover_it_evenly():
    axes = hemisphere_axes(6.0)
    assert bool((axes[:, 2] >= 0).all()) and torch.allclose(axes.norm(dim=-1), torch.ones(len(axes), dtype=torch.float64))
    probe = torch.nn.functional.normalize(torch.randn(500, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=-1)
    nearest = torch.rad2deg(torch.arccos((probe @ axes.T).abs().max(-1).values.clamp(max=1)))
    assert float(nearest.max()) < 6.0


def test_find_mate_recovers_a_planted_half_turn_and_offset():
    vol, S = _pseudo_dimer()
    A, t, score = find_mate(vol, BOX / 2 - 1)
    assert float(rotation_angle_deg(A[None], S[None])[0]) < 2.0
    assert float((t - OFFSET).norm()) < 0.5, t
    assert score > 0.6
    # an asymmetric density has no such mate
    assert find_mate(blob_volume(BOX, n_blobs=8, seed=3), BOX / 2 - 1)[2] < score - 0.2


def test_mate_passes_resolve_a_set_split_between_poses_and_mates():
    """40 % of the particles start at their mates (half turn and offset), the way low-resolution global passes
    leave a pseudo-symmetric set: with mate passes nearly all end on one side, without them the split stays."""
    vol, S = _pseudo_dimer()
    g = torch.Generator().manual_seed(5)
    n = 600
    R, s, ctf, images = blob_particles(n, BOX, APIX, g, volume=vol)
    mate = torch.arange(n) % 10 < 4                      # 40 % of each half set
    R0 = torch.where(mate[:, None, None], S @ R, R)
    s0 = torch.where(mate[:, None], shifts_after_moving_map(S @ R, s, OFFSET), s)
    half = np.arange(n) % 2 + 1
    load = lambda idx: images[torch.as_tensor(idx)]

    def split(mate_passes: int) -> float:
        cfg = RefineConfig(iterations=1, angle_step_deg=2.0, angle_radius_deg=4.0, global_step_deg=None,
                           mate_passes=mate_passes, chunk_size=200)
        res = refine_poses(load, ctf, APIX, R0, s0, half, cfg)
        print([(h["stage"], h.get("mode"), h.get("n_flipped")) for h in res.history if h["stage"] == "mates"])
        near_truth = rotation_angle_deg(res.rotations, R) < 90   # one frame for the set: count either side
        return min(float(near_truth.double().mean()), 1 - float(near_truth.double().mean()))

    without, with_passes = split(0), split(8)
    print(f"minority side: {without:.3f} without mate passes, {with_passes:.3f} with")
    assert without > 0.3
    assert with_passes < 0.1


def test_mate_passes_bring_a_half_set_that_settled_at_the_mates_to_the_other_halfs_side():
    """Each half set consistent, but half 2 wholly at the mates (the gold-standard halves settled on opposite
    sides, as on a 3HSY draw at SNR 0.1: bench/results/2026-12-06-class-averages.md, session 20): the choosing
    passes flip almost nothing, and half 2 must still be brought over, or the full map blends the two."""
    vol, S = _pseudo_dimer()
    g = torch.Generator().manual_seed(6)
    n = 600
    R, s, ctf, images = blob_particles(n, BOX, APIX, g, volume=vol)
    half = np.arange(n) % 2 + 1
    at_mate = torch.as_tensor(half == 2)
    R0 = torch.where(at_mate[:, None, None], S @ R, R)
    s0 = torch.where(at_mate[:, None], shifts_after_moving_map(S @ R, s, OFFSET), s)
    cfg = RefineConfig(iterations=1, angle_step_deg=2.0, angle_radius_deg=4.0, global_step_deg=None,
                       mate_passes=8, chunk_size=200)
    res = refine_poses(lambda idx: images[torch.as_tensor(idx)], ctf, APIX, R0, s0, half, cfg)
    modes = [h.get("mode") for h in res.history if h["stage"] == "mates"]
    near_truth = (rotation_angle_deg(res.rotations, R) < 90).double()
    side = [float(near_truth[torch.as_tensor(half == h)].mean()) for h in (1, 2)]
    print(modes, side)
    assert modes[-1] == "half 2 to its mates", modes
    assert abs(side[0] - side[1]) < 0.1, side      # both halves on one side (either)


def test_the_mate_passes_sub_halves_split_each_half_set_in_two_and_never_mix_the_halves():
    """A particle is scored against the other sub-half's map of its own half set (``subsets``): labels 1-2
    for half 1 and 3-4 for half 2, each sub-half about half its half set, also when the half sets were dealt
    by parity."""
    half = torch.as_tensor(np.arange(1000) % 2 + 1)
    sets = subsets(half)
    assert set(sets[half == 1].tolist()) == {1, 2} and set(sets[half == 2].tolist()) == {3, 4}
    assert torch.equal(sets, 2 * (half - 1) + 1 + sub_half(torch.arange(1000)))
    for label in (1, 2, 3, 4):
        assert 200 < int((sets == label).sum()) < 300
