"""``cryofastar`` entry point: one subcommand per module in this package.

Each subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. Errors meant for users (``CryoFastARError``) become one message on
stderr and a non-zero exit code, never a traceback; the codes and SIGTERM handling are
:mod:`cryofastar_core.runtime.exit_codes`'s.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cryofastar_core import __version__
from cryofastar_core.runtime.errors import CryoFastARError
from cryofastar_core.runtime.exit_codes import Terminated, exit_code, sigterm_raises

# Order is the order shown in --help. A module listed here must exist.
SUBCOMMANDS = ["demo", "run", "simulate", "reconstruct", "train", "train_lines", "eval"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cryofastar", description="Feed-forward cryo-EM ab initio reconstruction.")
    parser.add_argument("--version", action="version", version=f"cryofastar {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"cryofastar_core.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    # SIGTERM (a queue system ending the job) unwinds like Ctrl-C, so temporary outputs are removed.
    # Any other exception is a bug: its traceback is printed and Python exits with 1.
    with sigterm_raises():
        try:
            return int(args.func(args) or 0)
        except CryoFastARError as exc:
            from cryofastar_core.cli.job_flags import CLI_NAMES

            exc = exc.renamed(CLI_NAMES)
            print(f"cryofastar {args.command}: error: {exc}", file=sys.stderr)
            return exit_code(exc)
        except Terminated as exc:
            print(f"cryofastar {args.command}: terminated (SIGTERM); rerun with the same --o to resume",
                  file=sys.stderr)
            return exit_code(exc)
        except KeyboardInterrupt as exc:
            print(f"cryofastar {args.command}: interrupted; rerun with the same --o to resume", file=sys.stderr)
            return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
