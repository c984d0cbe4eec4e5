"""Errors that reach the user: each names the file, the field and the fix."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


class CryoFastARError(Exception):
    """Base class for errors the CLI reports as one clear message with a non-zero exit."""

    exit_code = 2

    def renamed(self, names: Mapping[str, str]) -> CryoFastARError:
        """This error in the caller's users' words; only :class:`InputError` names a field to translate."""
        return self


class InputError(CryoFastARError):
    """Bad user input: a file that cannot be used as it is."""

    def __init__(self, path: str | Path | None, field: str | None, problem: str, fix: str):
        self.path, self.field, self.problem, self.fix = path, field, problem, fix
        where = f"{path}" if path is not None else "input"
        if field:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}. Fix: {fix}")

    def renamed(self, names: Mapping[str, str]) -> InputError:
        """The same error with the engine's field names (``views``; several joined by ", ") in the words
        of the caller's users (``--views`` on the command line, a GUI label in RELION); others unchanged.
        The engine words its fixes without option names, so only the field needs translating."""
        if not self.field:
            return self
        parts = [names.get(p.strip(), p.strip()) for p in self.field.split(",")]
        return InputError(self.path, ", ".join(parts), self.problem, self.fix)


class WeightsError(CryoFastARError):
    """A weights file that is not a CryoFastAR checkpoint of a compatible version."""

    exit_code = 3
