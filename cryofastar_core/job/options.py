"""The job's user options, declared once: name, type, default, help and bounds of each.

Every user-settable :class:`~cryofastar_core.job.JobConfig` field is declared there with :func:`option`
(its default, one line of help for a facility user, and its bounds or choices); :func:`options_of` reads
the declarations back as :class:`JobOption` s (``cryofastar_core.job.JOB_OPTIONS``). The fields without
an ``option`` (``particles``, ``out_dir``, ``project_dir``) are set by each front end its own way.

Each front end derives its words from the one list and nothing else:

- the command line (``cryofastar run``, ``demo``, ``cryofastar-cryosparc``): ``--views``, ``--refine-global`` /
  ``--no-refine-global`` (``cli/run.py``, ``add_job_arguments``);
- the RELION External job: GUI parameter labels, the field names (``relion_external/protocol.py``, ``PARAMS``);
- the CryoSPARC connector: keyword job options, the field names (``plugin/connector.py``, ``job_option_names``);
- YAML step files: keys, the field names (``job_config.py``).

The engine checks the declared bounds and choices in :meth:`JobConfig.validate` (:meth:`JobOption.problem`)
and raises :class:`~cryofastar_core.runtime.errors.InputError` naming the field; each front end renames the field
into its users' words (``InputError.renamed``).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

_KEY = "cryofastar_option"
_UNSET = object()


@dataclass(frozen=True)
class JobOption:
    """One user option of the job, in the engine's words (the JobConfig field name)."""

    name: str
    type: type  # int, float, str or bool
    default: Any
    help: str  # one line of plain text for a facility user, without the default
    optional: bool = False  # None is allowed (and means ``default_text``)
    default_text: str = ""  # what a None default means, for the help ("keep all")
    minimum: float | None = None
    maximum: float | None = None
    open_min: bool = False  # the minimum itself is outside the bounds
    open_max: bool = False  # the maximum itself is outside the bounds
    choices: tuple[str, ...] = ()  # a choice ending in ":N" stands for that prefix and a whole number
    fix: str = ""  # the fix suggested when a value is outside the bounds

    @property
    def flag(self) -> str:
        """The command-line flag: ``--chunks-per-batch``."""
        return "--" + self.name.replace("_", "-")

    def shown_default(self, default: Any = _UNSET) -> str:
        """The default (or ``default``, a front end's own) as the help shows it: ``128``, ``on``, ``keep all``."""
        value = self.default if default is _UNSET else default
        if value is None:
            return self.default_text
        if isinstance(value, bool):
            return "on" if value else "off"
        return str(value)

    def help_text(self, default: Any = _UNSET) -> str:
        """One line of help that ends with the default: ``images per forward pass ... (default: 128)``."""
        return f"{self.help} (default: {self.shown_default(default)})"

    def is_choice(self, value: Any) -> bool:
        for choice in self.choices:
            prefix, colon, number = choice.rpartition(":")
            if value == choice or (colon and number == "N" and str(value).startswith(prefix + ":")
                                   and str(value)[len(prefix) + 1:].isdigit()):
                return True
        return False

    def problem(self, value: Any) -> tuple[str, str] | None:
        """``(problem, fix)`` when ``value`` is outside the declared bounds or choices, else None.
        None (where allowed) is the default's meaning and is always fine."""
        if value is None:
            return None
        if self.choices and not self.is_choice(value):
            listed = ", ".join(self.choices[:-1]) + " or " + self.choices[-1]
            return f"unknown {self.name.replace('_', ' ')} '{value}'", self.fix or f"use {listed}"
        low = self.minimum is not None and (value <= self.minimum if self.open_min else value < self.minimum)
        high = self.maximum is not None and (value >= self.maximum if self.open_max else value > self.maximum)
        if not (low or high):
            return None
        if self.minimum is not None and self.maximum is not None:
            left, right = "(" if self.open_min else "[", ")" if self.open_max else "]"
            problem = f"{value} is not in {left}{self.minimum:g}, {self.maximum:g}{right}"
        elif low:
            problem = f"{value} is {'not above' if self.open_min else 'below'} the minimum {self.minimum:g}"
        else:
            problem = f"{value} is {'not below' if self.open_max else 'above'} the maximum {self.maximum:g}"
        return problem, self.fix or "use a value within the bounds"


def option(default: Any, help: str, *, default_text: str = "", minimum: float | None = None,
           maximum: float | None = None, open_min: bool = False, open_max: bool = False,
           choices: tuple[str, ...] = (), fix: str = "") -> Any:
    """A JobConfig field that is a user option (see :class:`JobOption`); its type is the field's annotation."""
    spec = dict(help=help, default_text=default_text, minimum=minimum, maximum=maximum, open_min=open_min,
                open_max=open_max, choices=tuple(choices), fix=fix)
    return dataclasses.field(default=default, metadata={_KEY: spec})


def options_of(cls: type) -> tuple[JobOption, ...]:
    """The options declared with :func:`option` on dataclass ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        if _KEY not in f.metadata:
            continue
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        value_type = args[0] if optional else hint
        if value_type not in (int, float, str, bool) or (optional and len(args) != 1):
            raise TypeError(f"{cls.__name__}.{f.name}: an option is int, float, str or bool (or one of them | None)")
        found.append(JobOption(name=f.name, type=value_type, default=f.default, optional=optional,
                               **f.metadata[_KEY]))
    return tuple(found)
