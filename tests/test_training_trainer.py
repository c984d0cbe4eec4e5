"""The trainer end to end on a tiny model: run-folder files, exact resume, CLI and user errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from cryofastar_core.cli import train as train_cli
from cryofastar_core.runtime.errors import InputError, WeightsError
from cryofastar_core.model import load_weights
from cryofastar_core.training.config import train_config_from_dict
from cryofastar_core.training.trainer import CHECKPOINT_FORMAT, train

TINY_MODEL = {"size": "XS", "overrides": {"patch": 4, "enc_dim": 32, "enc_depth": 1, "enc_heads": 2, "dec_dim": 32,
                                          "dec_depth": 1, "dec_heads": 2, "neck_dim": 16}}


@pytest.fixture(scope="session")
def volume_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("volume-cache")


def tiny_config(cache: Path, steps_a: int = 6, steps_b: int = 6, **top) -> dict:
    cfg = {
        "box": 16, "model": TINY_MODEL, "seed": 3, "cache_dir": str(cache),
        "checkpoint_every": 4, "log_every": 1, "val_samples": 2,
        "stages": [
            {"name": "A", "steps": steps_a, "batch_size": 2, "views_min": 4, "views_max": 6, "volumes": "single",
             "lr": 1e-3, "warmup_steps": 2},
            {"name": "B", "steps": steps_b, "batch_size": 2, "views_min": 4, "views_max": 6, "volumes": "library",
             "n_pseudo": 2, "snr_start": 10.0, "snr_end": 1.0, "ctf": True, "max_shift_px": 1.0, "apix_min": 3.0,
             "apix_max": 5.0, "lr": 5e-4},
        ],
    }
    cfg.update(top)
    return cfg


def read_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_end_to_end_run_folder(tmp_path, volume_cache):
    cfg = train_config_from_dict(tiny_config(volume_cache, 10, 10, checkpoint_every=10, log_every=5, val_every=10))
    run = tmp_path / "run"
    result = train(cfg, run, device="cpu")
    assert result.steps_done == 20 == result.total_steps and result.weights_path == run / "weights.pt"
    for name in ("config.yaml", "metrics.csv", "checkpoint.pt", "loss.png", "weights.pt", "summary.json"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_rows(run)
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    assert [r["stage"] for r in rows] == ["A", "A", "B", "B"]
    assert rows[0]["snr"] == "" and 1.0 <= float(rows[3]["snr"]) < 10.0 and rows[3]["ctf"] == "1"
    for r in rows:
        for key in ("loss", "regression", "grid", "denoise", "log_conf", "lr", "views_per_s", "grad_norm"):
            assert torch.isfinite(torch.tensor(float(r[key]))), key
        assert 4 <= int(r["views"]) <= 6
    assert rows[0]["val_rot_err_deg"] == "" and 0 <= float(rows[1]["val_rot_err_deg"]) <= 180
    assert float(rows[3]["val_shift_err_px"]) >= 0
    # Checkpoint: plain tensors and types only, with everything needed to resume.
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["format"] == CHECKPOINT_FORMAT and ck["step"] == 20 and ck["stage"] == "B"
    assert {"model", "optimizer", "scheduler", "rng", "config"} <= set(ck)
    # Final weights: loadable by the model's own reader, equal to the checkpoint's model, and usable.
    model = load_weights(run / "weights.pt")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ck["model"][k])
    out = model(torch.randn(1, 5, 16, 16))
    assert out.xyz.shape == (1, 5, 16, 16, 3)
    payload = torch.load(run / "weights.pt", weights_only=True)
    assert payload["extra"]["complete"] is True and payload["extra"]["trained_steps"] == 20
    summary = json.loads((run / "summary.json").read_text())
    assert summary["views_per_s"] > 0 and summary["train_flops_per_view"] > 0
    assert yaml.safe_load((run / "config.yaml").read_text()) == cfg.to_dict()


def test_training_reduces_the_loss_on_one_structure(tmp_path, volume_cache):
    cfg = train_config_from_dict(tiny_config(volume_cache, 40, 1, log_every=10, checkpoint_every=100))
    train(cfg, tmp_path / "run", device="cpu", max_steps=40)
    rows = read_rows(tmp_path / "run")
    reg = [float(r["regression"]) for r in rows]
    assert reg[-1] < 0.9 * reg[0], reg


def test_resume_reproduces_an_uninterrupted_run(tmp_path, volume_cache):
    cfg = train_config_from_dict(tiny_config(volume_cache, 6, 6))
    full = tmp_path / "full"
    train(cfg, full, device="cpu")
    part = tmp_path / "part"
    first = train(cfg, part, device="cpu", max_steps=5)  # stops mid-stage, off the checkpoint grid
    assert first.steps_done == 5
    assert torch.load(part / "weights.pt", weights_only=True)["extra"]["complete"] is False
    second = train(cfg, part, device="cpu", resume=True)
    assert second.steps_done == 12
    a, b = read_rows(full), read_rows(part)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [str(i) for i in range(1, 13)]
    for ra, rb in zip(a, b):
        for key in ("loss", "regression", "grid", "denoise", "lr", "views", "snr", "stage"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    wa = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(part / "checkpoint.pt", weights_only=True)["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_run_folder_errors(tmp_path, volume_cache):
    cfg = train_config_from_dict(tiny_config(volume_cache, 4, 1))
    run = tmp_path / "run"
    with pytest.raises(InputError, match="no checkpoint"):
        train(cfg, run, device="cpu", resume=True)
    train(cfg, run, device="cpu", max_steps=2)
    with pytest.raises(InputError, match="already holds a run"):
        train(cfg, run, device="cpu")
    bad = tiny_config(volume_cache, 4, 1)
    bad["stages"][0]["single_index"] = 10_000
    with pytest.raises(InputError, match="single_index"):
        train(train_config_from_dict(bad), tmp_path / "other", device="cpu")
    wider = tiny_config(volume_cache, 4, 1, init_weights=str(run / "weights.pt"))
    wider["model"] = {"size": "XS", "overrides": {**TINY_MODEL["overrides"], "dec_dim": 48}}
    with pytest.raises(WeightsError, match="weights.pt: does not match the configured model"):
        train(train_config_from_dict(wider), tmp_path / "wider", device="cpu")


def test_cli(tmp_path, volume_cache, capsys):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(volume_cache, 3, 1)))
    run = tmp_path / "run"
    assert train_cli.main(["--config", str(cfg_path), "--o", str(run), "--device", "cpu", "--max-steps", "3"]) == 0
    assert [r["step"] for r in read_rows(run)] == ["1", "2", "3"]
    assert train_cli.main(["--config", str(cfg_path), "--o", str(run), "--device", "cpu", "--resume"]) == 0
    assert [r["step"] for r in read_rows(run)] == ["1", "2", "3", "4"]
    bad = tiny_config(volume_cache)
    bad["stages"][0]["views_min"] = 2
    cfg_path.write_text(yaml.safe_dump(bad))
    assert train_cli.main(["--config", str(cfg_path), "--o", str(tmp_path / "r2"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "stages[0].views_min" in err and str(cfg_path) in err
    assert not (tmp_path / "r2").exists()


def test_validation_errors_flag_a_collapsed_model():
    """Exact FPMs give ~0° and spread 1; one constant FPM for every view (the mean-target plateau) gives
    spread 0, whatever its rotation error."""
    from types import SimpleNamespace

    from cryofastar_core.geometry import random_rotations
    from cryofastar_core.model.fpm import fpm_targets
    from cryofastar_core.training.trainer import validation_errors

    box, b, v = 16, 3, 5
    rot = random_rotations(b * v, generator=torch.Generator().manual_seed(0)).reshape(b, v, 3, 3)
    shifts = torch.rand(b, v, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    targets = fpm_targets(rot[:, 0], rot, shifts, box)
    batch = SimpleNamespace(rotations=rot, shifts=shifts, targets=lambda grid=None: targets)
    conf = torch.ones(b, v, box, box)
    exact = validation_errors(targets, conf, batch, box)
    assert exact["val_rot_err_deg"] < 1e-2 and exact["val_shift_err_px"] < 1e-3
    assert abs(exact["val_spread"] - 1.0) < 1e-6
    collapsed = targets.clone()
    collapsed[:, 1:] = targets[:1, 1:2]  # every auxiliary view gets one sample's FPM
    assert validation_errors(collapsed, conf, batch, box)["val_spread"] < 1e-6
