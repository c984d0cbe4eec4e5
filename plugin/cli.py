"""``cryofastar-cryosparc``: CryoFastAR poses for CryoSPARC particles, with or without a server.

Server mode (cryosparc-tools 5.x; creates an External job in the workspace)::

    export CRYOSPARC_BASE_URL=http://cryosparc.example.org:39000 CRYOSPARC_EMAIL=me@example.org
    export CRYOSPARC_PASSWORD=...        # or --credentials FILE (mode 600), or `python -m cryosparc.tools login`
    cryofastar-cryosparc --project P3 --workspace W1 --particles J42.particles --device cuda

Offline mode (no server; blob/path resolves against --project-dir)::

    cryofastar-cryosparc --cs J42/J42_particles.cs --project-dir /data/P3 --o out/

Errors are one message on stderr with a non-zero exit code; passwords are never printed.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import Callable

from cryofastar_core.runtime.errors import CryoFastARError, InputError
from cryofastar_core.runtime.exit_codes import Terminated, exit_code, sigterm_raises
from plugin.connector import IMAGES, ConnectorConfig, default_out_dir, job_option_names, run_connector
from plugin.credentials import Credentials, install_secret_filter, load_credentials, redact, remove_secret_filter
from plugin.offline import run_offline

PROG = "cryofastar-cryosparc"


def build_parser() -> argparse.ArgumentParser:
    from cryofastar_core.cli.job_flags import add_job_arguments

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    src = p.add_argument_group("input (server mode)")
    src.add_argument("--project", help="CryoSPARC project uid, e.g. P3")
    src.add_argument("--workspace", help="workspace uid for the new External job, e.g. W1")
    src.add_argument("--particles", help="source job and output, e.g. J42.particles")
    src.add_argument("--class-averages-from", dest="class_averages_from", default=None, metavar="JOB.OUTPUT",
                     help="the class averages of the 2D classification the particles carry, e.g. J41.class_averages "
                          "(with --particles J41.particles): pose the averages, compose each particle's pose")
    src.add_argument("--title", default="CryoFastAR poses", help="title of the External job")
    src.add_argument("--images", choices=IMAGES, default="auto",
                     help="read images from the mounted project folder, stream them through the API, or auto "
                          "(mounted when every stack is readable here; default)")
    src.add_argument("--keep-streamed", action="store_true", help="keep streamed image stacks in OUT/cryosparc_input")
    off = p.add_argument_group("input (offline mode)")
    off.add_argument("--cs", type=Path, help="particle .cs file (no server is contacted)")
    p.add_argument("--project-dir", type=Path, default=None,
                   help="the CryoSPARC project folder on this machine (blob/path is relative to it); in server mode "
                        "only needed when it is mounted elsewhere than on the CryoSPARC master")
    p.add_argument("--o", dest="out_dir", type=Path, default=None,
                   help="local output folder (offline: required; server: default cryofastar_<P>_<J>_<output>)")
    con = p.add_argument_group("connection (server mode; defaults from CRYOSPARC_* environment variables)")
    con.add_argument("--url", help="CryoSPARC web address, e.g. http://host:39000 (CRYOSPARC_BASE_URL)")
    con.add_argument("--host", help="master host name (CRYOSPARC_MASTER_HOSTNAME); with --port, instead of --url")
    con.add_argument("--port", help="base port (CRYOSPARC_BASE_PORT)")
    con.add_argument("--email", help="login email (CRYOSPARC_EMAIL)")
    con.add_argument("--credentials", type=Path, default=None,
                     help='private JSON file (chmod 600) {"email": ..., "password": ...}; the password otherwise comes '
                          "from CRYOSPARC_PASSWORD or a saved `python -m cryosparc.tools login`")
    job = p.add_argument_group("job options (see `cryofastar run --help`)")
    add_job_arguments(job)
    return p


def _job_options(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in job_option_names() if hasattr(args, name)}


def main(argv: list[str] | None = None, *, connect: Callable[[Credentials], object] | None = None) -> int:
    """Entry point. ``connect(credentials) -> server`` defaults to :meth:`CryoSPARCServer.connect`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    secrets: list[str] = []
    flt = None
    # SIGTERM unwinds like Ctrl-C, so the External job is marked failed and temporary files go.
    with sigterm_raises():
        try:
            if args.cs is not None:
                return _offline(args)
            creds = _credentials(args)
            secrets = creds.secrets()
            flt = install_secret_filter(secrets)
            return _server(args, creds, connect)
        except CryoFastARError as exc:
            from cryofastar_core.cli.job_flags import CLI_NAMES

            exc = exc.renamed(CLI_NAMES)
            print(f"{PROG}: error: {redact(str(exc), secrets)}", file=sys.stderr)
            return exit_code(exc)
        except (KeyboardInterrupt, Terminated) as exc:
            print(f"{PROG}: {'terminated (SIGTERM)' if isinstance(exc, Terminated) else 'interrupted'}; rerun with "
                  "the same --o to resume after the pose stage", file=sys.stderr)
            return exit_code(exc)
        except Exception as exc:
            if args.verbose:
                print(redact(traceback.format_exc(), secrets), file=sys.stderr)
            print(f"{PROG}: error: {type(exc).__name__}: {redact(str(exc), secrets)}", file=sys.stderr)
            return exit_code(exc)
        finally:
            if flt is not None:
                remove_secret_filter(flt)


def _offline(args: argparse.Namespace) -> int:
    server_only = [f"--{n.replace('_', '-')}" for n in ("project", "workspace", "particles", "class_averages_from", "url",
                                                        "host", "email", "credentials") if getattr(args, n) is not None]
    if server_only:
        raise InputError(None, ", ".join(server_only), "server options given together with --cs (offline mode)",
                         "use either --cs FILE --o OUT (offline) or --project/--workspace/--particles (server)")
    if args.out_dir is None:
        raise InputError(None, "--o", "no output folder", "pass --o OUT")
    from cryofastar_core.cli.progress import terminal_progress

    report = run_offline(args.cs, args.out_dir, args.project_dir, progress=terminal_progress(), **_job_options(args))
    print(f"{report.n_kept} of {report.n_particles} particles kept; {report.resolution_text}; "
          f"{args.out_dir}/particles.cs (alignments3D), particles.star, map.mrc")
    print(*report.verdict_lines, sep="\n")
    return 0


def _credentials(args: argparse.Namespace) -> Credentials:
    missing = [f"--{n}" for n in ("project", "workspace", "particles") if not getattr(args, n)]
    if missing:
        raise InputError(None, ", ".join(missing), "missing",
                         "server mode needs --project P --workspace W --particles JOB.OUTPUT "
                         "(or use --cs FILE for offline mode)")
    return load_credentials(base_url=args.url, host=args.host, port=args.port, email=args.email,
                            credentials_file=args.credentials)


def _server(args: argparse.Namespace, creds: Credentials, connect) -> int:
    if connect is None:
        from plugin.server import CryoSPARCServer
        connect = CryoSPARCServer.connect
    cfg = ConnectorConfig(project=args.project, workspace=args.workspace, particles=args.particles,
                          out_dir=args.out_dir or default_out_dir(args.project, args.particles),
                          options=_job_options(args), title=args.title, project_dir=args.project_dir,
                          images=args.images, keep_streamed=args.keep_streamed, secrets=tuple(creds.secrets()),
                          class_averages=args.class_averages_from)
    cfg.validate()
    server = connect(creds)
    result = run_connector(server, cfg)
    print(f"External job {args.project} {result.external_job}: {result.n_particles_saved} particles with "
          f"alignments3D, map and half maps; {result.report.resolution_text} "
          f"(images {result.image_source}); local outputs in {result.out_dir}")
    print(*result.report.verdict_lines, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
