"""``cryofastar train``: train a model from a curriculum YAML (cryofastar_core/configs/*.yaml).

    cryofastar train --config cryofastar_core/configs/lines-box64-cpu.yaml --o runs/lines64 [--resume]
    cryofastar train --config cryofastar_core/configs/lines-box64-cpu.yaml --o runs/next \
        --init-weights cryofastar_core/weights/default.pt --from-stage R3-ctf
    torchrun --nproc_per_node 8 -m cryofastar_core.cli.train --config C.yaml --o runs/NAME

Under torchrun each process reads its rank from the environment (RANK, WORLD_SIZE, LOCAL_RANK);
only rank 0 writes into the run folder.
"""
from __future__ import annotations

import argparse
import logging
import sys

from cryofastar_core.runtime.errors import CryoFastARError, InputError
from cryofastar_core.runtime.exit_codes import exit_code


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training YAML (stages, model, loss, optimiser)")
    p.add_argument("--o", dest="out", required=True, help="run folder (created; holds checkpoint, metrics, weights)")
    p.add_argument("--resume", action="store_true", help="continue the run in --o from its last checkpoint")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: CUDA when available")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this global step (the schedule is unchanged, so --resume continues exactly); "
                        "with --resume and the checkpoint's step: only export weights.pt")
    p.add_argument("--init-weights", default=None,
                   help="start from this weights file (e.g. the shipped default.pt) instead of a fresh model")
    p.add_argument("--from-stage", default=None,
                   help="skip the config's stages before this one (continue a curriculum from committed weights)")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a CryoFastAR model on simulated data",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cryofastar_core.runtime.distributed import dist_env
    from cryofastar_core.training.config import continue_from, load_train_config
    from cryofastar_core.training.trainer import train

    if args.max_steps is not None and args.max_steps < 0:
        raise InputError(None, "--max-steps", "must be >= 0", "pass a non-negative step count")
    cfg = continue_from(load_train_config(args.config), args.from_stage, args.init_weights, args.config)
    dist = dist_env()
    if dist.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    result = train(cfg, args.out, resume=args.resume, device=args.device, max_steps=args.max_steps, dist=dist)
    if dist.rank == 0:
        logging.getLogger(__name__).info("done: step %d of %d, weights %s", result.steps_done, result.total_steps,
                                         result.weights_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m cryofastar_core.cli.train``, e.g. under torchrun)."""
    parser = argparse.ArgumentParser(prog="cryofastar train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return run(args)
    except CryoFastARError as exc:
        print(f"cryofastar train: error: {exc}", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
