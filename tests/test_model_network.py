"""CryoFastAR network: shapes, confidence range, view-permutation behaviour, sizes, checkpointing."""
import pytest
import torch

from cryofastar_core.model import CryoFastAR, model_config
from cryofastar_core.model.fpm import normalize, planar_grid


def _perturbed_model(box, seed=0, **overrides):
    """An XS model whose zero-initialised head outputs are made non-zero, so outputs depend on inputs."""
    torch.manual_seed(seed)
    model = CryoFastAR(model_config("XS", box, **overrides)).eval()
    with torch.no_grad():
        for head in (model.ref_head, model.aux_head):
            head.out.weight.normal_(std=0.02)
            head.denoise.weight.normal_(std=0.02)
    return model


@pytest.mark.parametrize("overrides", [{}, {"head": "affine", "abs_pos": True}])
def test_fresh_model_outputs_reference_plane(overrides):
    model = CryoFastAR(model_config("XS", 16, **overrides)).eval()
    out = model(torch.randn(1, 3, 16, 16))
    assert torch.allclose(out.xyz, normalize(planar_grid(16)).expand_as(out.xyz))
    assert torch.allclose(out.conf, torch.full_like(out.conf, 2.0))


@pytest.mark.parametrize("box, n_aux, overrides", [
    (32, 3, {}), (32, 7, {}), (64, 3, {}), (64, 7, {}),
    (32, 3, {"head": "affine", "abs_pos": True}), (32, 3, {"ref_channel": True}),
    (64, 3, {"stem": "conv", "ref_channel": True, "head": "affine"}),
])
def test_shapes_conf_and_permutation(box, n_aux, overrides):
    model = _perturbed_model(box, **overrides)
    assert model.cfg.patch == box // 8 and model.cfg.tokens == 64
    B, V = 2, 1 + n_aux
    images = torch.randn(B, V, box, box, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(images)
        perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(n_aux, generator=torch.Generator().manual_seed(2))])
        assert not torch.equal(perm, torch.arange(V))
        out_p = model(images[:, perm])
    assert out.xyz.shape == (B, V, box, box, 3)
    assert out.conf.shape == (B, V, box, box)
    assert out.denoised.shape == (B, V, box, box)
    assert (out.conf >= 1).all() and torch.isfinite(out.xyz).all()
    # Auxiliary branch is permutation-equivariant, the reference does not see the order.
    torch.testing.assert_close(out_p.xyz, out.xyz[:, perm], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out_p.conf, out.conf[:, perm], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out_p.denoised, out.denoised[:, perm], atol=2e-5, rtol=1e-5)
    # The outputs do depend on the inputs (a model ignoring them would pass the checks above).
    assert (out.xyz[:, 1] - out.xyz[:, 2]).abs().max() > 1e-4
    # Views interact through the reference: changing one auxiliary view changes the reference output.
    changed = images.clone()
    changed[:, -1] = torch.randn(B, box, box, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out_c = model(changed)
    assert (out_c.xyz[:, 0] - out.xyz[:, 0]).abs().max() > 1e-6


def test_reference_only_and_no_denoise_head():
    model = _perturbed_model(16)
    out = model(torch.randn(2, 1, 16, 16))
    assert out.xyz.shape == (2, 1, 16, 16, 3)
    model = CryoFastAR(model_config("XS", 16, denoise_head=False))
    assert model(torch.randn(1, 2, 16, 16)).denoised is None


def test_rejects_wrong_image_shape():
    model = CryoFastAR(model_config("XS", 16))
    with pytest.raises(ValueError, match="images must be"):
        model(torch.randn(1, 2, 32, 32))


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    images = torch.randn(1, 3, 16, 16)
    grads = []
    for ckpt in (False, True):
        model = _perturbed_model(16, seed=0, checkpointing=ckpt).train()
        out = model(images)
        (out.xyz.square().sum() + out.conf.sum() + out.denoised.square().sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def _count(size, box, **overrides):
    with torch.device("meta"):
        model = CryoFastAR(model_config(size, box, **overrides))
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_brief():
    # Brief §2.2 (analytic, reproduces the official count with its per-pixel linear head):
    # L 532.6 M and S 52.0 M at D=128, p=16.
    assert abs(_count("L", 128, head="linear") / 532.6e6 - 1) < 0.005
    assert abs(_count("S", 128, head="linear") / 52.0e6 - 1) < 0.005
    assert abs(_count("XS", 64, head="linear") / 13.7e6 - 1) < 0.01
    # The affine head writes 9 + p² numbers per token instead of 4 p²: smaller, never larger.
    assert _count("S", 128, head="affine") < _count("S", 128)


def test_affine_head_writes_an_exact_fpm():
    """A token map A = Q[:, :2]/2, b = (Q·0 + h)/2 + 1/2 is exactly the normalised FPM of (Q, t)."""
    from cryofastar_core.geometry import random_rotations
    from cryofastar_core.model.fpm import fpm_targets
    from cryofastar_core.model.heads import FPMHead

    box, patch = 32, 4
    head = FPMHead(dim=8, neck=8, patch=patch, denoise=False, affine=True)
    q = random_rotations(1, generator=torch.Generator().manual_seed(4))[0]
    shift = torch.tensor([1.5, -2.0])
    g = box // patch
    params = torch.zeros(1, g, g, 9 + patch * patch)
    params[..., :6] = (q[:, :2] * 0.5).reshape(6)
    params[..., 6:9] = torch.tensor([shift[0] / box, shift[1] / box, 0.0]) * 0.5 + 0.5
    params[..., 9:] = 1.0
    out = head._affine(params)[0]
    target = fpm_targets(torch.eye(3)[None], q[None, None], shift[None, None], box)[0, 0]
    torch.testing.assert_close(out[..., :3], target, atol=1e-6, rtol=0)
    assert torch.all(out[..., 3] == 1.0)


def test_model_config_validation():
    with pytest.raises(ValueError, match="unknown model size"):
        model_config("XXL", 64)
    with pytest.raises(ValueError, match="multiple"):
        model_config("XS", 60)
    with pytest.raises(ValueError, match="head"):
        model_config("XS", 64, head="conv")
    with pytest.raises(ValueError, match="power-of-two"):
        model_config("XS", 48, stem="conv")  # patch 6
    with pytest.raises(ValueError, match="stem"):
        model_config("XS", 64, stem="resnet")
    assert model_config("m", 128, patch=8).tokens == 256


def test_absolute_position_reaches_the_tokens():
    """RoPE alone cannot tell tokens apart on a featureless image (attention sums position-free values);
    the sine-cosine embedding gives every token its own position."""
    from cryofastar_core.model.encoder import Encoder, sincos_position_embedding

    images = torch.zeros(1, 32, 32)
    torch.manual_seed(0)
    rope_only = Encoder(model_config("XS", 32, abs_pos=False)).eval()
    torch.manual_seed(0)
    with_pos = Encoder(model_config("XS", 32, abs_pos=True)).eval()
    with torch.no_grad():
        a, b = rope_only(images)[0], with_pos(images)[0]
    assert (a - a[0]).abs().max() < 1e-5
    assert (b - b[0]).abs().amax(dim=1)[1:].min() > 1e-2
    emb = sincos_position_embedding(8, 64)
    assert emb.shape == (64, 64)
    # Symmetric about the centre: mirrored positions differ only in the sign of their sine channels.
    torch.testing.assert_close(emb[0, 16:32], emb[63, 16:32])
    torch.testing.assert_close(emb[0, :16], -emb[63, :16])
