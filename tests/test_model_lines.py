"""The line model: the line transform's physics, in-plane equivariance, polar FPM plumbing, and that a
tiny line model learns relative rotations of poses it has never seen."""
import math

import pytest
import torch

from cryofastar_core.geometry import mirror_rotations, random_rotations, rotation_angle_deg, rotations_within_tilt
from cryofastar_core.model import (LineCryoFastAR, LossConfig, build_model, denormalize, fpm_loss, fpm_targets,
                                   kabsch, load_weights, model_config, save_weights)
from cryofastar_core.model.fpm import relative_rotations
from cryofastar_core.model.lines import polar_grid
from cryofastar_core.physics.line_transform import line_transform
from cryofastar_core.physics.normalize import normalize_images
from cryofastar_core.physics.projection import prepare_volume
from cryofastar_core.simulation.images import simulate_images

from conftest import make_asymmetric_map

BOX, L, S = 32, 16, 16


def rz(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rx(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


@pytest.fixture(scope="module")
def vft():
    return prepare_volume(torch.from_numpy(make_asymmetric_map(BOX, n_blobs=30, seed=3)), pad=2)


def tiny_lines_config(**overrides):
    params = dict(arch="lines", n_lines=L, line_samples=S, line_radii=3, enc_dim=32, enc_depth=1,
                  enc_heads=2, dec_dim=32, dec_depth=2, dec_heads=2, denoise_head=False)
    params.update(overrides)
    return model_config("XS", BOX, **params)


def test_common_lines_are_equal(vft):
    """Line b of view 1 and line a of view 0 share their 3D direction when R_1 = R_0 Rz(θ_a) Rx(β) Rz(−θ_b):
    their profiles agree to interpolation accuracy, while lines of other directions do not."""
    g = torch.Generator().manual_seed(5)
    step = 2 * math.pi / L
    for a, b, beta in ((3, 11, 0.9), (0, 5, 2.0), (14, 2, -1.2)):
        r0 = random_rotations(1, generator=g)[0]
        r1 = r0 @ rz(a * step) @ rx(beta) @ rz(-b * step)
        clean, _ = simulate_images(vft, torch.stack([r0, r1]))
        lines = line_transform(clean.double(), L, S)
        common = (lines[0, a] - lines[1, b]).norm() / lines[0, a].norm()
        assert common < 0.02, (a, b, float(common))
        # The line θ + π is the same marginal reversed.
        reverse = (lines[0, a] - lines[1, (b + L // 2) % L].flip(0)).norm() / lines[0, a].norm()
        assert reverse < 0.02
        others = [(lines[0, a] - lines[1, j]).norm() / lines[0, a].norm() for j in range(L) if j not in (b, (b + L // 2) % L)]
        assert min(others) > 5 * common


def test_in_plane_rotation_by_one_step_shifts_the_lines(vft):
    """The image of R Rz(Δ) is the image of R rotated in-plane; its line l is line l + 1 of the original."""
    g = torch.Generator().manual_seed(2)
    r = random_rotations(3, generator=g)
    turned = r @ rz(2 * math.pi / L)
    clean, _ = simulate_images(vft, torch.cat([r, turned]))
    lines = line_transform(clean, L, S)
    rolled = torch.roll(lines[:3], shifts=-1, dims=-2)
    rel = (lines[3:] - rolled).norm() / rolled.norm()
    assert rel < 0.02, float(rel)
    assert (lines[3:] - lines[:3]).norm() / lines[:3].norm() > 10 * rel


def test_auxiliary_branch_is_equivariant_and_poses_compose():
    """Rolling one auxiliary view's lines by one step rolls that view's polar FPM and leaves the others
    unchanged, so its Kabsch pose is the old one composed with Rz(Δ): exactly what the rotated image's
    true pose is (previous test)."""
    torch.manual_seed(0)
    model = build_model(tiny_lines_config()).eval()
    for head in (model.ref_head, model.aux_head):  # zero-initialised outputs would make the check trivial
        torch.nn.init.normal_(head.out.weight, std=0.2)
    lines = torch.randn(2, 5, L, S)
    turned = lines.clone()
    turned[:, 2] = torch.roll(lines[:, 2], shifts=-1, dims=-2)
    with torch.no_grad():
        a, b = model.forward_lines(lines), model.forward_lines(turned)
    torch.testing.assert_close(b.xyz[:, 2], torch.roll(a.xyz[:, 2], shifts=-1, dims=1), atol=1e-5, rtol=1e-4)
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(b.xyz[:, keep], a.xyz[:, keep], atol=1e-5, rtol=1e-4)
    fit_a = kabsch(denormalize(a.xyz[:, 2]), a.conf[:, 2], BOX, a.grid)
    fit_b = kabsch(denormalize(b.xyz[:, 2]), b.conf[:, 2], BOX, b.grid)
    torch.testing.assert_close(fit_b.rotation, fit_a.rotation @ rz(2 * math.pi / L), atol=1e-4, rtol=1e-4)


def test_polar_targets_give_exact_poses_and_zero_loss():
    g = torch.Generator().manual_seed(4)
    rot = random_rotations(12, generator=g).reshape(2, 6, 3, 3)
    shifts = torch.rand(2, 6, 2, generator=g) * 4 - 2
    grid = polar_grid(L, 3)
    target = fpm_targets(rot[:, 0], rot, shifts, BOX, grid)
    assert target.shape == (2, 6, L, 3, 3)
    fit = kabsch(denormalize(target), None, BOX, grid)
    truth = relative_rotations(rot[:, 0], rot)
    assert rotation_angle_deg(fit.rotation, truth).max() < 0.1  # float32 acos near 1
    torch.testing.assert_close(fit.shift, shifts, atol=1e-4, rtol=0)
    model = build_model(tiny_lines_config())
    out = model(torch.randn(2, 6, BOX, BOX))
    assert out.xyz.shape == target.shape and torch.equal(out.grid, grid)
    # A fresh model's reference output is its exact FPM for zero shift.
    fit_ref = kabsch(denormalize(out.xyz[:, 0]), out.conf[:, 0], BOX, out.grid)
    torch.testing.assert_close(fit_ref.rotation, torch.eye(3).expand(2, 3, 3), atol=1e-5, rtol=0)
    perfect = type(out)(xyz=target, conf=torch.ones_like(out.conf), denoised=None, grid=grid)
    loss, terms = fpm_loss(perfect, target, None, LossConfig(denoise_weight=0.0))
    assert float(terms["regression"]) == 0.0


def test_line_weights_round_trip(tmp_path):
    model = build_model(tiny_lines_config()).eval()
    save_weights(model, tmp_path / "w.pt")
    loaded = load_weights(tmp_path / "w.pt")
    assert isinstance(loaded, LineCryoFastAR) and loaded.cfg == model.cfg
    x = torch.randn(1, 4, BOX, BOX)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).xyz, model(x).xyz)


def test_weights_of_another_model_are_refused_naming_the_file(tmp_path):
    from cryofastar_core.runtime.errors import WeightsError
    from cryofastar_core.model.checkpoint import init_from_weights

    save_weights(build_model(tiny_lines_config()), tmp_path / "w.pt")
    init_from_weights(build_model(tiny_lines_config()), tmp_path / "w.pt")  # the same model loads
    with pytest.raises(WeightsError, match="w.pt: does not match the configured model"):
        init_from_weights(build_model(tiny_lines_config(dec_dim=48)), tmp_path / "w.pt")


def test_line_config_validation():
    with pytest.raises(ValueError, match="ctf_correction"):
        tiny_lines_config(ctf_correction="wiener")
    with pytest.raises(ValueError, match="n_lines"):
        tiny_lines_config(n_lines=7)
    with pytest.raises(ValueError, match="arch"):
        model_config("XS", BOX, arch="voxels")


def _rotation_error(out, rotations: torch.Tensor) -> float:
    fit = kabsch(denormalize(out.xyz[:, 1:].detach()), out.conf[:, 1:].detach(), BOX, out.grid)
    truth = relative_rotations(rotations[:, 0], rotations)[:, 1:]
    same = rotation_angle_deg(fit.rotation, truth)
    flip = rotation_angle_deg(mirror_rotations(fit.rotation), truth)
    return float(torch.where((flip.mean(-1) < same.mean(-1))[:, None], flip, same).median())


def test_tiny_line_model_learns_relative_rotations_of_unseen_poses(vft):
    """Trained on fresh Haar-random poses of one structure every step, validated on poses never drawn:
    the error must fall far below chance (about 125 deg) within a CI budget."""
    torch.manual_seed(0)
    model = build_model(tiny_lines_config(enc_dim=48, dec_dim=48, enc_heads=4, dec_heads=4, dec_depth=2))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    cfg = LossConfig(denoise_weight=0.0)
    g = torch.Generator().manual_seed(1)
    b, v = 8, 8

    def batch():
        # Haar-uniform poses drawn as the trainer draws them (reference, then relative rotations)
        rot = random_rotations(b, generator=g)[:, None] @ rotations_within_tilt(b * v, 180.0, generator=g).reshape(b, v, 3, 3)
        clean, _ = simulate_images(vft, rot.reshape(-1, 3, 3))
        return normalize_images(clean).reshape(b, v, BOX, BOX), rot

    val_images, val_rot = batch()
    with torch.no_grad():
        start = _rotation_error(model(val_images), val_rot)
    for _ in range(STEPS):
        images, rot = batch()
        out = model(images)
        loss, _ = fpm_loss(out, fpm_targets(rot[:, 0], rot, torch.zeros(b, v, 2), BOX, out.grid), None, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        end = _rotation_error(model(val_images), val_rot)
    assert start > 100 and end < min(END_DEG, start - MIN_DROP_DEG), (start, end)


# Measured (1 thread, 600 steps, start -> end, deg): 120 -> 41, 120 -> 53, 120 -> 80, 130 -> 95 (four
# runs of this set-up: other pose draws or initialisations), and 134 -> 34, 126 -> 88 at batch 16:
# learning on one structure at this size is a noisy descent that breaks through at different steps.
# Without the similarity bias the same model stayed at 104-122 deg after 800 steps (a drop of at most
# 16 deg), so "below 100 deg and at least 25 deg below the start" separates learning from not.
STEPS = 600
END_DEG = 100.0
MIN_DROP_DEG = 25.0


def test_lagged_similarity_finds_common_lines_of_shifted_views(vft):
    """A shift along the common line moves one profile; zero-lag similarity drops, the lagged one
    stays near 1 (what ``similarity_lag`` is for)."""
    from cryofastar_core.model.lines import line_similarity

    step = 2 * math.pi / L
    r0 = random_rotations(1, generator=torch.Generator().manual_seed(9))[0]
    r1 = r0 @ rz(3 * step) @ rx(1.1) @ rz(-7 * step)  # line 7 of view 1 = line 3 of view 0
    u = torch.tensor([math.cos(7 * step), math.sin(7 * step)])
    shifts = torch.stack([torch.zeros(2), 4.0 * u])  # 4 px along view 1's common line: about 2 samples
    clean, _ = simulate_images(vft, torch.stack([r0, r1]), shifts)
    lines = line_transform(clean, L, S).reshape(1, 2, L, S)
    plain = line_similarity(lines)[0, 0, 3, L + 7]
    lagged = line_similarity(lines, max_lag=3)[0, 0, 3, L + 7]
    assert lagged > 0.97 and plain < lagged - 0.1, (float(plain), float(lagged))
    assert torch.equal(line_similarity(lines, max_lag=3)[0, 1], line_similarity(lines)[0, 1])  # spectra: lag-free
