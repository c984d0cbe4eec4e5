"""The job's options are declared once (cryofastar_core.job.options, on JobConfig): every one is settable,
with the same default, from the command line, RELION's External job, the CryoSPARC connector and a YAML
step file; RELION's README lists every RELION parameter; the engine checks the declared bounds."""
from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from cryofastar_core.cli.main import build_parser
from cryofastar_core.cli.job_flags import CLI_NAMES, add_job_arguments, command_line_settings
from cryofastar_core.runtime.errors import InputError
from cryofastar_core.job import JOB_OPTIONS, JobConfig
from cryofastar_core.job.step_file import STEP_KEYS, build_job_config
from plugin.connector import engine_config, job_option_names
from relion_external.protocol import ADAPTER_PARAMS, PARAMS, job_settings, parse_external_args

REPO = Path(__file__).resolve().parents[1]
NOT_OPTIONS = {"particles", "out_dir", "project_dir"}
IDS = [opt.name for opt in JOB_OPTIONS]


def _sample(opt):
    """A valid value other than the default (the device one that needs no GPU)."""
    if opt.type is bool:
        return not opt.default
    if opt.choices:
        others = [c for c in opt.choices if c != opt.default]
        return next((c for c in others if c in ("cpu", "uniform")), others[0])
    if opt.type is int:
        return (opt.default if opt.default is not None else opt.minimum or 1) + 1
    if opt.type is float:
        return 0.5
    return "/weights/other.pt"


def _relion_text(value) -> str:
    return ("Yes" if value else "No") if isinstance(value, bool) else str(value)


def _run_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["run"]


def test_the_schema_covers_every_user_field_of_jobconfig():
    fields = {f.name for f in dataclasses.fields(JobConfig)}
    assert {opt.name for opt in JOB_OPTIONS} == fields - NOT_OPTIONS
    assert set(STEP_KEYS) == fields
    for opt in JOB_OPTIONS:
        assert opt.help and "default" not in opt.help.lower() and "``" not in opt.help, opt.name
        assert opt.default is not None or (opt.optional and opt.default_text), opt.name
        assert all(c in opt.help for c in opt.choices), opt.name  # the help names every choice
        assert opt.problem(opt.default) is None, opt.name


@pytest.mark.parametrize("opt", JOB_OPTIONS, ids=IDS)
def test_every_option_is_a_flag_with_the_declared_default(opt):
    by_dest = {a.dest: a for a in _run_parser()._actions}
    action = by_dest[opt.name]
    assert opt.flag in action.option_strings
    if opt.type is bool:
        assert "--no-" + opt.flag[2:] in action.option_strings
    assert CLI_NAMES[opt.name] == opt.flag
    assert f"(default: {opt.shown_default()})" in " ".join(action.help.split())
    # The parsed default of a plain parser (run itself uses None for "not given", for --config).
    fresh = argparse.ArgumentParser()
    add_job_arguments(fresh)
    assert getattr(fresh.parse_args([]), opt.name) == opt.default
    # Given on the command line, it reaches the JobConfig.
    value = _sample(opt)
    given = [("--" if value else "--no-") + opt.flag[2:]] if opt.type is bool else [opt.flag, str(value)]
    args = build_parser().parse_args(["run", "--particles", "p.star", "--o", "out", *given])
    assert getattr(build_job_config(None, command_line_settings(args)), opt.name) == value
    # cryofastar-cryosparc has the same flag and default.
    from plugin.cli import build_parser as cryosparc_parser

    assert getattr(cryosparc_parser().parse_args([]), opt.name) == opt.default


@pytest.mark.parametrize("opt", JOB_OPTIONS, ids=IDS)
def test_every_option_is_a_relion_parameter_with_the_declared_default(opt, tmp_path):
    assert PARAMS[opt.name][0] == opt.name and opt.name not in ADAPTER_PARAMS
    value = _sample(opt)
    args = parse_external_args(["--o", "External/job001/", "--" + opt.name, _relion_text(value)])
    assert job_settings(args) == {opt.name: value}
    # An empty GUI value keeps the declared default.
    empty = job_settings(parse_external_args(["--o", "External/job001/", "--" + opt.name]))
    assert opt.name not in empty
    assert getattr(JobConfig(particles=tmp_path / "p", out_dir=tmp_path / "o", **empty), opt.name) == opt.default


@pytest.mark.parametrize("text, value", [("yes", True), ("No", False), ("true", True), ("FALSE", False)])
def test_relion_yes_no_parameters(text, value):
    args = parse_external_args(["--o", "E/", "--refine_global", text])
    assert job_settings(args) == {"refine_global": value}
    with pytest.raises(InputError, match="'refine_global'.*yes or no"):
        job_settings(parse_external_args(["--o", "E/", "--refine_global", "maybe"]))


@pytest.mark.parametrize("opt", JOB_OPTIONS, ids=IDS)
def test_every_option_is_a_cryosparc_option_with_the_declared_default(opt, tmp_path):
    assert opt.name in job_option_names()
    assert getattr(engine_config({}, tmp_path / "p.cs", tmp_path, None), opt.name) == opt.default
    value = _sample(opt)
    assert getattr(engine_config({opt.name: value}, tmp_path / "p.cs", tmp_path, None), opt.name) == value


@pytest.mark.parametrize("opt", JOB_OPTIONS, ids=IDS)
def test_every_option_is_a_step_file_key_with_the_declared_default(opt, tmp_path):
    step = tmp_path / "step.yaml"
    step.write_text(yaml.safe_dump({"particles": "p.star", "o": "out"}))
    assert getattr(build_job_config(step, {}), opt.name) == opt.default
    value = _sample(opt)
    step.write_text(yaml.safe_dump({"particles": "p.star", "o": "out", opt.name: value}))
    assert getattr(build_job_config(step, {}), opt.name) == value


def _relion_parameter_table() -> dict[str, str]:
    """Label -> meaning, from the Params-tab table of relion_external/README.md."""
    text = (REPO / "relion_external" / "README.md").read_text()
    lines = text[text.index("**Params tab.**"):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Label |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        label = re.fullmatch(r"`(\w+)`", cells[0])
        assert label, line
        assert label.group(1) not in rows, f"{label.group(1)} listed twice"
        rows[label.group(1)] = cells[-1]
    return rows


def test_relion_readme_lists_every_parameter_with_its_default():
    table = _relion_parameter_table()
    assert set(table) == set(PARAMS) | set(ADAPTER_PARAMS)
    for opt in JOB_OPTIONS:
        meaning = table[opt.name]
        if opt.default is None:
            assert "empty" in meaning.lower(), opt.name
        else:
            assert f"Default: `{_relion_text(opt.default)}`" in meaning, opt.name


@pytest.mark.parametrize("opt", [o for o in JOB_OPTIONS if o.minimum is not None or o.choices], ids=lambda o: o.name)
def test_declared_bounds_are_checked_in_field_names(opt, tmp_path):
    if opt.choices:
        wrong = "nonsense"
    elif opt.open_min or opt.type is int:
        wrong = opt.minimum - 1 if opt.type is int else opt.minimum
    else:
        wrong = opt.minimum - 0.5
    cfg = JobConfig(particles=tmp_path / "p", out_dir=tmp_path / "o", **{opt.name: wrong})
    with pytest.raises(InputError) as err:
        cfg.validate()
    assert err.value.field == opt.name and err.value.fix
    assert err.value.renamed(CLI_NAMES).field == opt.flag


@pytest.mark.parametrize("settings, problem", [
    ({"views": 3}, "3 is below the minimum 4"),
    ({"anchors": 127}, "127 does not fit in 128 views"),
    ({"keep_fraction": 1.5}, "1.5 is not in (0, 1]"),
    ({"keep_fraction": 0.0}, "0.0 is not in (0, 1]"),
    ({"min_confidence": 1.0}, "1.0 is not in [0, 1)"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"device": "cuda:x"}, "unknown device 'cuda:x'"),
    ({"weighting": "equal"}, "unknown weighting 'equal'"),
])
def test_bound_messages(settings, problem, tmp_path):
    with pytest.raises(InputError) as err:
        JobConfig(particles=tmp_path / "p", out_dir=tmp_path / "o", **settings).validate()
    assert err.value.problem == problem
    JobConfig(particles=tmp_path / "p", out_dir=tmp_path / "o", keep_fraction=1.0, min_confidence=0.0,
              anchors=126, views=128, device="cpu").validate()


def test_class_poses_is_checked_with_the_weights(tmp_path):
    """A --class-poses that names no pose model is refused with the weights (stage load_weights), not after
    the particles are read and their class averages found."""
    with pytest.raises(InputError) as err:
        JobConfig(particles=tmp_path / "p", out_dir=tmp_path / "o", class_poses=str(tmp_path / "none.pt")).check_class_poses()
    assert err.value.field == "class_poses" and "common-lines" in err.value.fix
    JobConfig(particles=tmp_path / "p", out_dir=tmp_path / "o", class_poses="default").check_class_poses()
    # Ignored (and so not checked) when the class-average route is off.
    JobConfig(particles=tmp_path / "p", out_dir=tmp_path / "o", class_averages="off",
              class_poses=str(tmp_path / "none.pt")).check_class_poses()
