"""RELION's External-job command line, parsed leniently, and turned into a :class:`JobConfig`.

RELION (3.1, 4.0 and 5.0 alike) runs ``<exe> --o External/jobNNN/ [--in_parts f] [--in_3dref f] [--in_mask f]
[--<label> <value>]... --j <threads> <additional arguments>``: user parameters become ``--<label> <value>``
with nothing after the flag when the value is empty, the additional arguments are appended unparsed, and
any command containing ``relion_`` gets ``--pipeline_control <dir>`` (``--pipeline-control`` in 5.0)
appended. So the parser is hand-written: every flag is accepted, a flag's value is the next token unless
that token is another flag, and flags we do not know are kept in :attr:`ExternalArgs.unknown` for a
warning, never an error. ``tests/test_relion_external_pipeline.py`` runs the job from the own pipeliner of
RELION 3.1, 4.0 and 5.0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cryofastar_core.runtime.errors import InputError
from cryofastar_core.job import JOB_OPTIONS

# RELION's input flags, in the order RELION emits them.
INPUT_FLAGS = ("in_movies", "in_mics", "in_parts", "in_coords", "in_3dref", "in_mask")
# Flags RELION may add that carry no meaning for us.
IGNORED_FLAGS = ("pipeline_control",)


@dataclass
class ExternalArgs:
    """One External-job invocation.

    ``params`` maps normalised names (lower case, ``-`` -> ``_``) to the value, or ``None`` for a flag
    given with nothing after it (an empty GUI value). ``unknown`` lists flags we did not recognise.
    """

    out_dir: str
    inputs: dict[str, str] = field(default_factory=dict)
    threads: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    @property
    def in_parts(self) -> str | None:
        return self.inputs.get("in_parts")


def _normalise(flag: str) -> str:
    return flag.lstrip("-").strip().lower().replace("-", "_")


def split_flags(argv: list[str]) -> list[tuple[str, str | None]]:
    """``argv`` -> ``[(name, value or None), ...]`` in order.

    A token starting with ``--`` is a flag (``--name=value`` is split at the first ``=``); the next token
    is its value unless it is itself a flag. Negative numbers (``-1``) are values, not flags. Stray values
    with no flag before them (e.g. from free text in "Additional arguments") get the name ``""``.
    """
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--") and len(tok) > 2:
            name, eq, inline = tok[2:].partition("=")
            if eq:
                pairs.append((_normalise(name), inline))
                i += 1
                continue
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not (nxt.startswith("--") and len(nxt) > 2):
                pairs.append((_normalise(name), nxt))
                i += 2
            else:
                pairs.append((_normalise(name), None))
                i += 1
        else:
            pairs.append(("", tok))
            i += 1
    return pairs


def parse_external_args(argv: list[str]) -> ExternalArgs:
    """Parse RELION's External argv (without the program name). Only a missing ``--o`` is an error."""
    out_dir: str | None = None
    args = ExternalArgs(out_dir="")
    for name, value in split_flags(argv):
        if name == "o":
            out_dir = value
        elif name in INPUT_FLAGS:
            if value:
                args.inputs[name] = value
        elif name == "j":
            args.threads = _parse_int("j", value) if value else None
        elif name in IGNORED_FLAGS or name == "":
            if name == "":
                args.unknown.append(str(value))
        else:
            # Later values win, like RELION's own parsers; "Additional arguments" can override a parameter.
            args.params[name] = value if value not in (None, "") else None
    if not out_dir:
        raise InputError(None, "--o", "RELION gave no output folder",
                         "run this program as a RELION External job (RELION passes --o External/jobNNN/)")
    args.out_dir = out_dir
    return args


def _parse_int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(None, name, f"'{value}' is not a whole number", f"set '{name}' to a whole number") from None


def _parse_bool(name: str, value: str) -> bool:
    text = value.strip().lower()
    if text in ("yes", "true", "1", "on"):
        return True
    if text in ("no", "false", "0", "off"):
        return False
    raise InputError(None, name, f"'{value}' is not yes or no", f"set '{name}' to Yes or No")


def _parse_float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InputError(None, name, f"'{value}' is not a number", f"set '{name}' to a number such as 0.8") from None


def _parse_text(name: str, value: str) -> str:
    return value.strip()


def _parse_choice(name: str, value: str) -> str:
    return value.strip().lower()  # the engine checks the choice and names the parameter


_PARSERS: dict[type, Callable[[str, str], object]] = {int: _parse_int, float: _parse_float, bool: _parse_bool,
                                                       str: _parse_text}

# User parameters (GUI label -> JobConfig field and parser): one per declared job option
# (cryofastar_core.job.options), labelled with its field name; yes/no options read Yes/No/true/false.
# Labels are typed without dashes in the GUI.
PARAMS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    opt.name: (opt.name, _parse_choice if opt.choices else _PARSERS[opt.type]) for opt in JOB_OPTIONS}
# Parameters read by the adapter itself rather than the engine.
ADAPTER_PARAMS = ("gpu", "relion_version")


def gui_names(params: dict) -> dict[str, str]:
    """JobConfig field -> the name a RELION user typed it as (a parameter label; ``gpu`` for the device
    unless a ``device`` parameter was given; ``--o`` and ``--in_parts`` for the folders)."""
    names = {field: label for label, (field, _) in PARAMS.items()}
    if "device" not in params:
        names["device"] = "gpu"
    return {**names, "out_dir": "--o", "particles": "--in_parts"}


def gpu_device(value: str | None) -> str:
    """RELION-style GPU ids -> a torch device: empty -> ``auto``; ``0`` / ``0,1`` / ``0:1`` -> ``cuda:0``
    (the engine uses one GPU: the first listed); ``cpu`` -> ``cpu``."""
    if value is None or not value.strip():
        return "auto"
    v = value.strip().lower()
    if v in ("cpu", "auto", "cuda"):
        return v
    first = v.replace(":", ",").split(",")[0].strip()
    if not first.isdigit():
        raise InputError(None, "gpu", f"'{value}' is not a GPU id",
                         "leave 'gpu' empty (automatic), or give a GPU number such as 0, or cpu")
    return f"cuda:{int(first)}"


def job_settings(args: ExternalArgs) -> dict:
    """The :class:`~cryofastar_core.job.JobConfig` keyword arguments set by the user parameters.

    Empty values keep the engine default. ``gpu`` sets ``device`` (an explicit ``device`` parameter wins).
    ``--j`` sets the CPU threads unless a ``threads`` parameter is given.
    """
    settings: dict = {}
    if "gpu" in args.params:
        settings["device"] = gpu_device(args.params["gpu"])
    if args.threads is not None:
        settings["threads"] = args.threads
    for name, value in args.params.items():
        if name not in PARAMS or value is None:
            continue
        key, parse = PARAMS[name]
        settings[key] = parse(name, value)
    return settings


def unused_flags(args: ExternalArgs) -> list[str]:
    """Flags and stray values that will be ignored, for a warning in ``run.out``."""
    known = set(PARAMS) | set(ADAPTER_PARAMS)
    return [f"--{n}" for n in args.params if n not in known] + list(args.unknown)


def particles_path(args: ExternalArgs) -> Path:
    """The ``--in_parts`` STAR file (relative to the project folder), or an :class:`InputError`."""
    if not args.in_parts:
        raise InputError(None, "--in_parts", "no input particles were given",
                         "on the External job's Input tab, set 'Input particles' to a particles STAR file")
    return Path(args.in_parts)
