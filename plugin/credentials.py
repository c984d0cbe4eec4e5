"""CryoSPARC login details, and keeping the secret parts out of every log, message and file.

Where they come from, first match per item wins: explicit arguments (``--url``, ``--host``/``--port``,
``--email``), then a private credentials file (``--credentials FILE``, JSON with ``email`` and
``password``, optionally ``base_url`` or ``host``/``base_port``), then the environment variables
cryosparc-tools 5.x reads itself (``CRYOSPARC_BASE_URL``, ``CRYOSPARC_MASTER_HOSTNAME`` +
``CRYOSPARC_BASE_PORT``, ``CRYOSPARC_EMAIL``, ``CRYOSPARC_PASSWORD``). Without a password,
cryosparc-tools falls back to a saved login from ``python -m cryosparc.tools login``.

There is deliberately no ``--password`` option: a command line is visible to every user of the
machine (``ps``) and lands in shell histories.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from cryofastar_core.runtime.errors import InputError

REDACTED = "<redacted>"


@dataclass(frozen=True)
class Credentials:
    """Where the CryoSPARC instance is and who logs in. ``repr`` never shows the password."""

    base_url: str | None = None
    host: str | None = None
    port: int | None = None
    email: str | None = None
    password: str | None = field(default=None, repr=False)
    source: str = "environment"  # where the password came from, for messages (never the password)

    def secrets(self) -> list[str]:
        """Every string that must never appear in output: the password and the hash sent to the server."""
        if not self.password:
            return []
        return [self.password, hashlib.sha256(self.password.encode()).hexdigest()]

    def address(self) -> str:
        return self.base_url or f"http://{self.host or 'localhost'}:{self.port or 39000}"


def read_credentials_file(path: str | Path) -> dict:
    """The JSON object in a private credentials file; refuses a file other users can read or write."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise InputError(path, None, f"credentials file cannot be opened ({exc.strerror})",
                         "check the path given to --credentials") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(path, None, "credentials file is not a regular file", "give a JSON file with email and password")
    if st.st_mode & 0o077:
        raise InputError(path, None, f"credentials file is accessible by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                         "it was not read", f"make it private: chmod 600 {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        # The decoder's message quotes no content, but say only where it failed to be safe.
        raise InputError(path, None, f"not valid JSON (line {exc.lineno}, column {exc.colno})",
                         'write {"email": "...", "password": "..."}') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, None, f"credentials file cannot be read ({type(exc).__name__})",
                         "check the file") from None
    if not isinstance(data, dict):
        raise InputError(path, None, "credentials file does not hold a JSON object", 'write {"email": "...", "password": "..."}')
    unknown = sorted(set(data) - {"email", "password", "base_url", "host", "base_port"})
    if unknown:
        raise InputError(path, ", ".join(unknown), "unknown key(s) in the credentials file",
                         "use only email, password, base_url, host and base_port")
    return data


def load_credentials(*, base_url: str | None = None, host: str | None = None, port: int | str | None = None,
                     email: str | None = None, credentials_file: str | Path | None = None,
                     env: Mapping[str, str] | None = None) -> Credentials:
    """Collect login details (see the module docstring for the order). Raises :class:`InputError` when
    no instance address is known or the address is given twice."""
    env = os.environ if env is None else env
    file = read_credentials_file(credentials_file) if credentials_file is not None else {}

    def pick(*values):
        return next((v for v in values if v not in (None, "")), None)

    explicit_address = base_url or host or port
    if explicit_address:
        url, h, p = base_url, host, port
    elif file.get("base_url") or file.get("host") or file.get("base_port"):
        url, h, p = file.get("base_url"), file.get("host"), file.get("base_port")
    else:
        url, h, p = env.get("CRYOSPARC_BASE_URL"), env.get("CRYOSPARC_MASTER_HOSTNAME"), env.get("CRYOSPARC_BASE_PORT")
    url, h, p = pick(url), pick(h), pick(p)
    if url and (h or p):
        raise InputError(None, "--url / --host", "both a base URL and a host/port are given",
                         "give either the web URL (e.g. http://host:39000) or host and port, not both")
    if not (url or h or p):
        raise InputError(None, "CRYOSPARC_BASE_URL", "no CryoSPARC instance address",
                         "pass --url http://HOST:39000 (the address of the web interface) or set CRYOSPARC_BASE_URL, "
                         "or CRYOSPARC_MASTER_HOSTNAME and CRYOSPARC_BASE_PORT")
    if p is not None:
        try:
            p = int(p)
        except (TypeError, ValueError):
            raise InputError(None, "--port", f"'{p}' is not a port number", "give the base port, e.g. 39000") from None
    password = pick(file.get("password"), env.get("CRYOSPARC_PASSWORD"))
    source = ("credentials file" if file.get("password") else "environment") if password else "saved login"
    return Credentials(base_url=url, host=h, port=p, email=pick(email, file.get("email"), env.get("CRYOSPARC_EMAIL")),
                       password=password, source=source)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``<redacted>``."""
    for s in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(s, REDACTED)
    return text


class SecretFilter(logging.Filter):
    """A logging filter that redacts secrets from every record that passes through a handler."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            clean = redact(message, self.secrets)
            if clean != message:
                record.msg, record.args = clean, None
            if record.exc_info and record.exc_info[1] is not None:
                import traceback
                record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"),
                                         self.secrets)
                record.exc_info = None
        return True


def install_secret_filter(secrets: Iterable[str], logger: logging.Logger | None = None) -> SecretFilter:
    """Attach a :class:`SecretFilter` to every handler of ``logger`` (default: the root logger)."""
    flt = SecretFilter(secrets)
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(flt)
    return flt


def remove_secret_filter(flt: SecretFilter, logger: logging.Logger | None = None) -> None:
    for handler in (logger or logging.getLogger()).handlers:
        handler.removeFilter(flt)
