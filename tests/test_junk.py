"""Junk found from the data alone (cryofastar_core/refine/junk.py): pure-noise images among real particles
are flagged in the global passes and left out of the maps; a clean set loses nothing."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _volumes import blob_particles

from cryofastar_core.evaluation.metrics import rotation_errors
from cryofastar_core.geometry import random_rotations, rotvec_to_matrix
from cryofastar_core.refine.driver import RefineConfig, refine_poses
from cryofastar_core.refine.junk import flag_junk, randomised_phases

BOX, APIX, N_GOOD, N_JUNK = 32, 3.0, 300, 100


def _lognormal(n: int, mean: float, sd: float, seed: int) -> torch.Tensor:
    return torch.exp(mean + sd * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


def test_a_low_mode_below_the_null_is_flagged():
    good, junk = _lognormal(900, 1.7, 0.17, 0), _lognormal(300, 0.65, 0.19, 1)
    null = _lognormal(150, 0.86, 0.2, 2)
    flags, z, rule = flag_junk(torch.cat([good, junk]), null)
    assert rule.split and rule.mean_low < rule.null_median < rule.mean_high
    assert int(flags[:900].sum()) <= 5 and int(flags[900:].sum()) >= 297  # the boundary sits ~3 SD below good
    assert float(z[900:].max()) < -3 < float(z[:900].median())


def test_no_split_without_a_second_mode_or_when_the_low_mode_is_not_junk():
    clean = _lognormal(1200, 1.7, 0.17, 3)
    null = _lognormal(150, 0.86, 0.2, 4)
    flags, _, rule = flag_junk(clean, null)
    assert not rule.split and not bool(flags.any())
    # Two modes, both far above what structureless images score: a weaker subpopulation, not junk.
    weaker = torch.cat([clean, _lognormal(400, 1.2, 0.15, 5)])
    flags, _, rule = flag_junk(weaker, null)
    assert rule.bic_gain > 10 and not rule.split and not bool(flags.any())


def test_randomised_phases_keep_the_amplitudes():
    X = torch.randn(4, 50, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    Y = randomised_phases(X, torch.Generator().manual_seed(1))
    assert torch.allclose(Y.abs(), X.abs(), atol=1e-6)
    assert float((Y - X).abs().mean()) > 0.5 * float(X.abs().mean())


@pytest.fixture(scope="module")
def with_noise_junk():
    """``N_GOOD`` views of the blob volume (SNR 1, CTF, shifts) whose starting poses are 5-8 degrees off, and
    ``N_JUNK`` pure-noise images of the same variance at random poses, shuffled together."""
    g = torch.Generator().manual_seed(1)
    n = N_GOOD + N_JUNK
    R, s, ctf, images = blob_particles(n, BOX, APIX, g)
    junk = torch.zeros(n, dtype=torch.bool)
    junk[torch.randperm(n, generator=g)[:N_JUNK]] = True
    images[junk] = torch.randn(N_JUNK, BOX, BOX, generator=g) * images[~junk].std()
    axis = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)
    R0 = R @ rotvec_to_matrix(axis * torch.deg2rad(5 + 3 * torch.rand(n, 1, generator=g, dtype=torch.float64)))
    R0[junk] = random_rotations(N_JUNK, g, dtype=torch.float64)
    return dict(images=images, ctf=ctf, R=R, s=s, R0=R0, junk=junk, half=np.arange(n) % 2 + 1)


def _refine(data, **options):
    images = data["images"]
    cfg = RefineConfig(iterations=1, chunk_size=128, global_passes=3, **options)
    return refine_poses(lambda idx: images[torch.as_tensor(idx)], data["ctf"], APIX, data["R0"], data["s"],
                        data["half"], cfg)


def test_noise_images_are_found_and_left_out_of_the_maps(with_noise_junk):
    data = with_noise_junk
    out = _refine(data)
    truth = data["junk"]
    caught, lost = int((out.junk & truth).sum()), int((out.junk & ~truth).sum())
    print(f"noise junk caught {caught}/{N_JUNK}, good particles lost {lost}/{N_GOOD}; rule {out.junk_rule}")
    assert caught >= 0.9 * N_JUNK and lost <= 0.02 * N_GOOD
    assert out.junk_rule["split"] and all("junk" in h for h in out.history if h["stage"] == "global")
    # The good particles still refine: their poses end near the truth (up to the frame's global rotation).
    good = ~truth
    err = rotation_errors(out.rotations[good], data["R"][good])
    print(f"good particles after refinement: median {err['median_deg']:.2f} deg")
    assert err["median_deg"] < 5
    # The junk scores low: every flagged particle below every kept good one's median.
    assert float(out.junk_score[out.junk].max()) < float(out.junk_score[good & ~out.junk].median())

    kept_in = _refine(data, exclude_junk=False)
    assert torch.equal(kept_in.junk, out.junk) or int((kept_in.junk ^ out.junk).sum()) <= 3
    # Left out, the maps agree better with each other (the noise adds only noise to them).
    assert out.history[-1]["resolution_0143"] <= kept_in.history[-1]["resolution_0143"] + 1e-6


def test_a_clean_set_loses_no_particle(with_noise_junk):
    data = with_noise_junk
    good = ~data["junk"]
    clean = dict(images=data["images"][good], ctf=data["ctf"].index(torch.nonzero(good).flatten()),
                 R0=data["R0"][good], s=data["s"][good], half=data["half"][good.numpy()])
    out = _refine(clean)
    assert not out.junk_rule["split"] and int(out.junk.sum()) == 0, out.junk_rule
    assert math.isfinite(out.junk_rule["bic_gain"])
