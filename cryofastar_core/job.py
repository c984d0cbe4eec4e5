"""The main job: from a particle stack to poses and a map, as one library call.

``run(JobConfig) -> Report`` is what ``cryofastar run``, the RELION External adapter and the CryoSPARC
connector all call. It is a sequence of stages, one function each, each timed under its name in
``report.json``: read and validate the particles (``read``); load the weights (``load_weights``); estimate
poses feed-forward (reference selection, anchors, chunks, hand check) or resume them (``poses``);
optionally drop the least confident particles (``select``); optionally refine locally (``refine``);
reconstruct half maps with CTF correction (``reconstruct``; reused from refinement when it ran); judge the
poses (``quality``); write every output (``write``). Progress goes to the caller's ``progress`` callback
only (:mod:`cryofastar_core.runtime.progress`).

Outputs are written into a hidden staging folder inside ``out_dir`` and moved into place together at
the end, ``report.json`` last, so a killed run leaves nothing that looks finished. The pose estimate
is also kept in ``out_dir/.cryofastar/`` with a fingerprint of the inputs and settings, so a rerun on
the same ``out_dir`` resumes after inference, and a rerun on complete output does nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cryofastar_core import __version__
from cryofastar_core.runtime.errors import InputError
from cryofastar_core.runtime.communicator import Communicator, dist_env, rank_device
from cryofastar_core.inference.estimator import EstimatorConfig, estimate_poses
from cryofastar_core.inference.preprocess import model_px_to_input_px, to_model_input
from cryofastar_core.io import CONFIDENCE_LABEL, ParticleSet, read_particles, write_map, write_particles_cs, write_particles_star
from cryofastar_core.io.atomic_write import atomic_output, staged_output_dir
from cryofastar_core.job_options import JobOption, option, options_of
from cryofastar_core.model import load_weights
from cryofastar_core.model.checkpoint import read_weights_file
from cryofastar_core.runtime.progress import Progress
from cryofastar_core.evaluation.verdict import PoseQuality, assess_poses
from cryofastar_core.reconstruct import (Backprojector, ParticleChunk, fsc, fsc_tsv, half_sets, insert_half_sets,
                                         resolution_at)
from cryofastar_core.weights import resolve_weights

log = logging.getLogger(__name__)

STATE_DIR = ".cryofastar"
REPORT = "report.json"


@dataclass
class JobConfig:
    """Every setting of one run; validated by :meth:`validate` before any work."""

    # The fields declared with option() are the user options: the one declaration every front end
    # derives its flags, GUI parameters, job options and step-file keys from (cryofastar_core.job_options;
    # the list is JOB_OPTIONS below). Help is one line of plain text for a facility user; the default is
    # appended where it is shown. particles, out_dir and project_dir are set by each front end its own way.
    particles: Path
    out_dir: Path
    weights: str = option("default", "shipped weights name or a weights file")
    project_dir: Path | None = None
    box: int | None = option(None, "model box; must match the weights", default_text="the weights' box")
    views: int = option(128, "images per forward pass: reference + anchors + new particles", minimum=4,
                        fix="use at least 4 views per pass (128 recommended)")
    candidates: int = option(64, "particles tried as the reference, the best kept", minimum=1, fix="use e.g. 64")
    anchors: int = option(8, "particles repeated in every pass to tie the passes together", minimum=1,
                          fix="use 1 to views - 2 anchors")  # and at most views - 2: validate()
    chunks_per_batch: int = option(4, "passes run together; more is faster and uses more memory", minimum=1,
                                   fix="use e.g. 4")
    weighting: str = option("confidence", "how each view's pose is fitted to the network's output: confidence "
                            "(each pixel weighted by its confidence) or uniform", choices=("confidence", "uniform"))
    # On by default: the feed-forward poses alone are tens of degrees off, refined they reach 5 deg at
    # SNR 1 (bench/README.md, "Refinement from wherever the model lands").
    refine_iters: int = option(3, "refinement iterations after the feed-forward poses and the global passes "
                               "(0: feed-forward poses only)", minimum=0,
                               fix="use 0 (off) or a small number such as 3")
    refine_global: bool = option(True, "when refining, first assign every particle globally (15 deg grid) against "
                                 "the feed-forward map, so poses tens of degrees off can still be refined")
    keep_fraction: float | None = option(None, "keep only this fraction of the most confident particles, e.g. 0.8",
                                         default_text="keep all", minimum=0, maximum=1, open_min=True,
                                         fix="use e.g. 0.8 to keep 80 %")
    min_confidence: float | None = option(None, "drop particles whose confidence (0-1, the STAR column "
                                          "rlnMaxValueProbDistribution) is below this", default_text="keep all",
                                          minimum=0, maximum=1, open_max=True,
                                          fix="confidences are on a 0-1 scale: use e.g. 0.5")
    device: str = option("auto", "auto (a GPU if present), cpu, cuda, or cuda:N for GPU number N",
                         choices=("auto", "cpu", "cuda", "cuda:N"))
    seed: int = option(0, "random seed for the reference candidates and the passes")
    threads: int | None = option(None, "CPU threads", default_text="what torch chooses", minimum=1,
                                 fix="use the number of cores to use")
    read_chunk: int = option(512, "particles read from disk at a time while reconstructing; fewer use less memory",
                             minimum=1, fix="use e.g. 512")

    def validate(self) -> None:
        """Raises InputError naming the JobConfig field; adapters translate it (``InputError.renamed``).

        The declared bounds and choices of every option (:data:`JOB_OPTIONS`), then what depends on
        another option or on this machine."""
        for opt in JOB_OPTIONS:
            wrong = opt.problem(getattr(self, opt.name))
            if wrong is not None:
                raise InputError(None, opt.name, *wrong)
        if not self.anchors <= self.views - 2:
            raise InputError(None, "anchors", f"{self.anchors} does not fit in {self.views} views",
                             "use 1 to views - 2 anchors")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(None, "device", "CUDA was asked for but no GPU is visible", "use auto or cpu")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


# The job's user options, in declaration order (cryofastar_core.job_options).
JOB_OPTIONS: tuple[JobOption, ...] = options_of(JobConfig)


@dataclass
class Report:
    """What a run did; written as ``report.json``."""

    version: str
    settings: dict
    weights: dict
    n_particles: int
    n_kept: int
    reference: int
    flipped_chunks: int
    n_chunks: int
    apix: float
    box: int
    model_box: int
    resolution_0143: float | None  # None when the pose quality failed: no number is claimed as a resolution
    timings_s: dict[str, float] = field(default_factory=dict)
    refinement: list[dict] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    resumed_from_poses: bool = False
    status: str = "complete"
    processes: int = 1  # ranks of a distributed (torchrun) run
    pose_warning: str = ""  # what the weights' held-out accuracy says of these poses (pose_trust_note)
    quality: dict = field(default_factory=dict)  # the data-only verdict (cryofastar_core.evaluation.verdict.PoseQuality)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str)

    @property
    def resolution_text(self) -> str:
        """How a log may quote this run's resolution: the number, or why none is given."""
        if self.resolution_0143 is None:
            return "no resolution given: the poses failed the quality check (report.json: quality)"
        doubt = " (poses doubtful: see quality)" if self.quality.get("verdict") == "doubtful" else ""
        return f"gold-standard resolution {self.resolution_0143:.2f} Å (half-map FSC 0.143){doubt}"

    @property
    def verdict_lines(self) -> list[str]:
        """The pose-quality verdict and its main reason: the last lines every front end prints."""
        if not self.quality:
            return []
        return [f"POSE QUALITY: {self.quality['verdict'].upper()}: {self.quality['reasons'][0]}"]


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def stage(self, name: str) -> "_Stage":
        return _Stage(self, name)


class _Stage:
    def __init__(self, timer: _Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()
        log.info("stage: %s", self.name)

    def __exit__(self, *exc) -> None:
        self.timer.timings[self.name] = round(time.perf_counter() - self.t0, 3)


@dataclass
class _Context:
    """What every stage of one run reads: the settings, the processes, the device, the clock."""

    cfg: JobConfig
    comm: Communicator
    device: torch.device
    progress: Progress | None  # None on every rank but 0: only rank 0 reports progress
    t_start: float
    timer: _Timer = field(default_factory=_Timer)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_dir)


@dataclass
class _Inputs:
    """The checked particles and weights; ``model`` is dropped once the poses exist."""

    particles: ParticleSet
    apix: float
    model: torch.nn.Module | None
    model_box: int
    weights_info: dict
    fingerprint: str = ""


@dataclass
class _Poses:
    """Every particle's pose (estimated or resumed, then maybe refined), which ones are kept, their half sets."""

    est: dict
    resumed: bool
    rotations: np.ndarray
    shifts: np.ndarray
    confidence: np.ndarray
    keep: np.ndarray | None = None
    half: np.ndarray | None = None
    refinement: list[dict] = field(default_factory=list)


def run(cfg: JobConfig, progress: Progress | None = None, comm: Communicator | None = None) -> Report:
    """Run the whole job; see the module docstring. ``progress(stage, done, total)`` reports progress
    (:mod:`cryofastar_core.runtime.progress`; the front end chooses how it is shown).

    Under ``torchrun`` (an initialised ``torch.distributed`` process group, or an explicit ``comm``) every
    rank calls this with the same ``cfg``: the pose chunks, refinement (if asked) and the reconstruction are
    shared out, rank 0 alone decides about resuming and writes, and every rank returns rank 0's report.
    An error on any rank is raised on every rank (:mod:`cryofastar_core.runtime.communicator`).
    """
    cfg.validate()
    ctx = _context(cfg, progress, comm)
    inputs = ctx.comm.check(lambda: _read_inputs(ctx))
    inputs.fingerprint = _agreed_fingerprint(ctx, inputs)
    poses = _poses(ctx, inputs)
    if isinstance(poses, Report):
        return poses  # the output folder already holds this run, complete
    inputs.model = None
    _select_particles(ctx, inputs, poses)
    refined_maps = _refine_shared(ctx, inputs, poses) if cfg.refine_iters > 0 else None
    maps = _reconstruct(ctx, inputs, poses, refined_maps)
    return ctx.comm.on_main(lambda: _judge_and_write(ctx, inputs, poses, maps))


def _context(cfg: JobConfig, progress: Progress | None, comm: Communicator | None) -> _Context:
    t_start = time.perf_counter()
    comm = comm or Communicator.from_process_group()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.torch_device()
    if comm.distributed and device.type == "cuda" and device.index is None:
        device = torch.device(rank_device("cuda", dist_env()))
    return _Context(cfg, comm, device, progress if comm.is_main else None, t_start)


def _read_inputs(ctx: _Context) -> _Inputs:
    """Stages read and load_weights (on every rank)."""
    particles, apix = _read_particles(ctx)
    model, model_box, weights_info = _load_weights(ctx)
    return _Inputs(particles, apix, model, model_box, weights_info)


def _read_particles(ctx: _Context) -> tuple[ParticleSet, float]:
    """Stage read: the particles, refused if they would be overwritten, are too few or differ in pixel size."""
    cfg = ctx.cfg
    with ctx.timer.stage("read"):
        particles = read_particles(cfg.particles, cfg.project_dir)
        _refuse_overwriting_inputs(particles, ctx.out)
        if len(particles) < cfg.views:
            raise InputError(cfg.particles, None, f"{len(particles)} particles is fewer than --views {cfg.views}",
                             f"use --views {max(4, len(particles))} or more particles")
        apix_all = np.asarray(particles.apix, dtype=np.float64)
        if not np.allclose(apix_all, apix_all[0], rtol=1e-4):
            raise InputError(cfg.particles, "rlnImagePixelSize", "particles have different pixel sizes",
                             "run one optics group (pixel size) at a time")
    return particles, float(apix_all[0])


def _load_weights(ctx: _Context) -> tuple[torch.nn.Module, int, dict]:
    """Stage load_weights: the model, its box (checked against ``box``) and the weights' identity."""
    cfg = ctx.cfg
    with ctx.timer.stage("load_weights"):
        weights_path = resolve_weights(cfg.weights)
        model = load_weights(weights_path, device=ctx.device)
        model_box = int(model.cfg.box)
        if cfg.box is not None and cfg.box != model_box:
            raise InputError(weights_path, "box", f"the weights were trained at box {model_box}, not {cfg.box}",
                             f"use --box {model_box} or weights trained at box {cfg.box}")
        weights_info = _weights_identity(weights_path)
    return model, model_box, weights_info


def _agreed_fingerprint(ctx: _Context, inputs: _Inputs) -> str:
    """The fingerprint of inputs, weights and settings; every rank of a distributed run must see the same."""
    fingerprint = _fingerprint(ctx.cfg, inputs.particles, inputs.weights_info)
    if ctx.comm.distributed and len(set(ctx.comm.gather(lambda: fingerprint))) > 1:
        raise InputError(ctx.cfg.particles, None, "the processes of this distributed run see different inputs, "
                         "weights or settings", "put particles, weights and --o on a file system that every node "
                         "shares, and start every process with the same options")
    return fingerprint


def _poses(ctx: _Context, inputs: _Inputs) -> _Poses | Report:
    """Stage poses: the complete run's report if ``out_dir`` already holds one, else the poses, resumed from
    an interrupted run's saved estimate or estimated (on every rank) and saved for a resume."""
    with ctx.timer.stage("poses"):
        decision, payload = ctx.comm.on_main(lambda: _decide_resume(ctx.out, inputs.fingerprint))
        if decision == "done":
            log.info("%s already holds a complete run with these inputs and settings: nothing to do", ctx.out)
            return payload
        if decision == "resume":
            est = payload
            log.info("resuming: feed-forward poses from an earlier run of this job")
        else:
            est = _estimate(ctx.cfg, inputs.particles, inputs.model, inputs.model_box, ctx.device, ctx.progress,
                            ctx.comm)
            ctx.timer.timings["poses_reference_scoring"] = round(float(est["reference_scoring_s"]), 3)
            ctx.comm.on_main(lambda: _save_poses(_poses_file(ctx.out), inputs.fingerprint, est))
    return _Poses(est, decision == "resume", est["rotations"], est["shifts"], est["confidence"])


def _decide_resume(out: Path, fingerprint: str) -> tuple[str, object]:
    """Rank 0: nothing to do (``"done"``, the report), resume from saved poses (``"resume"``, the estimate),
    or estimate them (``"estimate"``, None)."""
    out.mkdir(parents=True, exist_ok=True)
    done_report = _completed_report(out, fingerprint)
    if done_report is not None:
        return "done", done_report
    # From here on the folder must not look finished: drop an older run's report and stale staging.
    (out / REPORT).unlink(missing_ok=True)
    for stale in out.glob(".cryofastar-staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    # Poses: resume from a finished inference stage of an interrupted run with the same fingerprint.
    saved = _load_poses(_poses_file(out), fingerprint)
    if saved is not None:
        return "resume", saved
    if (out / STATE_DIR).exists():
        shutil.rmtree(out / STATE_DIR)  # state of other inputs or settings: restart cleanly
    return "estimate", None


def _poses_file(out: Path) -> Path:
    """Where the pose estimate is kept for a resume (with its fingerprint)."""
    return out / STATE_DIR / "poses.npz"


def _save_poses(path: Path, fingerprint: str, est: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        np.savez(tmp, fingerprint=fingerprint, **{k: v for k, v in est.items() if k != "fingerprint"})
        # np.savez appends .npz to names without it; the temp name keeps the suffix.


def _select_particles(ctx: _Context, inputs: _Inputs, poses: _Poses) -> None:
    """Stage select: which particles are kept (``poses.keep``) and every particle's half set (``poses.half``)."""
    with ctx.timer.stage("select"):
        confidence = poses.confidence
        keep = poses.keep = _select(ctx.cfg, confidence)
        q10, q50, q90 = np.quantile(confidence, [0.1, 0.5, 0.9])
        log.info("keeping %d of %d particles (confidence 0-1: median %.3f, 10-90%% %.3f-%.3f)", int(keep.sum()),
                 len(keep), q50, q10, q90)
        poses.half = half_sets(inputs.particles.half_set, len(inputs.particles), str(ctx.cfg.particles))


def _refine_shared(ctx: _Context, inputs: _Inputs, poses: _Poses) -> tuple:
    """Stage refine: every rank refines its own block of the kept particles, and every rank comes out with
    the same refined poses and refinement's last ``(full, half1, half2)`` maps (each pass's accumulators and
    poses are summed over the ranks inside :func:`cryofastar_core.refine.driver.refine_poses`)."""
    with ctx.timer.stage("refine"):
        poses.rotations, poses.shifts, poses.refinement, maps = _refine(
            ctx.cfg, inputs.particles, poses.rotations, poses.shifts, poses.half, poses.keep, inputs.apix, ctx.device,
            ctx.progress, ctx.comm)
    return maps


def _reconstruct(ctx: _Context, inputs: _Inputs, poses: _Poses, refined_maps: tuple | None) -> tuple | None:
    """Stage reconstruct: rank 0's ``(full, half1, half2, freq, curve, resolution)`` (None on the other ranks).

    ``refined_maps``: refinement's last maps, the same on every rank (see :func:`_refine_shared`), or None
    without refinement."""
    apix = inputs.apix
    with ctx.timer.stage("reconstruct"):
        if refined_maps is not None:
            # Refinement's last pass already inserted every kept particle at its final pose into half-set
            # accumulators like the ones below: reuse those maps instead of reading the particles again.
            return ctx.comm.on_main(lambda: _with_fsc(refined_maps, apix), share=False)
        halves = _accumulate_shard(inputs.particles, poses.rotations, poses.shifts, poses.half, poses.keep, apix,
                                   ctx.device, ctx.cfg.read_chunk, ctx.progress, ctx.comm)
        return ctx.comm.on_main(lambda: _with_fsc(_finalize(halves), apix), share=False)


def _judge_and_write(ctx: _Context, inputs: _Inputs, poses: _Poses, maps: tuple) -> Report:
    """Stages quality and write (rank 0): the verdict, the outputs, report.json, then the closing log lines."""
    quality = _judge_poses(ctx, inputs, poses, maps)
    report = _write_run(ctx, inputs, poses, maps, quality)
    _log_verdict(report, quality)
    return report


def _judge_poses(ctx: _Context, inputs: _Inputs, poses: _Poses, maps: tuple) -> PoseQuality:
    """Stage quality: the data-only verdict on the kept particles' poses against the half maps."""
    _, half1, half2, *_ = maps
    with ctx.timer.stage("quality"):
        return assess_quality(inputs.particles, poses.rotations, poses.shifts, poses.half, poses.keep, (half1, half2),
                              ctx.device)


def _write_run(ctx: _Context, inputs: _Inputs, poses: _Poses, maps: tuple, quality: PoseQuality) -> Report:
    """Stage write: every output moved into place together, then report.json (with the fingerprint) last."""
    full, half1, half2, freq, curve, res = maps
    with ctx.timer.stage("write"):
        outputs = _write_outputs(ctx.out, inputs.particles, poses.rotations, poses.shifts, poses.half, poses.keep,
                                 poses.confidence, poses.est, full, half1, half2, freq, curve, inputs.apix, quality)
    ctx.timer.timings["total"] = round(time.perf_counter() - ctx.t_start, 3)
    est, particles, weights_info = poses.est, inputs.particles, inputs.weights_info
    report = Report(
        version=__version__, settings=_settings(ctx.cfg), weights=weights_info, n_particles=len(particles),
        n_kept=int(poses.keep.sum()), reference=int(est["reference"]), flipped_chunks=int(est["flipped_chunks"]),
        n_chunks=int(est["n_chunks"]), apix=inputs.apix, box=int(particles.box), model_box=inputs.model_box,
        resolution_0143=None if quality.verdict == "failed" else float(res), timings_s=ctx.timer.timings,
        refinement=poses.refinement, outputs=outputs + [REPORT], resumed_from_poses=poses.resumed,
        processes=ctx.comm.world_size, pose_warning=pose_trust_note(weights_info["provenance"], refined=ctx.cfg.refine_iters > 0),
        quality=quality.to_dict())
    payload = json.loads(report.to_json())
    payload["fingerprint"] = inputs.fingerprint
    with atomic_output(ctx.out / REPORT) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    return report


def _log_verdict(report: Report, quality: PoseQuality) -> None:
    """The run's last log lines: the pose warning, the resolution (or why none), the pose-quality verdict."""
    log.warning("%s", report.pose_warning)
    log.info("%s", report.resolution_text)
    for line in [*report.verdict_lines, *(f"  - {r}" for r in quality.reasons[1:])]:
        (log.warning if quality.verdict != "ok" else log.info)("%s", line)


def _fsc_resolution(half1: torch.Tensor, half2: torch.Tensor, apix: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    # Not logged here: whether this number may be called a resolution waits for the pose-quality verdict.
    freq, curve = fsc(half1, half2)
    return freq, curve, resolution_at(freq, curve, apix, 0.143)


def _with_fsc(maps: tuple, apix: float) -> tuple:
    """``(full, half1, half2, freq, curve, resolution)`` from ``(full, half1, half2)``."""
    full, half1, half2 = maps
    return (full, half1, half2, *_fsc_resolution(half1, half2, apix))


def _accumulate_shard(particles: ParticleSet, rotations: np.ndarray, shifts: np.ndarray, half: np.ndarray,
                      keep: np.ndarray, apix: float, device: torch.device, read_chunk: int,
                      progress: Progress | None, comm: Communicator) -> list[Backprojector]:
    """Insert this rank's contiguous share of the kept particles into two half-set Backprojectors, then sum
    the accumulators of every rank into rank 0's (the others' hold nothing useful afterwards). One process:
    every kept particle, nothing to sum."""
    indices = np.flatnonzero(keep)
    mine = np.array_split(indices, comm.world_size)[comm.rank]
    my_keep = np.zeros_like(keep)
    my_keep[mine] = True
    halves = [Backprojector(particles.box, device=device) for _ in range(2)]
    total = len(indices)
    done = [0]

    def tick(k: int) -> None:
        # This rank's share times the number of ranks: an estimate of the whole.
        k_all = min(k * comm.world_size, total - done[0])
        done[0] += k_all
        if progress:
            progress("reconstruct", done[0], total)

    def insert_mine() -> None:
        for ch in _chunks(particles, rotations, shifts, half, my_keep, apix, device, read_chunk, tick):
            insert_half_sets(halves, ch.images, ch.rotations, ch.half_sets, shifts=ch.shifts, ctf=ch.ctf, apix=ch.apix)

    comm.check(insert_mine)
    comm.reduce_sum_([t for bp in halves for t in (bp.numerator, bp.weight)], dst=0)
    return halves


def _finalize(halves: list[Backprojector]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(full, half1, half2)`` from summed half-set accumulators."""
    half1, half2 = halves[0].finalize(), halves[1].finalize()
    full = halves[0].add_(halves[1]).finalize()
    return full, half1, half2


def _refuse_overwriting_inputs(particles: ParticleSet, out: Path) -> None:
    inputs = {Path(particles.source).resolve(), *(Path(p).resolve() for p in particles.image_files)}
    for name in ("particles.star", "particles.cs", "map.mrc", "half1.mrc", "half2.mrc"):
        target = (out / name).resolve()
        if target in inputs:
            raise InputError(particles.source, None, f"the output {target} would overwrite an input file",
                             "choose an output folder (--o) that holds none of the inputs")


def _estimate(cfg: JobConfig, particles: ParticleSet, model: torch.nn.Module, model_box: int, device: torch.device,
              progress: Progress | None, comm: Communicator | None = None) -> dict:
    n = len(particles)

    ctf_correction = model.cfg.ctf_correction
    use_ctf = ctf_correction != "none" and particles.ctf is not None

    def load(indices: np.ndarray) -> torch.Tensor:
        images = particles.read_images(indices)
        return to_model_input(images, model_box, particles.sign[indices], device=device,
                              ctf=particles.ctf_params(indices) if use_ctf else None,
                              apix=torch.as_tensor(particles.apix[indices]), ctf_correction=ctf_correction)

    ecfg = EstimatorConfig(views=cfg.views, candidates=cfg.candidates, anchors=cfg.anchors,
                           chunks_per_batch=cfg.chunks_per_batch, weighting=cfg.weighting, seed=cfg.seed)
    est = estimate_poses(model, load, n, ecfg, progress=progress, comm=comm)
    scale = model_px_to_input_px(particles.box, model_box)
    if est.chunk_drift_deg:
        log.info("frame health: median anchor disagreement between chunks %.2f deg", float(np.median(est.chunk_drift_deg)))
    return {"rotations": est.rotations, "shifts": est.shifts * scale, "confidence": est.confidence,
            "residual": est.residual, "reference": est.reference, "anchors": est.anchors,
            "flipped_chunks": est.flipped_chunks, "n_chunks": est.n_chunks,
            "candidate_scores": est.candidate_scores, "reference_scoring_s": est.reference_scoring_s}


def _select(cfg: JobConfig, confidence: np.ndarray) -> np.ndarray:
    keep = np.ones(len(confidence), dtype=bool)
    if cfg.min_confidence is not None:
        keep &= confidence >= cfg.min_confidence
    if cfg.keep_fraction is not None and cfg.keep_fraction < 1:
        # Exactly the k most confident (a stable rank, so ties cannot keep more than asked for).
        k = max(2, int(round(cfg.keep_fraction * len(confidence))))
        top = np.argsort(-confidence, kind="stable")[:k]
        ranked = np.zeros_like(keep)
        ranked[top] = True
        keep &= ranked
    if keep.sum() < 2:
        raise InputError(None, "keep_fraction, min_confidence", "fewer than 2 particles would be kept",
                         "keep a larger fraction or lower the confidence threshold")
    return keep


def _chunks(particles: ParticleSet, rotations: np.ndarray, shifts: np.ndarray, half: np.ndarray, keep: np.ndarray,
            apix: float, device: torch.device, read_chunk: int, on_chunk: Callable[[int], None] | None = None):
    ctf_all = particles.ctf_params() if particles.ctf is not None else None
    indices = np.flatnonzero(keep)
    for idx, images in particles.iter_chunks(read_chunk, indices):
        images = torch.as_tensor(images * particles.sign[idx, None, None], dtype=torch.float32, device=device)
        yield ParticleChunk(images=images, rotations=torch.as_tensor(rotations[idx], dtype=torch.float32, device=device),
                            half_sets=half[idx], shifts=torch.as_tensor(shifts[idx], dtype=torch.float32, device=device),
                            ctf=None if ctf_all is None else ctf_all.index(torch.as_tensor(idx)).to(device), apix=apix)
        if on_chunk:
            on_chunk(len(idx))


def reconstruct_maps(particles: ParticleSet, rotations: np.ndarray, shifts: np.ndarray, half: np.ndarray,
                     keep: np.ndarray, apix: float, device: torch.device, read_chunk: int = 512,
                     progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The job's CTF-corrected ``(full, half1, half2)`` maps of the ``keep`` particles at the given poses: the
    job's reconstruct stage in one process."""
    return _finalize(_accumulate_shard(particles, rotations, shifts, half, keep, apix, device, read_chunk, progress,
                                       Communicator()))


def assess_quality(particles: ParticleSet, rotations: np.ndarray, shifts: np.ndarray, half: np.ndarray,
                   keep: np.ndarray, half_maps: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                   ) -> PoseQuality:
    """The data-only pose-quality verdict of the ``keep`` particles (:mod:`cryofastar_core.evaluation.verdict`)."""
    idx = np.flatnonzero(keep)
    log.info("judging the poses of up to %d particles against the half maps", min(len(idx), 2000))

    def load(local: np.ndarray) -> torch.Tensor:
        g = idx[local]
        return torch.as_tensor(particles.read_images(g) * particles.sign[g, None, None], dtype=torch.float32)

    ctf = particles.ctf_params(idx) if particles.ctf is not None else None
    return assess_poses(load, ctf, float(particles.apix[0]), rotations[idx], shifts[idx], half[idx], half_maps,
                        device=device)


def _refine(cfg: JobConfig, particles: ParticleSet, rotations: np.ndarray, shifts: np.ndarray, half: np.ndarray,
            keep: np.ndarray, apix: float, device: torch.device, progress: Progress | None = None,
            comm: Communicator | None = None
            ) -> tuple[np.ndarray, np.ndarray, list[dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    from cryofastar_core.refine.driver import RefineConfig, refine_poses

    idx = np.flatnonzero(keep)

    def load(local: np.ndarray) -> torch.Tensor:
        g = idx[local]
        return torch.as_tensor(particles.read_images(g) * particles.sign[g, None, None], dtype=torch.float32, device=device)

    ctf = particles.ctf_params(idx).to(device) if particles.ctf is not None else None
    result = refine_poses(load, ctf, apix, rotations[idx], shifts[idx], half[idx],
                          RefineConfig(iterations=cfg.refine_iters,
                                       global_step_deg=RefineConfig.global_step_deg if cfg.refine_global else None),
                          device=device, progress=progress, comm=comm)
    rotations, shifts = rotations.copy(), shifts.copy()
    rotations[idx] = np.asarray(result.rotations)
    shifts[idx] = np.asarray(result.shifts)
    return rotations, shifts, [dict(h) for h in result.history], (result.full, result.half1, result.half2)


def _write_outputs(out: Path, particles: ParticleSet, rotations: np.ndarray, shifts: np.ndarray, half: np.ndarray,
                   keep: np.ndarray, confidence: np.ndarray, est: dict, full: torch.Tensor, half1: torch.Tensor,
                   half2: torch.Tensor, freq: torch.Tensor, curve: torch.Tensor, apix: float,
                   quality: PoseQuality) -> list[str]:
    from cryofastar_core.evaluation.plots import confidence_histogram, fsc_plot, viewing_direction_plot

    with staged_output_dir(out) as stage:
        # The per-particle confidence (0-1) under a label RELION 3.1 knows, so RELION programs keep it.
        write_particles_star(particles, stage / "particles.star", rotations=rotations, shifts=shifts, half_set=half,
                             extra_columns={CONFIDENCE_LABEL: confidence}, keep=keep)
        if particles.source_format == "cryosparc":
            write_particles_cs(particles, stage / "particles.cs", rotations, shifts, half_set=half, keep=keep)
        write_map(stage / "map.mrc", full.cpu().numpy(), apix)
        write_map(stage / "half1.mrc", half1.cpu().numpy(), apix)
        write_map(stage / "half2.mrc", half2.cpu().numpy(), apix)
        verdict = f"pose quality: {quality.verdict}"
        if quality.verdict == "failed":
            # The crossings would read as a resolution: the halves agree only on wrong poses.
            fsc_plot(freq, {"half 1 vs half 2": curve}, apix, stage / "fsc.png", mark_crossings=False,
                     title=f"half-map FSC: consistency only, NOT a resolution ({verdict})")
        else:
            fsc_plot(freq, {"half 1 vs half 2": curve}, apix, stage / "fsc.png", title=f"half-map FSC ({verdict})")
        viewing_direction_plot(rotations[keep], stage / "viewing_directions.png",
                               title=f"viewing directions (N = {int(keep.sum())}; coverage {quality.coverage:.2f}; "
                                     f"{verdict})")
        confidence_histogram(confidence, stage / "confidence.png",
                             threshold=float(confidence[keep].min()) if not keep.all() else None)
        (stage / "fsc.tsv").write_text(fsc_tsv(freq, curve, apix))
        names = sorted(p.name for p in stage.iterdir())
    return names


def _settings(cfg: JobConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def pose_trust_note(provenance: dict, refined: bool = False) -> str:
    """One plain sentence on how far these weights' feed-forward poses can be trusted, from the
    held-out accuracy recorded in the weights file (``extra["heldout"]``, written when weights ship), and
    what to do about it: refine (``refined`` False), or read the verdict on the refined poses."""
    heldout = provenance.get("heldout") if isinstance(provenance, dict) else None
    then = ("this run refined them (global passes, then local iterations): the pose-quality verdict below says "
            "what the refined poses are worth." if refined else
            "the half-map resolution measures consistency, not correctness. Rerun with --refine-iters 3, or "
            "refine globally in RELION or CryoSPARC from this map, before building on it.")
    if not isinstance(heldout, dict) or "median_rot_deg" not in heldout:
        return f"FEED-FORWARD POSES NOT VALIDATED: these weights carry no held-out accuracy; {then}"
    return (f"FEED-FORWARD POSES NOT YET RELIABLE: on unseen simulated structures these weights' median rotation "
            f"error is {float(heldout['median_rot_deg']):.0f} deg ({heldout.get('setting', 'see the model card')}); "
            f"{then}")


def _weights_identity(path: Path) -> dict:
    content = read_weights_file(path)
    h = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return {"path": str(path), "sha256": h, "config": content.get("config"), "provenance": content.get("extra", {})}


def _fingerprint(cfg: JobConfig, particles: ParticleSet, weights: dict) -> str:
    src = Path(particles.source)
    st = src.stat()
    relevant = {k: v for k, v in _settings(cfg).items() if k not in ("out_dir", "device", "threads", "read_chunk")}
    # "format" changes when saved poses mean something else (2: confidences on the 0-1 scale).
    blob = json.dumps({"format": 2, "source": str(src.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                       "weights": weights["sha256"], "settings": relevant}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _completed_report(out: Path, fingerprint: str) -> Report | None:
    path = out / REPORT
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if payload.pop("fingerprint", None) != fingerprint or not all((out / o).exists() for o in payload.get("outputs", [])):
        return None
    return Report(**payload)


def _load_poses(path: Path, fingerprint: str) -> dict | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            return {k: z[k] for k in z.files if k != "fingerprint"}
    except (OSError, ValueError, KeyError):
        return None
