"""One SIGTERM handler and one exception -> exit-code mapping for the three entry points (issue 15).

``cryofastar``, ``cryofastar-relion`` and ``cryofastar-cryosparc`` each print in their own way, but the codes
(README "Exit codes") and what SIGTERM does come from :mod:`cryofastar_core.runtime.exit_codes`. The entry-point
tests run each ``main`` in this process with the job replaced by one that ends the way under test.
"""
from __future__ import annotations

import ast
import os
import signal
from pathlib import Path

import pytest

import cryofastar_core.cli.run as cli_run
import plugin.cli as plugin_cli
import relion_external.main as relion_main
from cryofastar_core.runtime import exit_codes
from cryofastar_core.cli.main import main as cryofastar_main
from cryofastar_core.runtime.errors import InputError, WeightsError
from cryofastar_core.runtime.exit_codes import Terminated, exit_code, sigterm_raises
from plugin.server import ServerError
from relion_external.markers import FAILURE

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = [REPO / "cryofastar_core" / "cli" / "main.py", REPO / "relion_external" / "main.py",
                REPO / "plugin" / "cli.py"]


class GuardSignal(Exception):
    """What SIGTERM raises in this test process outside an entry point (instead of killing pytest)."""


def _guard(signum, frame):
    raise GuardSignal()


@pytest.fixture
def guarded_sigterm():
    """SIGTERM handled by :func:`_guard` around the test; the test checks an entry point puts it back."""
    previous = signal.signal(signal.SIGTERM, _guard)
    yield _guard
    signal.signal(signal.SIGTERM, previous)


def _sigterm_self(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("SIGTERM did not interrupt the job")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _bug(*args, **kwargs):
    raise RuntimeError("a bug")


def _bad_weights(*args, **kwargs):
    raise WeightsError("w.pt: not a CryoFastAR weights file")


# --- the engine ------------------------------------------------------------------------------------------------------

def test_exit_code_table_matches_the_readme():
    assert exit_code(InputError("p.star", "rlnImageName", "missing", "add it")) == 2 == exit_codes.BAD_INPUT
    assert exit_code(WeightsError("bad weights")) == 3 == exit_codes.BAD_WEIGHTS
    assert exit_code(ServerError("no server")) == ServerError.exit_code  # a subclass keeps its own code
    assert exit_code(KeyboardInterrupt()) == 130 == exit_codes.INTERRUPTED
    assert exit_code(Terminated()) == 143 == exit_codes.TERMINATED == 128 + signal.SIGTERM
    assert exit_code(RuntimeError("bug")) == 1 == exit_codes.INTERNAL_ERROR
    assert exit_codes.OK == 0
    with pytest.raises(ValueError):
        exit_code(SystemExit(0))  # not an outcome of a run: let it propagate


def test_sigterm_raises_terminated_inside_and_restores_the_previous_handler(guarded_sigterm):
    with pytest.raises(Terminated, match="SIGTERM"):
        with sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not raise")
    assert signal.getsignal(signal.SIGTERM) is guarded_sigterm
    with pytest.raises(GuardSignal):
        os.kill(os.getpid(), signal.SIGTERM)


def test_no_entry_point_installs_its_own_handler():
    """Only exit_codes touches the SIGTERM handler or defines Terminated; the entry points use its names."""
    for path in ENTRY_POINTS:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                assert node.name != "Terminated", f"{path}: defines its own Terminated"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "signal":
                raise AssertionError(f"{path}: uses signal.{node.attr} itself (line {node.lineno})")
    assert cryofastar_main.__globals__["Terminated"] is Terminated
    assert relion_main.Terminated is Terminated and plugin_cli.Terminated is Terminated


# --- the three entry points --------------------------------------------------------------------------------------------

def _run_cryofastar(tmp_path, monkeypatch, job) -> int:
    monkeypatch.setattr(cli_run, "_main", job)
    return cryofastar_main(["run", "--particles", str(tmp_path / "p.star"), "--o", str(tmp_path / "out")])


def _run_relion(tmp_path, monkeypatch, job) -> int:
    import cryofastar_core.job

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    (tmp_path / "p.star").write_text("data_\n")
    monkeypatch.setattr(cryofastar_core.job, "run", job)
    code = relion_main.main(["--o", "External/job007/", "--in_parts", "p.star", "--j", "1"])
    # RELION reads markers, not exit codes: whatever the code, the job is marked failed.
    assert sorted(p.name for p in (tmp_path / "External" / "job007").iterdir()) == [FAILURE]
    return code


def _run_cryosparc(tmp_path, monkeypatch, job) -> int:
    monkeypatch.setattr(plugin_cli, "run_offline", job)
    return plugin_cli.main(["--cs", str(tmp_path / "p.cs"), "--o", str(tmp_path / "out")])


ADAPTERS = {"cryofastar": _run_cryofastar, "relion": _run_relion, "cryosparc": _run_cryosparc}
# `cryofastar` lets a bug's traceback reach Python (exit 1 there); the adapters print it and return 1.
OUTCOMES = {"sigterm": (_sigterm_self, 143), "interrupt": (_interrupt, 130), "weights": (_bad_weights, 3),
            "bug": (_bug, 1)}


@pytest.mark.parametrize("outcome", list(OUTCOMES))
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_entry_point_exit_codes(adapter, outcome, tmp_path, monkeypatch, capsys, guarded_sigterm):
    job, expected = OUTCOMES[outcome]
    if adapter == "cryofastar" and outcome == "bug":
        with pytest.raises(RuntimeError, match="a bug"):
            ADAPTERS[adapter](tmp_path, monkeypatch, job)
    else:
        assert ADAPTERS[adapter](tmp_path, monkeypatch, job) == expected
        err = capsys.readouterr().err
        assert "Traceback" not in err or outcome == "bug"
        if outcome == "sigterm":
            assert "SIGTERM" in err
    assert signal.getsignal(signal.SIGTERM) is guarded_sigterm, "the entry point left its SIGTERM handler behind"
