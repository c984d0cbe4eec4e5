"""The one seam between the connector and a CryoSPARC instance (cryosparc-tools 5.x).

:class:`CryoSPARCServer` is deliberately small and dumb: every method is one cryosparc-tools call,
takes plain uids, and returns plain values or real ``cryosparc.dataset.Dataset`` objects. All logic lives
in :mod:`plugin.connector`, so tests can replace this class with a recording fake and check exactly which calls are made
(tests/test_plugin.py). The calls themselves are checked through the real client in tests/test_plugin_live.py: a
``CryoSPARC`` object whose ``httpx`` traffic goes to an in-process v5 instance built from the tools' own API stub.

cryosparc-tools 4.x is refused (see :func:`check_tools_version`): its classes, ports and login
(a license ID) differ, and it cannot be tested here without a 4.x server.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from cryofastar_core.runtime.errors import CryoFastARError
from plugin.credentials import Credentials, redact

SUPPORTED_MAJOR = 5


class ServerError(CryoFastARError):
    """The CryoSPARC instance could not be reached or refused a request."""

    exit_code = 4


@dataclass(frozen=True)
class JobInfo:
    """What the connector needs to know about an existing job."""

    uid: str
    type: str
    status: str
    outputs: tuple[str, ...]


def installed_tools_version() -> str:
    import cryosparc

    return str(getattr(cryosparc, "__version__", "0"))


def check_tools_version(version: str | None = None) -> None:
    """Refuse cryosparc-tools other than 5.x with a message that says what to install.

    The tools' major.minor must match the CryoSPARC instance (cryosparc-tools itself warns when they
    differ). 4.x needs a license ID and talks to other ports; this connector is written and tested
    against 5.x only.
    """
    version = version or installed_tools_version()
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = -1
    if major != SUPPORTED_MAJOR:
        raise ServerError(
            f"cryosparc-tools {version} is installed, but the CryoSPARC connector needs cryosparc-tools "
            f"{SUPPORTED_MAJOR}.x (for CryoSPARC v{SUPPORTED_MAJOR}). Install the tools matching your instance's "
            f"version, e.g. `pip install \"cryosparc-tools~=5.0.0\"` for CryoSPARC v5.0. For a CryoSPARC v4 "
            "instance use offline mode instead: `cryofastar-cryosparc --cs PARTICLES.cs --project-dir PROJECT_DIR "
            "--o OUT` and import OUT/particles.cs with an Import Result Group job (see plugin/README.md).")


class CryoSPARCServer:
    """Thin wrapper over a connected ``cryosparc.tools.CryoSPARC`` (5.x); see the module docstring."""

    cryofastar_seam = True  # marks objects that speak this interface (the real seam or a test fake)

    def __init__(self, cs: Any):
        check_tools_version()
        if not hasattr(cs, "api") or not hasattr(cs, "find_job"):
            raise ServerError(f"expected a connected cryosparc.tools.CryoSPARC object, got {type(cs).__name__}; "
                              "create one with `CryoSPARC(base_url=..., email=..., password=...)` (cryosparc-tools 5.x)")
        self._cs = cs
        self._external: dict[tuple[str, str], Any] = {}

    @classmethod
    def connect(cls, creds: Credentials) -> "CryoSPARCServer":
        """Log in the way cryosparc-tools 5.x does. Error messages never hold the password."""
        check_tools_version()
        from cryosparc.tools import CryoSPARC

        kwargs: dict[str, Any] = {"email": creds.email, "password": creds.password}
        if creds.base_url:
            kwargs.update(base_url=creds.base_url, host=None, base_port=None)
        else:
            kwargs.update(base_url=None, host=creds.host or "localhost", base_port=creds.port or 39000)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                cs = CryoSPARC(**kwargs)
        except Exception as exc:  # cryosparc-tools raises TypeError, ValueError or RuntimeError here
            # Chaining is cut (from None) so no traceback can carry the password; the text is redacted.
            raise ServerError(f"could not log in to CryoSPARC at {creds.address()} "
                              f"(email {creds.email or 'not set'}, password from {creds.source}): "
                              f"{redact(str(exc), creds.secrets())}") from None
        return cls(cs)

    # --- reading -------------------------------------------------------------------------------
    def find_job(self, project: str, job: str) -> JobInfo:
        j = self._cs.find_job(project, job)
        return JobInfo(uid=j.uid, type=str(j.type), status=str(j.status), outputs=tuple(j.outputs))

    def load_output(self, project: str, job: str, output: str, slots: str | Sequence[str] = "all"):
        """The output as a ``Dataset`` (all slots, passthrough included, by default)."""
        return self._cs.find_job(project, job).load_output(output, slots=slots)

    def project_dir(self, project: str) -> PurePosixPath:
        """The project folder's path on the CryoSPARC master (it may or may not be mounted here)."""
        return PurePosixPath(str(self._cs.find_project(project).dir))

    def download_file(self, project: str, path: str, target: Path) -> None:
        """Stream the project file ``path`` (relative to the project folder) into the local file ``target``."""
        self._cs.download_file(project, path, target)

    # --- the External job ----------------------------------------------------------------------
    def create_external_job(self, project: str, workspace: str, title: str, desc: str) -> str:
        job = self._cs.create_external_job(project, workspace, title=title, desc=desc)
        self._external[(project, job.uid)] = job
        return job.uid

    def _job(self, project: str, job: str):
        if (project, job) not in self._external:
            self._external[(project, job)] = self._cs.find_external_job(project, job)
        return self._external[(project, job)]

    def connect_input(self, project: str, job: str, input_name: str, source_job: str, source_output: str,
                      slots: Sequence[str]) -> None:
        self._job(project, job).connect(input_name, source_job, source_output, slots=list(slots))

    def start(self, project: str, job: str) -> None:
        self._job(project, job).start("running")

    def add_output(self, project: str, job: str, type: str, name: str, slots: Sequence[Any],
                   passthrough: str | None, title: str, alloc):
        """Declare an output and return the server's empty ``Dataset`` for it (uids from ``alloc``)."""
        return self._job(project, job).add_output(type=type, name=name, slots=list(slots), passthrough=passthrough,
                                                  title=title, alloc=alloc)

    def save_output(self, project: str, job: str, name: str, dataset) -> None:
        self._job(project, job).save_output(name, dataset)

    def upload_mrc(self, project: str, job: str, filename: str, data: np.ndarray, psize: float) -> str:
        """Write ``data`` as an MRC into the job folder; returns its project-relative path (``J50/name``)."""
        self._job(project, job).upload_mrc(filename, data, psize)
        return f"{job}/{filename}"

    def log(self, project: str, job: str, text: str, level: str = "text", name: str | None = None) -> None:
        j = self._job(project, job)
        if name is None:
            j.log(text, level=level)
        else:
            j.log(text, level=level, name=name)

    def log_plot(self, project: str, job: str, image: Path, text: str, raw_data: str | None = None) -> None:
        self._job(project, job).log_plot(str(image), text, formats=["png"], raw_data=raw_data)

    def set_tile_image(self, project: str, job: str, image: Path) -> None:
        """Show the PNG ``image`` on the job's card in the workspace (new in cryosparc-tools 5.0)."""
        self._job(project, job).set_tile_image(str(image))

    def stop(self, project: str, job: str, error: str = "") -> None:
        """Mark the job completed, or failed with ``error`` as the reason."""
        self._job(project, job).stop(error)
