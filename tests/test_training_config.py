"""Training configuration: YAML loading, validation errors naming file and key, and the LR/SNR schedule."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from cryofastar_core.runtime.errors import InputError
from cryofastar_core.training.config import TrainConfig, load_train_config, train_config_from_dict
from cryofastar_core.training.schedule import learning_rate, snr_at, stage_at, stage_start, views_at

CONFIG_DIR = Path(__file__).resolve().parents[1] / "cryofastar_core" / "configs"


def base() -> dict:
    return {
        "box": 16,
        "model": {"size": "XS", "overrides": {"patch": 4}},
        "stages": [
            {"name": "A", "steps": 10, "batch_size": 2},
            {"name": "B", "steps": 20, "batch_size": 2, "views_min": 8, "views_max": 16, "snr_start": 10,
             "snr_end": 0.1, "ctf": True, "lr": "1e-4", "warmup_steps": 5},
        ],
    }


def write(tmp_path: Path, data: dict, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def error_for(tmp_path: Path, data: dict) -> InputError:
    path = write(tmp_path, data)
    with pytest.raises(InputError) as exc:
        load_train_config(path)
    assert str(path) in str(exc.value)
    return exc.value


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_bundled_configs_load(name):
    cfg = load_train_config(CONFIG_DIR / name)
    assert isinstance(cfg, TrainConfig) and cfg.total_steps > 0
    assert all(s.views_min >= 4 for s in cfg.stages)


def test_bundled_curricula_exist():
    names = {p.name for p in CONFIG_DIR.glob("*.yaml")}
    assert {"lines-box64-cpu.yaml", "lines-box64-gpu.yaml", "ab-patch-box64-cpu.yaml", "xs-box64-cpu.yaml",
            "s-box64-gpu.yaml", "s-box128-gpu.yaml"} <= names


def test_valid_config_types(tmp_path):
    cfg = load_train_config(write(tmp_path, base()))
    assert cfg.stages[1].lr == pytest.approx(1e-4)  # "1e-4" is a string to PyYAML: accepted as a number
    assert cfg.optimizer.betas == (0.9, 0.95) and cfg.optimizer.weight_decay == 0.05
    assert cfg.stages[0].snr_start is None and cfg.stages[1].ctf is True
    d = cfg.to_dict()
    assert isinstance(d["optimizer"]["betas"], list)
    assert train_config_from_dict(yaml.safe_load(yaml.safe_dump(d))).to_dict() == d


def test_single_stage_form_and_relative_paths(tmp_path):
    data = base()
    data["stage"] = data.pop("stages")[0]
    data["cache_dir"] = "vols"
    cfg = load_train_config(write(tmp_path, data))
    assert len(cfg.stages) == 1 and cfg.stages[0].name == "A"
    assert Path(cfg.cache_dir) == tmp_path / "vols"


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["stages"][0].update(colour="red"), "stages[0].colour"),
    (lambda d: d.update(learning_rate=1), "learning_rate"),
    (lambda d: d["stages"][0].update(views_min=2), "stages[0].views_min"),
    (lambda d: d["stages"][1].update(views_max=6), "stages[1].views_max"),
    (lambda d: d["stages"][0].update(steps="many"), "stages[0].steps"),
    (lambda d: d["stages"][0].update(steps=0), "stages[0].steps"),
    (lambda d: d["stages"][0].update(ctf="yes"), "stages[0].ctf"),
    (lambda d: d["stages"][0].update(volumes="all"), "stages[0].volumes"),
    (lambda d: d["stages"][0].update(split="val"), "stages[0].split"),
    (lambda d: d["stages"][1].pop("snr_end"), "stages[1].snr_end"),
    (lambda d: d["stages"][1].update(snr_end=-1), "stages[1].snr_end"),
    (lambda d: d["stages"][1].update(min_lr=1.0), "stages[1].min_lr"),
    (lambda d: d["stages"][1].update(clean_fraction=1.5), "stages[1].clean_fraction"),
    (lambda d: d["stages"][0].pop("batch_size"), "stages[0].batch_size"),
    (lambda d: d.update(optimizer={"betas": [0.9]}), "optimizer.betas"),
    (lambda d: d.update(optimizer={"momentum": 0.9}), "optimizer.momentum"),
    (lambda d: d.update(loss={"alpah": 0.1}), "loss"),
    (lambda d: d.update(model={"size": "XXL"}), "model"),
    (lambda d: d["model"]["overrides"].update(enc_width=3), "model"),
    (lambda d: d.update(stages=[]), "stages"),
    (lambda d: d["stages"][1].update(name="A"), "stages"),
    (lambda d: d.pop("box"), "box"),
])
def test_bad_values_name_file_and_key(tmp_path, mutate, field):
    data = base()
    mutate(data)
    err = error_for(tmp_path, data)
    assert err.field == field, str(err)


def test_unreadable_and_non_mapping(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_train_config(tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="mapping"):
        load_train_config(p)
    p.write_text("box: [1\n")
    with pytest.raises(InputError, match="YAML"):
        load_train_config(p)


def test_schedule(tmp_path):
    cfg = load_train_config(write(tmp_path, base()))
    a, b = cfg.stages
    assert stage_at(cfg.stages, 0).stage is a and stage_at(cfg.stages, 9).local_step == 9
    pos = stage_at(cfg.stages, 10)
    assert pos.stage is b and pos.local_step == 0 and stage_start(cfg.stages, 1) == 10
    # Warm-up is linear, then cosine from lr to min_lr.
    assert learning_rate(b, 0) == pytest.approx(b.lr / 5)
    assert learning_rate(b, 4) == pytest.approx(b.lr)
    assert learning_rate(b, 5) == pytest.approx(b.lr)
    assert learning_rate(b, b.steps) == pytest.approx(b.min_lr)
    lrs = [learning_rate(b, s) for s in range(5, b.steps)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))
    # SNR: log-linear from snr_start to snr_end, None on clean stages.
    assert snr_at(a, 3) is None
    assert snr_at(b, 0) == pytest.approx(10) and snr_at(b, b.steps - 1) == pytest.approx(0.1)
    mid = [math.log(snr_at(b, s)) for s in range(b.steps)]
    steps = [y - x for x, y in zip(mid, mid[1:])]
    assert max(steps) == pytest.approx(min(steps))
    # Views: within the stage's range, a function of (seed, step) only, and not constant.
    v = [views_at(b, 0, s) for s in range(200)]
    assert min(v) == 8 and max(v) == 16 and v == [views_at(b, 0, s) for s in range(200)]
    assert v != [views_at(b, 1, s) for s in range(200)]


def test_continue_from_committed_weights_skips_done_stages(tmp_path, monkeypatch):
    import yaml

    from cryofastar_core.training.config import continue_from

    path = Path(__file__).resolve().parents[1] / "cryofastar_core" / "configs" / "lines-box64-cpu.yaml"
    cfg = load_train_config(path)
    monkeypatch.chdir(tmp_path)
    later = continue_from(cfg, "R3-ctf", "w.pt", path)
    assert [s.name for s in later.stages] == [s.name for s in cfg.stages][2:]
    assert later.init_weights == str(tmp_path / "w.pt")  # the command line's path, from where it was typed
    # The run folder's copy of the config, read back on --resume, names the same file.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(later.to_dict(), sort_keys=False))
    assert load_train_config(tmp_path / "run" / "config.yaml").init_weights == later.init_weights
    assert [s.name for s in cfg.stages][:2] == ["R1-clean", "R2-shifts"]  # the original is unchanged
    with pytest.raises(InputError, match="R9"):
        continue_from(cfg, "R9", None, path)
