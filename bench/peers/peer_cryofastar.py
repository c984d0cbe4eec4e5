"""Our method: ``cryofastar run`` feed-forward (``refine_iters=0``) or refined (``--refine-iters K``)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.peers.common import MethodRun, Poses, run_stages, thread_env

NAME = "cryofastar"


def check() -> str | None:
    return None  # the package itself: always available


def tiny_untrained_weights(path: Path, box: int) -> Path:
    """Untrained XS weights for smoke tests, until ``weights/default.pt`` ships (their poses are random)."""
    from cryofastar_core.model import CryoFastAR, model_config, save_weights

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(CryoFastAR(model_config("XS", box, enc_dim=32, enc_depth=1, enc_heads=2, dec_dim=32, dec_depth=1,
                                             dec_heads=2, neck_dim=16)), path)
    return path


def resolve_weights(weights: str, work_root: Path, box: int) -> tuple[str, str]:
    """``(weights argument, note)``: ``default`` falls back to tiny untrained weights when none ship yet."""
    if weights != "default":
        return weights, ""
    from cryofastar_core import weights as shipped

    default = Path(shipped.__file__).parent / "default.pt"
    if default.is_file():
        return "default", ""
    tiny = tiny_untrained_weights(work_root / f"untrained_xs_b{box}.pt", box)
    return str(tiny), "UNTRAINED tiny weights (no shipped default.pt yet): accuracy meaningless"


def run(dataset_dir: Path, work_dir: Path, threads: int, timeout: float, *, weights: str, refine_iters: int = 0,
        views: int = 128, candidates: int = 64, box: int = 64) -> MethodRun:
    from cryofastar_core.evaluation.against_truth import match_particles
    from cryofastar_core.io import read_particles

    work_dir.mkdir(parents=True, exist_ok=True)
    w, note = resolve_weights(weights, work_dir.parent.parent, box)
    out = work_dir / "job"
    cmd = [sys.executable, "-m", "cryofastar_core.cli.main", "run", "--particles", dataset_dir / "particles.star",
           "--o", out, "--weights", w, "--views", views, "--candidates", candidates, "--refine-iters", refine_iters,
           "--threads", threads, "--project-dir", dataset_dir, "--device", "cpu"]
    run = MethodRun(settings={"weights": w, "views": views, "candidates": candidates, "refine_iters": refine_iters,
                              "note": note})
    repo = Path(__file__).resolve().parents[2]
    pythonpath = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)
    env = thread_env(threads, {"PYTHONPATH": pythonpath})  # the package is not pip-installed in a checkout
    if not run_stages(run, [(cmd, work_dir)], timeout, env, work_dir / "log.txt"):
        return run
    pred = read_particles(out / "particles.star", dataset_dir)
    truth = read_particles(dataset_dir / "particles.star", dataset_dir)
    ip, it = match_particles(pred, truth)
    run.poses = Poses(indices=it, rotations=pred.rotations[ip], shifts=None if pred.shifts is None else pred.shifts[ip])
    report = out / "report.json"
    if report.is_file():
        import json

        run.settings["report_timings_s"] = json.loads(report.read_text()).get("timings_s")
    return run
