"""Help a facility user reads: plain text (no reST markup) and every option's default shown, the
defaults being the ones the command really uses."""
from __future__ import annotations

import re

import pytest

from cryofastar_core.cli.main import build_parser


def _help(*cmd: str) -> str:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[cmd[0]].format_help()


@pytest.mark.parametrize("cmd", ["run", "demo"])
def test_help_is_plain_text_with_every_default(cmd):
    text = _help(cmd)
    assert "``" not in text and ":mod:" not in text and ":func:" not in text
    options = re.split(r"\n  (?=--)", text.split("options:", 1)[1])[1:]
    names = [o.split()[0] for o in options]
    assert "--views" in names and "--o" in names
    for opt in options:
        if opt.startswith("--config") or opt.startswith("--particles") or opt.startswith("--o "):
            continue
        assert "default" in " ".join(opt.split()), opt


def test_demo_help_shows_the_demos_own_defaults():
    run_help, demo_help = (" ".join(_help(c).split()) for c in ("run", "demo"))
    assert "new particles (default: 128)" in run_help and "new particles (default: 64)" in demo_help
    assert "kept (default: 64)" in run_help and "kept (default: 8)" in demo_help
    assert "global passes (0: feed-forward poses only) (default: 3)" in run_help
