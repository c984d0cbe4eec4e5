"""FPM loss: hand invariance, bounds, switches, and that an XS model can overfit one batch."""
import pytest
import torch

from cryofastar_core.geometry import random_rotations
from cryofastar_core.model import CryoFastAR, LossConfig, ModelOutput, fpm_loss, fpm_targets, mirror_fpm, model_config


def _case(B=3, V=4, D=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    R = random_rotations(B * V, generator=g, dtype=dtype).reshape(B, V, 3, 3)
    t = (torch.rand(B, V, 2, generator=g, dtype=dtype) - 0.5) * 6
    target = fpm_targets(R[:, 0], R, t, D)
    # Dyadic z values make 1 − (1 − z) == z exactly, so mirroring twice is the identity bit for bit.
    target[..., 2] = torch.round(target[..., 2] * 2 ** 20) / 2 ** 20
    pred = target + 0.1 * torch.randn(target.shape, generator=g, dtype=dtype)
    conf = 1 + torch.exp(torch.randn(B, V, D, D, generator=g, dtype=dtype))
    den = torch.randn(B, V, D, D, generator=g, dtype=dtype)
    clean = torch.randn(B, V, D, D, generator=g, dtype=dtype)
    return ModelOutput(xyz=pred, conf=conf, denoised=den), target, clean


def test_hand_invariance_exact():
    out, target, clean = _case()
    # Make the predictions of sample 1 closer to the mirrored hand.
    out.xyz[1] = mirror_fpm(out.xyz[1:2])[0]
    cfg = LossConfig()
    loss, terms = fpm_loss(out, target, clean, cfg)
    loss_m, terms_m = fpm_loss(out, mirror_fpm(target), clean, cfg)
    assert torch.equal(loss, loss_m)
    assert terms["hand_flipped"].tolist() == [False, True, False]
    assert terms_m["hand_flipped"].tolist() == [True, False, True]
    # Without hand invariance the mirrored target of sample 1 costs more.
    plain = LossConfig(hand_invariant=False)
    assert fpm_loss(out, target, clean, plain)[0] > loss
    assert fpm_loss(out, target, clean, plain)[0] != fpm_loss(out, mirror_fpm(target), clean, plain)[0]


def test_loss_bounds_and_terms():
    out, target, clean = _case(seed=1)
    cfg = LossConfig(grid_weight=0, denoise_weight=0)
    loss, terms = fpm_loss(out, target, clean, cfg)
    log_c = torch.log(out.conf).mean()
    assert terms["regression"] >= 0 and terms["grid"] == 0 and terms["denoise"] == 0
    assert loss >= -cfg.alpha * log_c
    torch.testing.assert_close(terms["log_conf"], log_c)
    # The regression term is the confidence-weighted squared error per coordinate (no flip chosen here).
    manual = (out.conf[..., None] * (out.xyz - target) ** 2).mean()
    assert not terms["hand_flipped"].any()
    torch.testing.assert_close(loss, manual - 0.1 * log_c)
    full, terms_full = fpm_loss(out, target, clean, LossConfig(grid_weight=10.0))  # every term on
    expected = terms_full["regression"] - 0.1 * terms_full["log_conf"] + 10 * terms_full["grid"] + terms_full["denoise"]
    torch.testing.assert_close(full, expected)
    torch.testing.assert_close(terms_full["denoise"], ((out.denoised - clean) ** 2).mean())
    assert terms_full["grid"] > 0
    # A perfect prediction has zero regression and grid terms.
    perfect = ModelOutput(xyz=target.clone(), conf=out.conf, denoised=clean.clone())
    _, t0 = fpm_loss(perfect, target, clean, LossConfig())
    assert t0["regression"] == 0 and t0["grid"] == 0 and t0["denoise"] == 0


def test_include_reference_switch_and_denoise_needs_images():
    out, target, clean = _case(seed=2)
    cfg = LossConfig(include_reference=False, grid_weight=0, denoise_weight=0)
    out.xyz[:, 0] += 100.0  # a huge reference error must not count
    loss, _ = fpm_loss(out, target, None, cfg)
    assert loss < 10
    with pytest.raises(ValueError, match="denoise"):
        fpm_loss(out, target, None, LossConfig())


def test_xs_overfits_one_batch():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    D, B, V = 16, 1, 2
    model = CryoFastAR(model_config("XS", D))
    R = random_rotations(B * V, generator=g).reshape(B, V, 3, 3)
    t = (torch.rand(B, V, 2, generator=g) - 0.5) * 4
    target = fpm_targets(R[:, 0], R, t, D)
    images = torch.randn(B, V, D, D, generator=g)
    clean = torch.randn(B, V, D, D, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    cfg = LossConfig()
    history = []
    for _ in range(50):
        loss, terms = fpm_loss(model(images), target, clean, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((loss.item(), terms["regression"].item()))
    assert history[-1][0] < 0.5 * history[0][0]
    assert history[-1][1] < 0.4 * history[0][1]
