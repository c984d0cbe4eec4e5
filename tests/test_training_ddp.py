"""Distributed training (torchrun, gloo on CPU) matches one process with the same global batch."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cryofastar_core.training.config import train_config_from_dict
from cryofastar_core.training.trainer import train

REPO = Path(__file__).resolve().parents[1]


def config(cache: Path) -> dict:
    model = {"size": "XS", "overrides": {"patch": 4, "enc_dim": 32, "enc_depth": 1, "enc_heads": 2, "dec_dim": 32,
                                         "dec_depth": 1, "dec_heads": 2, "neck_dim": 16}}
    return {
        "box": 16, "model": model, "seed": 5, "cache_dir": str(cache), "checkpoint_every": 100, "log_every": 1,
        "val_samples": 2,
        "stages": [{"name": "B", "steps": 4, "batch_size": 4, "views_min": 4, "views_max": 6, "volumes": "library",
                    "n_pseudo": 1, "snr_start": 5.0, "snr_end": 1.0, "ctf": True, "max_shift_px": 1.0,
                    "apix_min": 3.0, "apix_max": 4.0, "lr": 1e-3}],
    }


def losses(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_two_ranks_equal_one_process(tmp_path):
    data = config(tmp_path / "volumes")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    single = tmp_path / "single"
    train(train_config_from_dict(data, cfg_path), single, device="cpu")

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
               OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    ddp = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cryofastar_core.cli.train", "--config", str(cfg_path), "--o", str(ddp), "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    a, b = losses(single), losses(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == ["1", "2", "3", "4"]
    for ra, rb in zip(a, b):
        assert ra["views"] == rb["views"] and ra["snr"] == rb["snr"]
        for key in ("loss", "regression", "grid", "denoise"):
            assert float(rb[key]) == pytest.approx(float(ra[key]), rel=1e-5, abs=1e-7), (ra["step"], key)
    # Rank 0 alone wrote the run folder; the model after 4 steps agrees with the one-process model.
    wa = torch.load(single / "checkpoint.pt", weights_only=True)
    wb = torch.load(ddp / "checkpoint.pt", weights_only=True)
    assert wb["world_size"] == 2 and wa["world_size"] == 1
    for k, v in wa["model"].items():
        torch.testing.assert_close(wb["model"][k], v, atol=1e-4, rtol=1e-3)
