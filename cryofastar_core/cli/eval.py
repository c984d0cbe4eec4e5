"""``cryofastar eval``: pose and map errors against the ground truth (see :mod:`cryofastar_core.evaluation.against_truth`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cryofastar_core.evaluation import against_truth
from cryofastar_core.evaluation.against_truth import evaluate, finite_or_none, format_report
from cryofastar_core.io.atomic_write import atomic_output


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="pose and map errors of a result against the ground truth",
                              description=against_truth.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, type=Path, help="particles with predicted poses (.star or .cs)")
    p.add_argument("--truth", required=True, type=Path, help="the same particles with true poses (.star or .cs)")
    p.add_argument("--map", type=Path, help="map reconstructed from the predicted poses (.mrc)")
    p.add_argument("--truth-map", type=Path, help="ground-truth map (.mrc), same box")
    p.add_argument("--no-mirror", action="store_true", help="do not try the other hand")
    p.add_argument("--project-dir", type=Path, help="folder that relative image paths are relative to")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    result = evaluate(args.pred, args.truth, args.map, args.truth_map, allow_mirror=not args.no_mirror,
                      project_dir=args.project_dir)
    print(format_report(result))
    if args.json is not None:
        with atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps(finite_or_none(result), indent=2))
    return 0
