"""On-the-fly training data: shapes, determinism (resume and rank splits), SNR, normalisation, targets."""
from __future__ import annotations

import pytest
import torch

from cryofastar_core.model.fpm import fpm_targets
from cryofastar_core.physics.normalize import normalize_images
from cryofastar_core.training.config import StageConfig
from cryofastar_core.training.data import BatchSimulator, VolumeFTCache, draw_sample, normalize_pair, sample_seed


class Maps:
    """Two distinct small test volumes (the conftest map and its z-mirror)."""

    def __init__(self, vol):
        self.vols = [torch.as_tensor(vol.copy()), torch.as_tensor(vol[::-1].copy())]
        self.reads = 0

    def __len__(self):
        return len(self.vols)

    def __getitem__(self, i):
        self.reads += 1
        return self.vols[i]


@pytest.fixture
def sim(tiny_map):
    maps = Maps(tiny_map[0])
    return BatchSimulator(VolumeFTCache(maps, "cpu", capacity=2), 32, "cpu")


def stage(**kw):
    base = dict(name="t", steps=10, batch_size=4, views_min=4, views_max=8)
    base.update(kw)
    return StageConfig(**base)


def test_shapes_and_targets(sim):
    st = stage(ctf=True, max_shift_px=3.0, snr_start=1.0, snr_end=1.0)
    b = sim.make_batch(st, seed=0, step=3, first_sample=0, n_samples=3, views=5, snr=1.0)
    assert b.images.shape == (3, 5, 32, 32) and b.clean.shape == (3, 5, 32, 32)
    assert b.targets().shape == (3, 5, 32, 32, 3) and b.rotations.shape == (3, 5, 3, 3) and b.shifts.shape == (3, 5, 2)
    assert b.views == 5 and b.volume_index.shape == (3,)
    assert torch.isfinite(b.images).all() and torch.isfinite(b.clean).all()
    torch.testing.assert_close(b.targets(), fpm_targets(b.rotations[:, 0], b.rotations, b.shifts, 32))
    # The reference view's target is the z = 1/2 plane (normalised z = 0) offset by its own shift.
    torch.testing.assert_close(b.targets()[:, 0, ..., 2], torch.full((3, 32, 32), 0.5), atol=1e-6, rtol=0)
    assert b.shifts.abs().max() <= 3.0 and b.shifts.abs().max() > 0.5
    rot = b.rotations.reshape(-1, 3, 3).double()
    torch.testing.assert_close(rot @ rot.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand_as(rot),
                               atol=1e-5, rtol=0)


def test_deterministic_and_independent_of_rank_split(sim):
    st = stage(ctf=True, max_shift_px=2.0, snr_start=0.5, snr_end=0.5, volumes="library")
    kw = dict(seed=7, step=11, views=6, snr=0.5)
    full = sim.make_batch(st, first_sample=0, n_samples=4, **kw)
    again = sim.make_batch(st, first_sample=0, n_samples=4, **kw)
    assert torch.equal(full.images, again.images) and torch.equal(full.clean, again.clean)
    # Two "ranks" of two samples each see exactly the samples of the one-process batch.
    r0 = sim.make_batch(st, first_sample=0, n_samples=2, **kw)
    r1 = sim.make_batch(st, first_sample=2, n_samples=2, **kw)
    for name in ("images", "clean", "rotations", "shifts", "volume_index"):
        assert torch.equal(torch.cat([getattr(r0, name), getattr(r1, name)]), getattr(full, name)), name
    # Different steps, seeds or samples give different data.
    other = sim.make_batch(st, first_sample=0, n_samples=4, **{**kw, "step": 12})
    assert not torch.allclose(other.images, full.images)
    assert not torch.equal(full.images[0], full.images[1])
    assert len({sample_seed(0, 0, s, i) for s in range(20) for i in range(20)}) == 400


def test_volume_choice_and_cache(sim):
    st = stage(volumes="library")
    idx = torch.cat([sim.make_batch(st, seed=0, step=s, first_sample=0, n_samples=4, views=4, snr=None).volume_index
                     for s in range(6)])
    assert set(idx.tolist()) == {0, 1}
    single = stage(volumes="single", single_index=1)
    b = sim.make_batch(single, seed=0, step=0, first_sample=0, n_samples=3, views=4, snr=None)
    assert b.volume_index.tolist() == [1, 1, 1]
    assert sim.volumes.source.reads == 2  # each volume read and prepared once, then cached


def test_clean_stage_has_no_noise(sim):
    b = sim.make_batch(stage(), seed=0, step=0, first_sample=0, n_samples=2, views=4, snr=None)
    torch.testing.assert_close(b.images, b.clean, atol=1e-5, rtol=0)


def test_clean_fraction_mixes_rung_one_samples(sim):
    """``clean_fraction`` draws whole samples as rung 1 (no noise, CTF or shifts); the rest keep the
    stage's setting, and a stage without it keeps its random stream."""
    hard = dict(ctf=True, max_shift_px=3.0, snr_start=0.1, snr_end=0.1)
    b = sim.make_batch(stage(clean_fraction=0.5, **hard), seed=3, step=0, first_sample=0, n_samples=16,
                       views=4, snr=0.1)
    clean = (b.images - b.clean).abs().amax(dim=(1, 2, 3)) < 1e-4
    assert 2 <= int(clean.sum()) <= 14
    assert (b.shifts[clean] == 0).all() and (b.shifts[~clean].abs().amax(dim=(1, 2)) > 0).all()
    # A clean sample is exactly the rung-1 image of its pose: no CTF.
    g = torch.Generator().manual_seed(sample_seed(3, 0, 0, int(clean.nonzero()[0])))
    assert draw_sample(stage(clean_fraction=0.5, **hard), 2, 4, g).ctf is None
    for frac in (0.0, 1.0):
        none = sim.make_batch(stage(clean_fraction=frac, **hard), seed=3, step=0, first_sample=0, n_samples=4,
                              views=4, snr=0.1)
        assert ((none.images - none.clean).abs().amax(dim=(1, 2, 3)) < 1e-4).all() == (frac == 1.0)
    plain = sim.make_batch(stage(**hard), seed=3, step=0, first_sample=0, n_samples=4, views=4, snr=0.1)
    zero = sim.make_batch(stage(clean_fraction=0.0, **hard), seed=3, step=0, first_sample=0, n_samples=4,
                          views=4, snr=0.1)
    torch.testing.assert_close(plain.images, zero.images, atol=0, rtol=0)


@pytest.mark.parametrize("snr", [10.0, 1.0, 0.1])
def test_realised_snr_and_normalisation(sim, snr):
    st = stage(ctf=True, snr_start=snr, snr_end=snr)
    b = sim.make_batch(st, seed=1, step=0, first_sample=0, n_samples=4, views=8, snr=snr)
    noise = b.images - b.clean
    # The shared affine normalisation keeps the ratio var(signal) / var(noise) of the raw images.
    realised = (b.clean.var(dim=(-2, -1)) / noise.var(dim=(-2, -1))).mean()
    assert realised == pytest.approx(snr, rel=0.1)
    # Inputs went through THE normalisation (it is idempotent) and have unit std.
    flat = b.images.reshape(-1, 32, 32)
    torch.testing.assert_close(normalize_images(flat), flat, atol=1e-4, rtol=1e-4)
    assert flat.std(dim=(-2, -1), unbiased=False).mean() == pytest.approx(1.0, abs=1e-3)
    # The noise is white and zero-mean: the clean image is the noise-free part on the same scale.
    assert noise.mean().abs() < 0.05


def test_normalize_pair_applies_the_same_affine_map():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(6, 16, 16, generator=g) * 3 + 5
    noisy = clean + torch.randn(6, 16, 16, generator=g)
    norm, clean_n = normalize_pair(noisy, clean)
    torch.testing.assert_close(norm, normalize_images(noisy))
    # norm = a * noisy + b  =>  norm - clean_n = a * (noisy - clean)
    a = norm.std(dim=(-2, -1), keepdim=True) / noisy.std(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(norm - clean_n, a * (noisy - clean), atol=1e-5, rtol=1e-5)


def test_ctf_draws_within_ranges():
    st = stage(ctf=True, defocus_min=8000.0, defocus_max=20000.0, astigmatism_max=500.0, apix_min=2.0, apix_max=3.0)
    d = draw_sample(st, 5, 200, torch.Generator().manual_seed(3))
    mean = (d.ctf.defocus_u + d.ctf.defocus_v) / 2
    assert mean.min() >= 8000 and mean.max() <= 20000 and mean.std() > 1000
    astig = d.ctf.defocus_u - d.ctf.defocus_v
    assert astig.min() >= 0 and astig.max() <= 500
    assert 2.0 <= d.apix <= 3.0
    assert torch.all(d.ctf.voltage == 300) and torch.allclose(d.ctf.cs, torch.tensor(2.7))
    assert d.ctf.defocus_angle.min() >= 0 and d.ctf.defocus_angle.max() <= 180


def test_tilt_curriculum_keeps_views_near_the_reference():
    from cryofastar_core.geometry import rotations_within_tilt
    from cryofastar_core.model.fpm import relative_rotations

    d = draw_sample(stage(), 5, 400, torch.Generator().manual_seed(5), max_tilt_deg=25.0)
    rel = relative_rotations(d.rotations[0], d.rotations[None])[0].double()
    tilt = torch.rad2deg(torch.arccos(rel[1:, 2, 2].clamp(-1, 1)))
    assert tilt.max() <= 25.0 + 1e-3 and tilt.max() > 20.0
    # Uniform on the cap: half the area lies beyond cos θ = (1 + cos 25°) / 2.
    import math
    beyond = (rel[1:, 2, 2] < (1 + math.cos(math.radians(25))) / 2).double().mean()
    assert 0.4 < float(beyond) < 0.6
    # In-plane angle stays uniform: the mean of cos ψ over the views is near 0.
    assert abs(float(rel[1:, 0, 0].mean())) < 0.15
    # 0° is pure in-plane rotation; 180° is Haar-uniform (E[Q] = 0, median angle 132°).
    q0 = rotations_within_tilt(50, 0.0, torch.Generator().manual_seed(1), torch.float64)
    torch.testing.assert_close(q0[:, 2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(50, 3))
    q = rotations_within_tilt(40000, 180.0, torch.Generator().manual_seed(2), torch.float64)
    assert q.mean(0).abs().max() < 0.02
    angle = torch.rad2deg(torch.arccos(((q.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)))
    assert abs(float(angle.median()) - 132.35) < 1.5
    with pytest.raises(ValueError, match="max_tilt_deg"):
        rotations_within_tilt(2, 200.0)


def test_max_tilt_is_validated_and_ramped():
    from cryofastar_core.runtime.errors import InputError
    from cryofastar_core.training.schedule import max_tilt_at

    st = stage(max_tilt_start=10.0, max_tilt_end=90.0)
    assert max_tilt_at(st, 0) == 10.0 and max_tilt_at(st, st.steps - 1) == 90.0
    with pytest.raises(InputError, match="max_tilt_end"):
        stage(max_tilt_end=270.0).validate(None, "stages[0]")
