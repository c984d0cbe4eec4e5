"""``cryofastar train-lines``: train the common-lines encoder (:mod:`cryofastar_core.commonlines.learned`).

    OMP_NUM_THREADS=1 cryofastar train-lines --o runs/line-encoder [--steps 20000] [--depth 0] [--resume]

The run folder holds ``checkpoint.pt`` (every 100 steps), ``line_encoder.pt`` (fp16, the file
``--weights`` takes) and ``metrics.jsonl`` (detection accuracy on heldout draws; step 0 is the untrained
encoder, i.e. classical common lines). Compare on the model ladder with
``bench/model_accuracy.py --weights RUN/line_encoder.pt --baseline common-lines``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from cryofastar_core.runtime.errors import InputError
from cryofastar_core.training.line_encoder import LineTrainConfig, train_line_encoder


def register(subparsers) -> None:
    p = subparsers.add_parser("train-lines", help="train the learned common-lines encoder on simulated data",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--o", dest="out", required=True, help="run folder (created)")
    p.add_argument("--steps", type=int, default=LineTrainConfig.steps, help="total steps of the schedule")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this step (the schedule is --steps's, so --resume continues exactly)")
    p.add_argument("--depth", type=int, default=LineTrainConfig.depth,
                   help="3x3 convolutions of the image CNN (0: none, the learned line metric alone)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: training shares the machine)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise InputError(None, "--steps", f"must be at least 1, got {args.steps}", "use e.g. --steps 4000")
    if args.depth == 1 or args.depth < 0:
        raise InputError(None, "--depth", f"must be 0 (no image CNN) or at least 2, got {args.depth}",
                         "use --depth 0 or e.g. --depth 4")
    torch.set_num_threads(args.threads)
    logging.getLogger("cryofastar_core").setLevel(logging.INFO)
    train_line_encoder(LineTrainConfig(steps=args.steps, depth=args.depth), Path(args.out), resume=args.resume, max_steps=args.max_steps)
    return 0
