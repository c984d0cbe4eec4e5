"""FPM targets and Kabsch pose recovery: simulate -> FPM -> Kabsch must give the poses back."""
import pytest
import torch

from cryofastar_core.geometry import mirror_rotations, random_rotations
from cryofastar_core.model.fpm import denormalize, fpm_targets, mirror_fpm, planar_grid
from cryofastar_core.model.kabsch import kabsch


def _poses(B, V, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = random_rotations(B * V, generator=g, dtype=torch.float64).reshape(B, V, 3, 3).to(dtype)
    R_ref = random_rotations(B, generator=g, dtype=torch.float64).to(dtype)
    t = ((torch.rand(B, V, 2, generator=g, dtype=torch.float64) - 0.5) * 20).to(dtype)
    return R_ref, R, t


def test_planar_grid_axes():
    g = planar_grid(5, dtype=torch.float64)
    assert g.shape == (5, 5, 3)
    # row h -> y, column w -> x; x runs along image columns.
    assert g[0, 4].tolist() == [1.0, -1.0, 0.0]
    assert g[4, 0].tolist() == [-1.0, 1.0, 0.0]
    assert g[2, 2].tolist() == [0.0, 0.0, 0.0]
    assert g.reshape(-1, 3).mean(0).abs().max() < 1e-15


def test_reference_fpm_is_shifted_plane():
    R_ref, R, t = _poses(2, 3, 8, torch.float64)
    R[:, 0] = R_ref
    X = denormalize(fpm_targets(R_ref, R, t, 8))
    expected = planar_grid(8, dtype=torch.float64).expand(2, 8, 8, 3).clone()
    expected[..., :2] += t[:, 0, None, None, :] / 8
    assert torch.allclose(X[:, 0], expected, atol=1e-12)


@pytest.mark.parametrize("dtype,rot_tol,shift_tol", [(torch.float32, 1e-4, 1e-3), (torch.float64, 1e-10, 1e-9)])
@pytest.mark.parametrize("weighted", [False, True])
def test_kabsch_recovers_poses(dtype, rot_tol, shift_tol, weighted):
    B, V, D = 3, 5, 32
    R_ref, R, t = _poses(B, V, D, dtype, seed=1)
    X = denormalize(fpm_targets(R_ref, R, t, D))
    assert X.shape == (B, V, D, D, 3) and X.dtype == dtype
    w = None
    if weighted:
        w = 1 + 10 * torch.rand(B, V, D, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    res = kabsch(X, w, D)
    Q_true = R_ref.transpose(-1, -2)[:, None] @ R
    assert (res.rotation - Q_true).abs().max() < rot_tol
    assert (res.shift - t).abs().max() < shift_tol
    assert res.residual.abs().max() < 10 * rot_tol
    # The pose in the map frame is R_0 Q.
    assert (R_ref[:, None] @ res.rotation - R).abs().max() < 10 * rot_tol
    det = torch.linalg.det(res.rotation.double())
    assert torch.allclose(det, torch.ones_like(det), atol=1e-5)


def test_kabsch_matches_svd_on_noisy_fpm():
    """The closed-form polar factor equals the SVD + det-correction solution."""
    B, V, D = 2, 4, 16
    R_ref, R, t = _poses(B, V, D, torch.float64, seed=3)
    g = torch.Generator().manual_seed(4)
    X = denormalize(fpm_targets(R_ref, R, t, D)) + 0.05 * torch.randn(B, V, D, D, 3, generator=g, dtype=torch.float64)
    w = torch.rand(B, V, D, D, generator=g, dtype=torch.float64) + 0.1
    res = kabsch(X, w, D)
    grid = planar_grid(D, dtype=torch.float64).reshape(-1, 3)
    wn = w.reshape(B, V, -1) / w.reshape(B, V, -1).sum(-1, keepdim=True)
    Xf = X.reshape(B, V, -1, 3)
    gc, xc = wn @ grid, (wn[..., None] * Xf).sum(-2)
    H = ((grid - gc[..., None, :]) * wn[..., None]).transpose(-1, -2) @ (Xf - xc[..., None, :])
    U, _, Vh = torch.linalg.svd(H)
    d = torch.linalg.det(Vh.transpose(-1, -2) @ U.transpose(-1, -2))
    S = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    Q_svd = Vh.transpose(-1, -2) @ S @ U.transpose(-1, -2)
    assert (res.rotation - Q_svd).abs().max() < 1e-10
    shift_ref = D * (xc - (Q_svd @ gc[..., None])[..., 0])[..., :2]
    assert (res.shift - shift_ref).abs().max() < 1e-9
    assert (res.residual > 0.03).all()


def test_kabsch_gradcheck():
    D = 5
    R_ref, R, t = _poses(1, 2, D, torch.float64, seed=5)
    g = torch.Generator().manual_seed(6)
    X = denormalize(fpm_targets(R_ref, R, t, D)) + 0.05 * torch.randn(1, 2, D, D, 3, generator=g, dtype=torch.float64)
    w = torch.rand(1, 2, D, D, generator=g, dtype=torch.float64) + 0.5
    X.requires_grad_(True)
    w.requires_grad_(True)

    def f(X, w):
        r = kabsch(X, w, D)
        return r.rotation, r.shift, r.residual

    assert torch.autograd.gradcheck(f, (X, w), eps=1e-6, atol=1e-6)
    # Uniform weights on the exact square grid (equal singular values): gradients stay finite.
    X0 = denormalize(fpm_targets(R_ref, R, t, D)).requires_grad_(True)
    kabsch(X0, None, D).rotation.sum().backward()
    assert torch.isfinite(X0.grad).all()


def test_mirror_target_gives_mirrored_rotation():
    B, V, D = 2, 4, 16
    R_ref, R, t = _poses(B, V, D, torch.float64, seed=7)
    R[:, 0] = R_ref
    tgt = fpm_targets(R_ref, R, t, D)
    mir = mirror_fpm(tgt)
    assert torch.equal(mir[:, 0], tgt[:, 0])
    res = kabsch(denormalize(mir), None, D)
    Q_true = R_ref.transpose(-1, -2)[:, None] @ R
    assert (res.rotation[:, 1:] - mirror_rotations(Q_true[:, 1:])).abs().max() < 1e-10
    assert (res.rotation[:, 0] - torch.eye(3, dtype=torch.float64)).abs().max() < 1e-10
    assert (res.shift - t).abs().max() < 1e-9
    # The mirror is a different solution, not the same one.
    assert (res.rotation[:, 1:] - Q_true[:, 1:]).abs().max() > 1e-2
