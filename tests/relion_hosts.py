"""The real RELION versions the tests run against: 3.1 from Debian's package (on PATH), and 5.0 / 4.0 built
from ../shared/relion/ by scripts/build_relion.sh into a cache outside the repository.

``hosts()`` lists the versions present. Under CI (``CI`` set) every version named in
``CRYOFASTAR_RELION_BUILDS`` (scripts/test.sh sets it to what it built) must be present: a missing build
fails the run, it is never skipped. Outside CI a developer without the builds runs 3.1 alone.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("CRYOFASTAR_RELION_CACHE", Path.home() / ".cache" / "cryofastar" / "relion"))
BUILD_COMMAND = "bash scripts/build_relion.sh {release}"
# RELION's process status: 3.1 writes the integer, 4.0 and 5.0 the label (pipeline_jobs.h, PROC_*).
STATUS_NAMES = {0: "Running", 1: "Scheduled", 2: "Succeeded", 3: "Failed", 4: "Aborted"}


@dataclass(frozen=True)
class RelionHost:
    """One RELION installation: ``release`` as built (``3.1``, ``5.0.1``), its ``major`` and its programs."""

    release: str
    bin_dir: Path | None  # None: the programs on PATH (Debian's 3.1)

    @property
    def major(self) -> int:
        return int(self.release.split(".")[0])

    @property
    def name(self) -> str:
        return f"relion{'.'.join(self.release.split('.')[:2])}"

    def exe(self, program: str) -> str:
        """The absolute path of one RELION program of this version; fails the test if it is missing."""
        path = (self.bin_dir / program) if self.bin_dir else (Path(p) if (p := shutil.which(program)) else None)
        if path is None or not path.is_file():
            pytest.fail(f"{self.name}: {program} missing ({self.bin_dir or 'PATH'}); build it with "
                        f"{BUILD_COMMAND.format(release=self.release)} or install Debian's relion", pytrace=False)
        return str(path)

    def job_type(self, kind: str) -> str:
        """The ``--addJob`` name of a job kind: 3.1's process names, 4.0/5.0's type labels."""
        names = {"external": ("External", "relion.external"), "import": ("Import", "relion.import.other")}
        return names[kind][0 if self.major < 4 else 1]

    def node_dir(self, code: int, label: str) -> str:
        """The ``.Nodes/`` sub-folder the pipeliner files a node under (what the GUI's browser lists):
        3.1 by integer type, 4.0/5.0 by the label's first part."""
        return str(code) if self.major < 4 else label.split(".")[0]


def hosts() -> list[RelionHost]:
    found = [RelionHost("3.1", None)]
    listed = os.environ.get("CRYOFASTAR_RELION_BUILDS", "").split()
    for release in listed or sorted(p.name.removeprefix("relion-") for p in CACHE.glob("relion-*")):
        if (CACHE / f"relion-{release}" / "BUILD_OK").is_file():
            found.append(RelionHost(release, CACHE / f"relion-{release}" / "bin"))
        elif listed and os.environ.get("CI"):
            raise RuntimeError(f"RELION {release} is listed in CRYOFASTAR_RELION_BUILDS but not built in {CACHE}: "
                               f"run {BUILD_COMMAND.format(release=release)}")
    return found
