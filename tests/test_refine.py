"""Local refinement (``cryofastar_core.refine.driver``) on simulated, noisy, CTF-modulated particles.

The data: a small asymmetric map of Gaussian blobs, projected with the project's own physics
(``simulation.simulate_images``: Fourier slice, RELION CTF, phase-ramp shift, white noise at SNR 1).
Defocus is kept small (0.4-1.0 µm) because at box 32 a larger defocus spreads the signal over more
than the box (the simulation wraps it around periodically, which no real particle does).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _ranks import on_two_ranks, one_thread
from _volumes import blob_particles, blob_volume

from cryofastar_core.geometry import random_rotations, rotation_angle_deg, rotvec_to_matrix
from cryofastar_core.physics.centre import volume_centroid
from cryofastar_core.reconstruct.centring import centring_offset
from cryofastar_core.refine.global_pass import so3_grid
from cryofastar_core.refine.map_registration import shifts_after_moving_map
from cryofastar_core.refine.driver import RefineConfig, perturbation_grid, refine_poses, shift_grid
from cryofastar_core.refine.grids import ball_grid

BOX, N, APIX = 32, 300, 3.0


@pytest.fixture(scope="module")
def dataset():
    g = torch.Generator().manual_seed(1)
    R, s, ctf, images = blob_particles(N, BOX, APIX, g)
    # Starting poses: 5-8 degrees about random axes, 1-2 px in random directions.
    axis = torch.randn(N, 3, generator=g, dtype=torch.float64)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    angle = torch.deg2rad(5 + 3 * torch.rand(N, 1, generator=g, dtype=torch.float64))
    R0 = R @ rotvec_to_matrix(axis * angle)
    phi = 2 * math.pi * torch.rand(N, generator=g, dtype=torch.float64)
    mag = 1 + torch.rand(N, generator=g, dtype=torch.float64)
    s0 = s + torch.stack([mag * torch.cos(phi), mag * torch.sin(phi)], -1)
    half = np.arange(N) % 2 + 1
    return dict(images=images, ctf=ctf, R=R, s=s, R0=R0, s0=s0, half=half)


def _loader(images: torch.Tensor, seen: list[int] | None = None):
    def load(idx: np.ndarray) -> torch.Tensor:
        if seen is not None:
            seen.append(len(idx))
        return images[torch.as_tensor(idx)]
    return load


def _truth_shifts_centred(dataset) -> torch.Tensor:
    """The true shifts in the frame refinement ends in (``centre_origin``): the test volume's centre of
    mass at the box centre, so every shift moves with the volume's offset."""
    return shifts_after_moving_map(dataset["R"], dataset["s"], -volume_centroid(blob_volume(BOX)))


def _centroid_in_mask(vol: torch.Tensor) -> torch.Tensor:
    """Where the refined map's centre of mass is, by the job's own estimate."""
    return -centring_offset(vol)


def _mean_fsc(entry: dict) -> float:
    """Mean half-map FSC over shells 1 .. Nyquist - 1 (a summary that moves with every shell)."""
    return float(np.mean(entry["fsc"][1:-1]))


def test_refinement_recovers_perturbed_poses_and_improves_fsc(dataset):
    seen: list[int] = []
    cfg = RefineConfig(iterations=3, chunk_size=128, global_step_deg=None)
    res = refine_poses(_loader(dataset["images"], seen), dataset["ctf"], APIX, dataset["R0"].numpy(),
                       dataset["s0"].numpy(), dataset["half"], cfg)
    R, s = dataset["R"], _truth_shifts_centred(dataset)
    err0 = float(rotation_angle_deg(R, dataset["R0"]).median())
    err1 = float(rotation_angle_deg(R, res.rotations).median())
    sh0 = float((dataset["s0"] - dataset["s"]).norm(dim=-1).median())
    sh1 = float((res.shifts - s).norm(dim=-1).median())
    print(f"median rotation error {err0:.2f} -> {err1:.2f} deg, shift error {sh0:.2f} -> {sh1:.2f} px")
    assert err1 < 0.5 * err0
    assert sh1 < 0.5 * sh0
    # Streaming: every read is one chunk, never the whole stack.
    assert max(seen) <= 128
    first, last = res.history[0], res.history[-1]
    assert len(res.history) == 4 and [h["iteration"] for h in res.history] == [0, 1, 2, 3]
    assert _mean_fsc(last) > _mean_fsc(first) + 0.05
    assert last["resolution_0143"] < first["resolution_0143"]
    # Coarse to fine: the steps shrink and the matching band never narrows.
    steps = [h["angle_step_deg"] for h in res.history[1:]]
    assert steps == sorted(steps, reverse=True) and steps[-1] < steps[0]
    shells = [h["match_shells"] for h in res.history[1:]]
    assert shells[-1] >= shells[0]
    assert res.full.shape == res.half1.shape == res.half2.shape == (BOX, BOX, BOX)
    assert res.rotations.dtype == torch.float64
    RtR = res.rotations.transpose(-1, -2) @ res.rotations
    assert torch.allclose(RtR, torch.eye(3, dtype=torch.float64).expand_as(RtR), atol=1e-9)


def test_refinement_from_exact_poses_does_not_drift(dataset):
    cfg = RefineConfig(iterations=3, global_step_deg=None)
    res = refine_poses(_loader(dataset["images"]), dataset["ctf"], APIX, dataset["R"], dataset["s"],
                       torch.as_tensor(dataset["half"]), cfg)
    err = rotation_angle_deg(dataset["R"], res.rotations)
    sh = (res.shifts - _truth_shifts_centred(dataset)).norm(dim=-1)
    print(f"from exact poses: median rotation error {float(err.median()):.2f} deg, shift {float(sh.median()):.2f} px")
    # The noise floor of one image at SNR 1, box 32 (a particle radius of ~8 px: 1 degree moves its edge
    # by 0.14 px); well under the 5-8 degrees of the perturbed start.
    assert float(err.median()) < 2.5
    assert float(sh.median()) < 0.4
    # The origin ends at the centre of mass (where the feed-forward centroids put it), maps and shifts alike:
    # measured on the half maps, it is checked on the full map, whose noise differs (0.09 px at box 32).
    assert float(_centroid_in_mask(res.full).norm()) < 0.15
    assert abs(res.history[-1]["origin_moved_px"] - float(volume_centroid(blob_volume(BOX)).norm())) < 0.3
    first, last = res.history[0], res.history[-1]
    assert _mean_fsc(last) > _mean_fsc(first) - 0.03


def test_initial_half_maps_are_used_and_zero_iterations_keep_poses(dataset):
    images = dataset["images"][:64]
    sub = dict(R=dataset["R0"][:64], s=dataset["s0"][:64], half=dataset["half"][:64])
    ctf = dataset["ctf"].index(slice(0, 64))
    plain = refine_poses(_loader(images), ctf, APIX, sub["R"], sub["s"], sub["half"],
                         RefineConfig(iterations=0, global_step_deg=None))
    assert torch.equal(plain.rotations, sub["R"]) and torch.equal(plain.shifts, sub["s"])
    assert len(plain.history) == 1
    seen: list[int] = []
    res = refine_poses(_loader(images, seen), ctf, APIX, sub["R"], sub["s"], sub["half"],
                       RefineConfig(iterations=1, chunk_size=32, global_step_deg=None, centre_origin=False),
                       initial_half_maps=(plain.half1, plain.half2))
    # One refinement pass (plus the one-image probe for the box), no initial reconstruction pass.
    assert sum(seen) == 64 + 1
    assert res.history[0]["fsc"] == plain.history[0]["fsc"]


def test_every_refinement_pass_inserts_through_the_one_half_set_routine(dataset, monkeypatch):
    """The initial reconstruction, the global pass, the local iteration and the final rebuild all insert
    through reconstruct.insert_half_sets, each pass every particle once."""
    import sys

    from cryofastar_core.reconstruct import Backprojector

    n = 48
    images, ctf = dataset["images"][:n], dataset["ctf"].index(slice(0, n))
    callers: list[tuple[str, int]] = []
    insert = Backprojector.insert

    def recording(self, images, *args, **kw):
        # the caller is insert_half_sets or its per-half helper (the halves may run side by side)
        callers.append((sys._getframe(1).f_code.co_qualname.split(".")[0], images.shape[0]))
        return insert(self, images, *args, **kw)

    monkeypatch.setattr(Backprojector, "insert", recording)
    res = refine_poses(_loader(images), ctf, APIX, dataset["R0"][:n], dataset["s0"][:n], dataset["half"][:n],
                       RefineConfig(iterations=1, chunk_size=16, global_step_deg=30.0, global_passes=1))
    passes = len(res.history) + 1  # and the rebuild at the centred origin
    assert [h["stage"] for h in res.history] == ["start", "global", "local"]
    assert {c for c, _ in callers} == {"insert_half_sets"}, callers
    assert sum(b for _, b in callers) == passes * n
    callers.clear()
    refine_poses(_loader(images), ctf, APIX, dataset["R0"][:n], dataset["s0"][:n], dataset["half"][:n],
                 RefineConfig(iterations=0, global_step_deg=None), initial_half_maps=(res.half1, res.half2))
    assert {c for c, _ in callers} == {"insert_half_sets"} and sum(b for _, b in callers) == n


def test_ball_grids_and_neighbours():
    g, nb = ball_grid(3, 2.0)
    assert g.shape[0] == 33 and torch.equal(g[0], torch.zeros(3, dtype=torch.int64))
    for j in range(g.shape[0]):
        for a in range(3):
            for k, sgn in enumerate((-1, 1)):
                target = g[j].clone()
                target[a] += sgn
                match = torch.nonzero((g == target).all(-1)).flatten()
                assert nb[j, a, k] == (int(match[0]) if match.numel() else -1)
    om = perturbation_grid(4.0, 8.0)
    assert om.shape == (33, 3)
    assert math.isclose(float(torch.rad2deg(om.norm(dim=-1)).max()), 8.0, rel_tol=1e-9)
    sg = shift_grid(0.5, 1.0)
    assert sg.shape == (13, 2) and float(sg.norm(dim=-1).max()) == 1.0


def test_bad_inputs_are_refused(dataset):
    load = _loader(dataset["images"])
    R, s = dataset["R"], dataset["s"]
    with pytest.raises(ValueError, match="half_set"):
        refine_poses(load, None, APIX, R, s, np.zeros(N, dtype=np.int64), RefineConfig(iterations=0))
    with pytest.raises(ValueError, match=r"\(N,3,3\)"):
        refine_poses(load, None, APIX, R[:10], s, dataset["half"], RefineConfig(iterations=0))
    with pytest.raises(ValueError, match="shrink"):
        refine_poses(load, None, APIX, R, s, dataset["half"], RefineConfig(shrink=0.0))


def test_so3_grid_covers_rotations_at_its_spacing():
    grid = so3_grid(15.0)
    assert grid.shape == (183 * 24, 3, 3)
    RtR = grid.transpose(-1, -2) @ grid
    assert torch.allclose(RtR, torch.eye(3, dtype=torch.float64).expand_as(RtR), atol=1e-12)
    probe = random_rotations(500, torch.Generator().manual_seed(2), dtype=torch.float64)
    # Angle from each probe to its nearest grid rotation: trace of R_grid^T R_probe.
    cos = ((torch.einsum("jab,nab->nj", grid, probe) - 1) / 2).clamp(-1, 1)
    nearest = torch.rad2deg(torch.acos(cos.max(-1).values))
    assert float(nearest.max()) < 15.0 and float(nearest.median()) < 9.0


def _correct_maps(dataset):
    res = refine_poses(_loader(dataset["images"]), dataset["ctf"], APIX, dataset["R"], dataset["s"], dataset["half"],
                       RefineConfig(iterations=0, global_step_deg=None))
    return res.half1, res.half2


def test_global_pass_finds_poses_from_anywhere_against_a_correct_map(dataset):
    """Haar-random starting poses, the half maps of the true poses: one global pass lands every particle
    near the truth at the grid's accuracy (15 degrees apart: ~7 degrees to the nearest grid point)."""
    start = random_rotations(N, torch.Generator().manual_seed(5), dtype=torch.float64)
    assert float(rotation_angle_deg(dataset["R"], start).median()) > 90
    res = refine_poses(_loader(dataset["images"]), dataset["ctf"], APIX, start, dataset["s"], dataset["half"],
                       RefineConfig(iterations=0, global_passes=1), initial_half_maps=_correct_maps(dataset))
    err = rotation_angle_deg(dataset["R"], res.rotations)
    print(f"global pass from random poses: median error {float(err.median()):.1f} deg")
    assert float(err.median()) < 11.0
    stages = [h["stage"] for h in res.history]
    assert stages == ["start", "global"] and res.history[1]["median_rotation_change_deg"] > 60
    assert res.history[1]["n_rotations"] == so3_grid(15.0).shape[0] and res.history[1]["seconds"] > 0


def test_global_pass_keeps_the_half_sets_apart(dataset):
    """Half 1 is matched only against map 1 and half 2 only against map 2: with a correct map 1 and an
    empty-of-signal map 2, half 1 finds its poses and half 2 cannot."""
    map1, map2 = _correct_maps(dataset)
    noise = torch.randn(map2.shape, generator=torch.Generator().manual_seed(6)) * map2.std()
    start = random_rotations(N, torch.Generator().manual_seed(7), dtype=torch.float64)
    res = refine_poses(_loader(dataset["images"]), dataset["ctf"], APIX, start, dataset["s"], dataset["half"],
                       RefineConfig(iterations=0, global_passes=1), initial_half_maps=(map1, noise))
    err = rotation_angle_deg(dataset["R"], res.rotations)
    h = torch.as_tensor(dataset["half"])
    assert float(err[h == 1].median()) < 11.0
    assert float(err[h == 2].median()) > 60.0


def test_global_pass_keeps_poses_better_than_every_grid_point(dataset):
    """Exact poses and correct maps: a 15 degree grid has nothing better, so the poses stay (without the
    comparison every particle would be moved onto its nearest grid point, about 7 degrees away)."""
    maps = _correct_maps(dataset)
    errs = {}
    for keep in (True, False):
        res = refine_poses(_loader(dataset["images"]), dataset["ctf"], APIX, dataset["R"], dataset["s"],
                           dataset["half"], RefineConfig(iterations=0, global_passes=1, global_keep_better=keep,
                                                         register_halves=False), initial_half_maps=maps)
        errs[keep] = float(rotation_angle_deg(dataset["R"], res.rotations).median())
    assert errs[True] < 1.0 < 4.0 < errs[False], errs


def test_half_two_is_brought_into_half_one_frame(dataset):
    """Half 2's poses and map turned together by 6 degrees (a consistent, but different, frame, as a global
    pass against a blurred map leaves it): registering the half maps before the pass puts half 2's new
    poses back in half 1's frame, which the true poses share; without it they stay 6 degrees off."""
    h = torch.as_tensor(dataset["half"])
    G0 = rotvec_to_matrix(torch.tensor([[0.0, math.radians(6.0), 0.0]], dtype=torch.float64))[0]
    R_mixed = dataset["R"].clone()
    R_mixed[h == 2] = G0.T @ R_mixed[h == 2]
    maps = refine_poses(_loader(dataset["images"]), dataset["ctf"], APIX, R_mixed, dataset["s"], dataset["half"],
                        RefineConfig(iterations=0, global_step_deg=None))
    err = {}
    for register in (True, False):
        res = refine_poses(_loader(dataset["images"]), dataset["ctf"], APIX, R_mixed, dataset["s"], dataset["half"],
                           RefineConfig(iterations=1, global_step_deg=None, register_halves=register),
                           initial_half_maps=(maps.half1, maps.half2))
        err[register] = float(rotation_angle_deg(dataset["R"][h == 2], res.rotations[h == 2]).median())
        if register:
            assert abs(res.history[1]["half2_registration_deg"] - 6.0) < 1.0
    assert err[True] < 2.5 and err[False] > 4.5, err


def _refine_on_rank(comm, data: dict, cfg: RefineConfig) -> dict:
    read: list[np.ndarray] = []

    def load(idx: np.ndarray) -> torch.Tensor:
        read.append(np.array(idx))
        return data["images"][torch.as_tensor(idx)]

    res = refine_poses(load, data["ctf"], APIX, data["R0"], data["s0"], data["half"], cfg, comm=comm)
    return dict(R=res.rotations, s=res.shifts, full=res.full, half1=res.half1,
                history=[{k: v for k, v in h.items() if k != "seconds"} for h in res.history],
                read=np.concatenate(read), calls=len(read))


def test_two_ranks_share_the_work_and_equal_one_process(dataset):
    """Every pass over the data is split between two ranks (each reads only its own block of particles),
    and both come out with the same poses and maps as one process, up to the order of the sums."""
    # Without the translation search of the half-frame registration: on 80-particle half maps its 0.05 px
    # grid can tip to a neighbouring point under a different order of the sums (measured: 0.6 deg for
    # half 2); both ranks still agree exactly, which is what this test is about.
    n, cfg = 160, RefineConfig(iterations=2, chunk_size=40, global_passes=1, register_max_shift_px=0.0)
    data = dict(images=dataset["images"][:n], ctf=dataset["ctf"].index(slice(0, n)), R0=dataset["R0"][:n],
                s0=dataset["s0"][:n], half=dataset["half"][:n])
    # One thread, as each rank: with more, the one process sums in yet another order, and the half-frame
    # registration (continuous in the maps) carries that into the poses (measured: 1e-2 deg at 2 threads).
    one = one_thread(refine_poses, _loader(data["images"]), data["ctf"], APIX, data["R0"], data["s0"], data["half"],
                     cfg)
    r0, r1 = on_two_ranks(_refine_on_rank, data, cfg)
    passes = len(one.history) + 1  # start, global, local 1, local 2, the rebuild at the centred origin
    assert [h["stage"] for h in r0["history"]] == [h["stage"] for h in one.history]
    for rank, r in enumerate((r0, r1)):
        block = np.arange(n)[rank * n // 2:(rank + 1) * n // 2]
        assert set(r["read"].tolist()) == set(block.tolist())  # only its own particles,
        assert len(r["read"]) == passes * len(block) + 1       # each once per pass (+ the one-image probe)
        assert r["calls"] == passes * 2 + 1                    # in chunks of 40
    # Both ranks: the very same result (the sums are shared, not recomputed).
    assert torch.equal(r0["R"], r1["R"]) and torch.equal(r0["s"], r1["s"]) and torch.equal(r0["full"], r1["full"])
    assert r0["history"] == r1["history"]
    # Against one process: only the order of the sums differs.
    ang = rotation_angle_deg(one.rotations, r0["R"])
    sh = (one.shifts - r0["s"]).norm(dim=-1)
    corr = float(torch.corrcoef(torch.stack([one.full.flatten(), r0["full"].flatten()]))[0, 1])
    print(f"2 ranks vs 1 process: rotation diff median {float(ang.median()):.2e} max {float(ang.max()):.2e} deg, "
          f"shift diff max {float(sh.max()):.2e} px, map correlation 1 - {1 - corr:.1e}")
    # 0.02° and 0.002 px: the order of the sums alone moves the worst of 160 particles by 0.008° (full-grid
    # accumulators) to 0.010° (half-spectrum ones, whose mirrored samples are summed in another order), and
    # with the compiled insertion (sample-major sums) by 0.005° and 0.0012 px; a particle a rank missed or
    # counted twice moves degrees. The map's correlation carries the same sums through the origin's estimate
    # (the whole map moves with it): 1 - 2e-6.
    assert float(ang.max()) < 0.02 and float(sh.max()) < 2e-3 and corr > 1 - 1e-5
    for a, b in zip(one.history, r0["history"]):
        assert np.allclose(a["fsc"], b["fsc"], atol=1e-3)


def test_half_two_offset_in_3d_is_undone(dataset):
    """Half 2's map moved by a 3D offset (its particles' shifts moved with it, a consistent frame): the
    registration finds the offset and half 2's new shifts come back to the truth."""
    h = torch.as_tensor(dataset["half"])
    t0 = torch.tensor([1.5, -1.0, 0.8], dtype=torch.float64)
    s_mixed = dataset["s"].clone()
    R2 = dataset["R"][h == 2]
    s_mixed[h == 2] = s_mixed[h == 2] + (R2.transpose(-1, -2) @ t0)[:, :2]
    maps = refine_poses(_loader(dataset["images"]), dataset["ctf"], APIX, dataset["R"], s_mixed, dataset["half"],
                        RefineConfig(iterations=0, global_step_deg=None))
    err = {}
    for shift in (3.0, 0.0):
        res = refine_poses(_loader(dataset["images"]), dataset["ctf"], APIX, dataset["R"], s_mixed, dataset["half"],
                           RefineConfig(iterations=1, global_step_deg=None, register_max_shift_px=shift,
                                        centre_origin=False),
                           initial_half_maps=(maps.half1, maps.half2))
        err[shift] = float((res.shifts[h == 2] - dataset["s"][h == 2]).norm(dim=-1).median())
        if shift:
            assert abs(res.history[1]["half2_registration_px"] - float(t0.norm())) < 0.3
    assert err[3.0] < 0.5 and err[0.0] > 1.0, err
