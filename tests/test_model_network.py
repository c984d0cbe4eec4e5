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


def test_fresh_model_outputs_reference_plane():
    model = CryoFastAR(model_config("XS", 16)).eval()
    out = model(torch.randn(1, 3, 16, 16))
    assert torch.allclose(out.xyz, normalize(planar_grid(16)).expand_as(out.xyz))
    assert torch.allclose(out.conf, torch.full_like(out.conf, 2.0))


@pytest.mark.parametrize("box, n_aux, overrides", [
    (32, 3, {}), (32, 7, {}), (64, 3, {}), (64, 7, {}), (32, 3, {"xyz_grid_base": False}),
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


def test_parameter_counts_of_the_named_sizes():
    # Analytic counts with the per-pixel linear head: L 532.6 M and S 52.0 M at D=128, p=16.
    assert abs(_count("L", 128) / 532.6e6 - 1) < 0.005
    assert abs(_count("S", 128) / 52.0e6 - 1) < 0.005
    assert abs(_count("XS", 64) / 13.7e6 - 1) < 0.01


def test_model_config_validation():
    with pytest.raises(ValueError, match="unknown model size"):
        model_config("XXL", 64)
    with pytest.raises(ValueError, match="multiple"):
        model_config("XS", 60)
    with pytest.raises(TypeError, match="stem"):
        model_config("XS", 64, stem="conv")  # removed option
    assert model_config("m", 128, patch=8).tokens == 256
