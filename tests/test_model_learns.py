"""The default loss must teach rotations, not only lower its own value.

With a grid term of weight 10 (L1 on neighbour differences) the loss fell while the Kabsch rotation
error of a fixed batch stayed at 44 deg after 300 steps; without it the same batch was memorised to
under 2 deg. This guards the default configuration against such a stall.
"""
import torch

from cryofastar_core.geometry import mirror_rotations, random_rotations, rotation_angle_deg
from cryofastar_core.model import CryoFastAR, LossConfig, denormalize, fpm_loss, fpm_targets, kabsch, model_config
from cryofastar_core.model.fpm import relative_rotations
from cryofastar_core.physics.normalize import normalize_images
from cryofastar_core.physics.projection import prepare_volume
from cryofastar_core.simulation.images import simulate_images

from conftest import make_asymmetric_map


def _median_rotation_error(out, rotations: torch.Tensor, box: int) -> float:
    fit = kabsch(denormalize(out.xyz[:, 1:].detach()), out.conf[:, 1:].detach(), box)
    truth = relative_rotations(rotations[:, 0], rotations)[:, 1:]
    same = rotation_angle_deg(fit.rotation, truth)
    flip = rotation_angle_deg(mirror_rotations(fit.rotation), truth)
    pick = torch.where((flip.mean(-1) < same.mean(-1))[:, None], flip, same)
    return float(pick.median())


def test_default_loss_memorises_the_rotations_of_one_batch():
    torch.manual_seed(0)
    box, b, v = 32, 2, 4
    vft = prepare_volume(torch.from_numpy(make_asymmetric_map(box, n_blobs=12)), pad=2)
    g = torch.Generator().manual_seed(1)
    rotations = random_rotations(b * v, generator=g).reshape(b, v, 3, 3)
    shifts = torch.zeros(b, v, 2)
    clean, _ = simulate_images(vft, rotations.reshape(-1, 3, 3), None, None, 1.0, None)
    images = normalize_images(clean).reshape(b, v, box, box)
    target = fpm_targets(rotations[:, 0], rotations, shifts, box)

    model = CryoFastAR(model_config("XS", box, enc_dim=64, enc_depth=2, enc_heads=4, dec_dim=64, dec_depth=2,
                                    dec_heads=4, neck_dim=32, denoise_head=False))
    cfg = LossConfig(denoise_weight=0.0)  # every other term at its default
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    start = _median_rotation_error(model(images), rotations, box)
    for _ in range(150):
        loss, _ = fpm_loss(model(images), target, None, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = _median_rotation_error(model(images), rotations, box)
    # Measured: 4.3 deg with the defaults, 33 deg with grid_weight=10.
    assert start > 40 and end < 12, (start, end)
