"""Errors that reach the user: each names the file, the field and the fix."""
from __future__ import annotations

from pathlib import Path


class CryoFastARError(Exception):
    """Base class for errors the CLI reports as one clear message with a non-zero exit."""

    exit_code = 2


class InputError(CryoFastARError):
    """Bad user input: a file that cannot be used as it is."""

    def __init__(self, path: str | Path | None, field: str | None, problem: str, fix: str):
        self.path, self.field, self.problem, self.fix = path, field, problem, fix
        where = f"{path}" if path is not None else "input"
        if field:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}. Fix: {fix}")


class WeightsError(CryoFastARError):
    """A weights file that is not a CryoFastAR checkpoint of a compatible version."""

    exit_code = 3
