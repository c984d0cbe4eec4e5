"""Learnability probe: can a backbone learn the in-plane angle between two views of held-out structures?

The cheapest test of whether an encoder can pick up relative-pose signal at all, before spending a
training run on it. Pairs come from the training simulator (library volumes, clean images, auxiliary
views rotated in-plane about the reference's viewing direction, ``max_tilt_deg=0``); the reference and
an auxiliary view enter as two channels; the target is ``(cos ψ, sin ψ)`` of their relative in-plane
angle, trained with MSE; validation is the median angle error on the held-out split.

    PYTHONPATH=. python bench/pose_probe.py --backbone cnn --lr 1e-3 --steps 1000
    PYTHONPATH=. python bench/pose_probe.py --backbone vit --stem patch --lr 1e-3 --steps 1500
    PYTHONPATH=. python bench/pose_probe.py --backbone vit --stem conv --lr 1e-4 --steps 1000

Measured (1 CPU thread each, 2026-11-24, model card "Why the first model did not learn rotations"),
with session scratch copies of this probe (same networks, loss and optimiser; other data seeds):
cnn 5–10° after 1,000 steps; vit/patch (lr 1e-3) 57–70° after 1,500; vit/conv 66° (lr 1e-3),
26° (3e-4), 11° (1e-4) after 1,000. This script itself, cnn: 73° → 64° → 38° at steps 0 / 250 / 500
(cut at 600 s on a loaded machine). Chance is 90°.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from cryofastar_core.model import model_config
from cryofastar_core.model.encoder import Encoder
from cryofastar_core.model.fpm import relative_rotations
from cryofastar_core.training.config import StageConfig, TrainConfig, train_config_from_dict
from cryofastar_core.training.data import BatchSimulator, VolumeFTCache
from cryofastar_core.training.trainer import default_volume_factory

XS_SLIM = dict(enc_dim=128, enc_depth=4, enc_heads=4, dec_dim=128, dec_depth=3, dec_heads=4, neck_dim=64)


def in_plane_pairs(sim: BatchSimulator, stage: StageConfig, step: int, samples: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 2, D, D)`` (auxiliary view, reference) pairs and ``(N, 2)`` targets ``(cos ψ, sin ψ)``."""
    b = sim.make_batch(stage, seed=seed, step=step, first_sample=0, n_samples=samples, views=4, snr=None,
                       max_tilt_deg=0.0)
    q = relative_rotations(b.rotations[:, 0], b.rotations)[:, 1:]
    ref = b.images[:, :1].expand(-1, b.views - 1, -1, -1)
    x = torch.stack([b.images[:, 1:], ref], dim=2).flatten(0, 1)
    y = torch.stack([q[..., 0, 0], q[..., 1, 0]], dim=-1).flatten(0, 1)
    return x, y


def cnn(box: int) -> nn.Module:
    layers, c = [], 2
    for width in (32, 64, 64, 128):
        layers += [nn.Conv2d(c, width, 3 if c > 2 else 5, stride=2, padding=1 if c > 2 else 2), nn.GELU()]
        c = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * (box // 16) ** 2, 128), nn.GELU(), nn.Linear(128, 2))


class ViTProbe(nn.Module):
    """Our encoder (two-channel input) → mean over tokens → linear."""

    def __init__(self, box: int, stem: str):
        super().__init__()
        self.encoder = Encoder(model_config("XS", box, ref_channel=True, stem=stem, **XS_SLIM))
        self.out = nn.Linear(XS_SLIM["enc_dim"], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(x).mean(1))


def angle_error_deg(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    d = torch.rad2deg(torch.atan2(pred[:, 1], pred[:, 0]) - torch.atan2(target[:, 1], target[:, 0]))
    return ((d + 180) % 360 - 180).abs()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", choices=["cnn", "vit"], default="cnn")
    ap.add_argument("--stem", choices=["patch", "conv"], default="patch", help="ViT patch embedding")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=8, help="samples per step (3 pairs each)")
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    cfg: TrainConfig = train_config_from_dict({"box": a.box, "stages": [
        {"name": "probe", "steps": 1, "batch_size": 1, "volumes": "library", "n_pseudo": 200}]})
    stage = cfg.stages[0]
    factory = default_volume_factory(cfg)
    train_sim = BatchSimulator(VolumeFTCache(factory(stage, "train"), "cpu", capacity=300), a.box, "cpu")
    val_sim = BatchSimulator(VolumeFTCache(factory(stage, "heldout"), "cpu"), a.box, "cpu")
    net = cnn(a.box) if a.backbone == "cnn" else ViTProbe(a.box, a.stem)
    opt = torch.optim.AdamW(net.parameters(), a.lr)
    xv, yv = in_plane_pairs(val_sim, stage, 10 ** 6, 16, a.seed + 1)
    t0 = time.perf_counter()
    for step in range(a.steps + 1):
        x, y = in_plane_pairs(train_sim, stage, step, a.samples, a.seed)
        loss = ((net(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            with torch.no_grad():
                err = angle_error_deg(net(xv), yv)
            print(f"step {step:5d}  train MSE {loss.item():.3f}  held-out median angle error "
                  f"{err.median().item():5.1f}°  {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
