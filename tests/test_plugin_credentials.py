"""CryoSPARC connector: login details, private credentials files, redaction, and the tools-version gate.

The last test logs in through the real cryosparc-tools client against a closed local port, so the
error path of the real seam is exercised without a server.
"""
from __future__ import annotations

import hashlib
import json
import logging
import socket

import pytest

import cryosparc
from cryofastar_core.runtime.errors import InputError
from plugin import cli, run_in_cryosparc
from plugin.credentials import Credentials, SecretFilter, load_credentials, read_credentials_file, redact
from plugin.server import CryoSPARCServer, ServerError, check_tools_version

SECRET = "c0rrect-h0rse-battery-staple"
SERVER_ARGS = ["--project", "P3", "--workspace", "W1", "--particles", "J42.particles"]


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("CRYOSPARC_BASE_URL", "CRYOSPARC_MASTER_HOSTNAME", "CRYOSPARC_BASE_PORT", "CRYOSPARC_EMAIL",
                "CRYOSPARC_PASSWORD"):
        monkeypatch.delenv(var, raising=False)


def _creds_file(path, mode, **content):
    path.write_text(json.dumps(content))
    path.chmod(mode)
    return path


def test_credentials_file_readable_by_others_is_refused(tmp_path, clean_env, capsys):
    f = _creds_file(tmp_path / "creds.json", 0o644, email="a@b.org", password=SECRET, base_url="http://h:39000")
    called = []
    rc = cli.main([*SERVER_ARGS, "--credentials", str(f), "--o", str(tmp_path / "o")], connect=called.append)
    err = capsys.readouterr().err
    assert rc == 2 and not called
    assert "chmod 600" in err and "0644" in err and SECRET not in err
    f.chmod(0o640)
    with pytest.raises(InputError, match="other users"):
        read_credentials_file(f)


def test_private_credentials_file_is_used(tmp_path, clean_env, monkeypatch, capsys):
    monkeypatch.setenv("CRYOSPARC_PASSWORD", "from-the-environment")
    f = _creds_file(tmp_path / "creds.json", 0o600, email="a@b.org", password=SECRET, base_url="http://h:39000")
    seen = []

    def connect(creds):
        seen.append(creds)
        raise ServerError("stop here")

    rc = cli.main([*SERVER_ARGS, "--credentials", str(f), "--o", str(tmp_path / "o")], connect=connect)
    assert rc == ServerError.exit_code
    creds = seen[0]
    assert (creds.base_url, creds.email, creds.password, creds.source) == ("http://h:39000", "a@b.org", SECRET,
                                                                         "credentials file")
    assert SECRET not in repr(creds) and SECRET not in str(creds)
    assert SECRET not in capsys.readouterr().err


def test_bad_json_error_does_not_quote_the_file(tmp_path):
    f = tmp_path / "creds.json"
    f.write_text('{"email": "a@b.org", "password": "' + SECRET + '",,}')
    f.chmod(0o600)
    with pytest.raises(InputError) as exc:
        read_credentials_file(f)
    assert "not valid JSON" in str(exc.value) and SECRET not in str(exc.value)


def test_address_and_login_come_from_arguments_then_environment():
    env = {"CRYOSPARC_BASE_URL": "http://env:39000", "CRYOSPARC_EMAIL": "env@x.org", "CRYOSPARC_PASSWORD": SECRET}
    c = load_credentials(env=env)
    assert (c.base_url, c.email, c.password, c.source) == ("http://env:39000", "env@x.org", SECRET, "environment")
    c = load_credentials(host="master", port="39100", email="me@x.org", env=env)
    assert (c.base_url, c.host, c.port, c.email) == (None, "master", 39100, "me@x.org")
    assert c.address() == "http://master:39100"
    c = load_credentials(env={"CRYOSPARC_MASTER_HOSTNAME": "m", "CRYOSPARC_BASE_PORT": "39000"})
    assert (c.host, c.port, c.password, c.source) == ("m", 39000, None, "saved login")
    with pytest.raises(InputError, match="no CryoSPARC instance address"):
        load_credentials(env={})
    with pytest.raises(InputError, match="both a base URL"):
        load_credentials(base_url="http://a:1", host="b", env={})
    with pytest.raises(InputError, match="not a port"):
        load_credentials(host="b", port="http", env={})


def test_secret_filter_redacts_messages_and_tracebacks():
    secrets = Credentials(password=SECRET).secrets()
    assert secrets == [SECRET, hashlib.sha256(SECRET.encode()).hexdigest()]
    assert redact(f"x {SECRET} y {secrets[1]}", secrets) == "x <redacted> y <redacted>"
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    logger = logging.getLogger("test_plugin_credentials.secret")
    logger.propagate = False
    handler = Keep()
    handler.addFilter(SecretFilter(secrets))
    logger.addHandler(handler)
    try:
        logger.warning("login %s failed", SECRET)
        try:
            raise RuntimeError(f"token {secrets[1]}")
        except RuntimeError:
            logger.exception("oops")
    finally:
        logger.removeHandler(handler)
    assert len(records) == 2 and "<redacted>" in records[0] and "RuntimeError: token <redacted>" in records[1]
    assert all(s not in r for s in secrets for r in records)


def test_tools_other_than_5x_are_refused_with_what_to_install(monkeypatch):
    check_tools_version("5.0.3")
    with pytest.raises(ServerError) as exc:
        check_tools_version("4.7.1")
    message = str(exc.value)
    assert "cryosparc-tools 4.7.1" in message and "pip install" in message and "--cs" in message
    monkeypatch.setattr(cryosparc, "__version__", "4.6.0")
    with pytest.raises(ServerError, match="4.6.0"):
        CryoSPARCServer(object())
    with pytest.raises(ServerError, match="4.6.0"):
        CryoSPARCServer.connect(Credentials(base_url="http://localhost:1", password=SECRET))


def test_notebook_entry_wants_a_connected_client():
    with pytest.raises(ServerError, match="connected cryosparc.tools.CryoSPARC"):
        run_in_cryosparc(object(), "P3", "W1", "J42.particles")


@pytest.mark.filterwarnings("ignore:.*API client:UserWarning")
def test_real_client_login_failure_is_one_redacted_message(tmp_path, clean_env, monkeypatch, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("CRYOSPARC_PASSWORD", SECRET)
    rc = cli.main([*SERVER_ARGS, "--url", f"http://127.0.0.1:{port}", "--email", "a@b.org",
                   "--o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == ServerError.exit_code
    assert f"could not log in to CryoSPARC at http://127.0.0.1:{port}" in err and "environment" in err
    assert SECRET not in err and hashlib.sha256(SECRET.encode()).hexdigest() not in err
    assert not (tmp_path / "o").exists()


def test_the_seam_calls_cryosparc_tools_5_as_it_is_declared():
    """Every cryosparc-tools call in plugin/server.py, bound against the installed 5.x signatures (API drift)."""
    import inspect

    import numpy as np
    from cryosparc.controllers.job import ExternalJobController, JobController
    from cryosparc.controllers.project import ProjectController
    from cryosparc.tools import CryoSPARC

    def bind(fn, *args, **kwargs):
        inspect.signature(fn).bind(None, *args, **kwargs)

    bind(CryoSPARC.__init__, base_url="http://h:39000", host=None, base_port=None, email="e", password="p")
    bind(CryoSPARC.find_job, "P3", "J42")
    bind(CryoSPARC.find_project, "P3")
    bind(CryoSPARC.find_external_job, "P3", "J50")
    bind(CryoSPARC.download_file, "P3", "J1/x.mrcs", "/tmp/x")
    bind(CryoSPARC.create_external_job, "P3", "W1", title="t", desc="d")
    bind(JobController.load_output, "particles", slots="all")
    bind(ExternalJobController.connect, "input_particles", "J42", "particles", slots=["blob", "?ctf"])
    bind(ExternalJobController.start, "running")
    bind(ExternalJobController.add_output, type="particle", name="particles", slots=["alignments3D"],
         passthrough="input_particles", title="t", alloc=1)
    bind(ExternalJobController.save_output, "particles", None)
    bind(ExternalJobController.upload_mrc, "map.mrc", np.zeros((2, 2, 2)), 1.0)
    bind(ExternalJobController.log, "text", level="text")
    bind(ExternalJobController.log, "text", level="text", name="progress")
    bind(ExternalJobController.log_plot, "fsc.png", "FSC", formats=["png"], raw_data="x")
    bind(ExternalJobController.set_tile_image, "tile.png")
    bind(ExternalJobController.stop, "error")
    for attr in ("type", "status", "outputs"):  # properties; uid is set in __init__
        assert isinstance(getattr(JobController, attr), property), attr
    assert isinstance(ProjectController.dir, property)  # a method in 4.x
