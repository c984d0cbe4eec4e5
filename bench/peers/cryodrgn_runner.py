"""Run one cryoDRGN 4.3.1 command by its module (``parse_ctf_star`` or ``abinit_homo_old``).

The ``cryodrgn`` console script imports every command module, and ``abinit``'s analysis imports
Jupyter packages (``nbformat``) that a ``--no-deps`` install leaves out; calling the command
module directly needs only cryoDRGN's light dependencies.

    python bench/peers/cryodrgn_runner.py abinit_homo_old particles.star --ctf ctf.pkl -o out ...
"""
import argparse
import importlib
import sys

COMMANDS = ("parse_ctf_star", "abinit_homo_old")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: cryodrgn_runner.py {{{','.join(COMMANDS)}}} ARGS...")
    mod = importlib.import_module(f"cryodrgn.commands.{sys.argv[1]}")
    parser = argparse.ArgumentParser(prog=f"cryodrgn {sys.argv[1]}")
    mod.add_args(parser)
    mod.main(parser.parse_args(sys.argv[2:]))
