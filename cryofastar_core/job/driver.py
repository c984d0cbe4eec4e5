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

import json
import logging
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cryofastar_core import __version__
from cryofastar_core.evaluation.heterogeneity import HETEROGENEOUS_ABOVE, SplitTest
from cryofastar_core.evaluation.verdict import (PoseQuality, with_class_disagreement, with_heterogeneity, with_junk,
                                                with_unresolved_mates)
from cryofastar_core.io import ParticleSet, read_particles
from cryofastar_core.physics.compiled import backend as slice_backend
from cryofastar_core.io.atomic_write import atomic_output
from cryofastar_core.job.config import JobConfig, settings_of
from cryofastar_core.job.maps import (accumulate_shard, centring_at_input_box, finalize_halves, moved_maps, moved_shifts,
                                      with_fsc)
from cryofastar_core.job.outputs import ClassOutput, class_summary, refuse_overwriting_inputs, write_outputs
from cryofastar_core.job.judge import assess_quality, split_test
from cryofastar_core.job.classes import refine_classes
from cryofastar_core.job.poses import estimate_feed_forward, kept_by_confidence, refine_kept
from cryofastar_core.job.refine_at import Refined
from cryofastar_core.job.report import REPORT, Report, pose_trust_note
from cryofastar_core.inference.pose_model import load_pose_model, pose_model_identity
from cryofastar_core.job.class_route import LOW_SUPPORT
from cryofastar_core.job.resume import STATE_DIR, decide_resume, poses_file, run_fingerprint, save_poses
from cryofastar_core.job.work_scale import scratch_for
from cryofastar_core.reconstruct import half_sets
from cryofastar_core.runtime.communicator import Communicator, dist_env, rank_device
from cryofastar_core.runtime.errors import InputError
from cryofastar_core.runtime.progress import Progress
from cryofastar_core.runtime.threads import set_thread_count

log = logging.getLogger(__name__)


class _Timer:
    """Each stage's wall time and peak memory (``report.json``: ``timings_s``, ``peak_memory_mb``)."""

    def __init__(self, cuda: bool = False) -> None:
        self.timings: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}
        self.cuda = cuda  # also the GPU's peak per stage

    def stage(self, name: str) -> "_Stage":
        return _Stage(self, name)


class _Stage:
    def __init__(self, timer: _Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()
        if self.timer.cuda:
            torch.cuda.reset_peak_memory_stats()
        log.info("stage: %s", self.name)

    def __exit__(self, *exc) -> None:
        self.timer.timings[self.name] = round(time.perf_counter() - self.t0, 3)
        self.timer.peak_mb[self.name] = round(peak_rss_mb(), 1)
        if self.timer.cuda:
            self.timer.peak_mb[f"{self.name}_gpu"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB: ``VmHWM`` of its own memory map (``ru_maxrss`` would
    also count the peak of the process that started it, which survives ``exec``), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
    selected: np.ndarray | None = None  # (N,) bool: kept by the select stage; keep is this less any junk set apart
    half: np.ndarray | None = None
    refinement: list[dict] = field(default_factory=list)
    junk: np.ndarray | None = None  # (N,) bool: found by refinement's global passes (refine/junk.py)
    junk_score: np.ndarray | None = None  # (N,) evidence in SDs of the good particles' (NaN: not refined)
    junk_rule: dict = field(default_factory=dict)
    work_scale: dict = field(default_factory=dict)  # where refinement worked (job/work_scale.py)
    classes: np.ndarray | None = None  # (N,) class 1..K of each particle with several classes (job/classes.py)
    class_maps: list = field(default_factory=list)  # refinement's (full, half1, half2) per class, None where absent
    n_classes: int = 1  # K: cfg.classes, or 2 when a one-class run's particles split (split_mixed)
    split: SplitTest | None = None  # a one-class refinement's split test (None: not run, or too few particles)


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
    others = _reconstruct_other_classes(ctx, inputs, poses)
    return ctx.comm.on_main(lambda: _judge_and_write(ctx, inputs, poses, maps, others))


def _context(cfg: JobConfig, progress: Progress | None, comm: Communicator | None) -> _Context:
    t_start = time.perf_counter()
    comm = comm or Communicator.from_process_group()
    log.info("CPU threads: %d", set_thread_count(cfg.threads))
    device = cfg.torch_device()
    if device.type == "cpu":
        log.info("central-slice kernels: %s", slice_backend())
    if comm.distributed and device.type == "cuda" and device.index is None:
        device = torch.device(rank_device("cuda", dist_env()))
    return _Context(cfg, comm, device, progress if comm.is_main else None, t_start, _Timer(device.type == "cuda"))


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
        refuse_overwriting_inputs(particles, ctx.out)
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
        cfg.check_class_poses()
        model = load_pose_model(cfg.weights, device=ctx.device)
        model_box = int(model.cfg.box)
        if cfg.box is not None and cfg.box != model_box:
            raise InputError(cfg.weights, "box", f"the pose model works at box {model_box}, not {cfg.box}",
                             f"use --box {model_box} or weights trained at box {cfg.box}")
        weights_info = pose_model_identity(cfg.weights, model)
    return model, model_box, weights_info


def _agreed_fingerprint(ctx: _Context, inputs: _Inputs) -> str:
    """The fingerprint of inputs, weights and settings; every rank of a distributed run must see the same."""
    fingerprint = run_fingerprint(ctx.cfg, inputs.particles, inputs.weights_info)
    if ctx.comm.distributed and len(set(ctx.comm.gather(lambda: fingerprint))) > 1:
        raise InputError(ctx.cfg.particles, None, "the processes of this distributed run see different inputs, "
                         "weights or settings", "put particles, weights and --o on a file system that every node "
                         "shares, and start every process with the same options")
    return fingerprint


def _poses(ctx: _Context, inputs: _Inputs) -> _Poses | Report:
    """Stage poses: the complete run's report if ``out_dir`` already holds one, else the poses, resumed from
    an interrupted run's saved estimate or estimated (on every rank) and saved for a resume."""
    with ctx.timer.stage("poses"):
        decision, payload = ctx.comm.on_main(lambda: decide_resume(ctx.out, inputs.fingerprint))
        if decision == "done":
            log.info("%s already holds a complete run with these inputs and settings: nothing to do", ctx.out)
            return payload
        if decision == "resume":
            est = payload
            log.info("resuming: feed-forward poses from an earlier run of this job")
        else:
            est = estimate_feed_forward(ctx.cfg, inputs.particles, inputs.model, inputs.model_box, ctx.device,
                                        ctx.progress, ctx.comm)
            ctx.timer.timings["poses_reference_scoring"] = round(float(est["reference_scoring_s"]), 3)
            ctx.comm.on_main(lambda: save_poses(poses_file(ctx.out), inputs.fingerprint, est))
    return _Poses(est, decision == "resume", est["rotations"], est["shifts"], est["confidence"])


        # np.savez appends .npz to names without it; the temp name keeps the suffix.


def _select_particles(ctx: _Context, inputs: _Inputs, poses: _Poses) -> None:
    """Stage select: which particles are kept (``poses.keep``) and every particle's half set (``poses.half``)."""
    with ctx.timer.stage("select"):
        confidence = poses.confidence
        keep = poses.keep = poses.selected = kept_by_confidence(ctx.cfg, confidence)
        posed = np.isfinite(confidence)
        q10, q50, q90 = np.quantile(confidence[posed], [0.1, 0.5, 0.9])
        log.info("keeping %d of %d particles (confidence 0-1 of the %d posed feed-forward: median %.3f, 10-90%% "
                 "%.3f-%.3f)", int(keep.sum()), len(keep), int(posed.sum()), q50, q10, q90)
        poses.half = half_sets(inputs.particles.half_set, len(inputs.particles), str(ctx.cfg.particles))


def _refine_shared(ctx: _Context, inputs: _Inputs, poses: _Poses) -> tuple:
    """Stage refine: every rank refines its own block of the kept particles, and every rank comes out with
    the same refined poses and refinement's last ``(full, half1, half2)`` maps (each pass's accumulators and
    poses are summed over the ranks inside :func:`cryofastar_core.refine.driver.refine_poses`). With one
    class, then the split test (stage heterogeneity) and, when it finds two structures, stage
    refine_classes (:func:`_split_into_classes`)."""
    with ctx.timer.stage("refine"), scratch_for(inputs.particles, ctx.out / STATE_DIR / "scratch", ctx.comm.rank):
        refined = refine_kept(ctx.cfg, inputs.particles, poses.rotations, poses.shifts, poses.half, poses.selected,
                              inputs.apix, ctx.device, ctx.progress, ctx.comm)
    _take_refined(ctx, poses, refined, ctx.cfg.classes)
    if refined.classes is None:
        poses.split = _split_test(ctx, inputs, poses)
        if poses.split is not None and poses.split.heterogeneous and ctx.cfg.split_mixed and ctx.cfg.refine_global:
            refined = _split_into_classes(ctx, inputs, poses)
    return refined.maps


def _take_refined(ctx: _Context, poses: _Poses, refined: Refined, n_classes: int) -> None:
    """``poses`` takes a refinement's poses, junk, classes and history (after any earlier refinement's); its
    junk is then set apart."""
    poses.rotations, poses.shifts, poses.refinement = refined.rotations, refined.shifts, \
        poses.refinement + refined.history
    poses.junk, poses.junk_score, poses.junk_rule = refined.junk, refined.junk_score, refined.junk_rule
    poses.work_scale = dict(refined.scale, feed_forward_particles=int(np.isfinite(poses.confidence).sum()))
    poses.classes, poses.class_maps = refined.classes, refined.class_maps or []
    poses.n_classes = n_classes
    _set_junk_apart(ctx, poses)


def _split_test(ctx: _Context, inputs: _Inputs, poses: _Poses) -> SplitTest | None:
    """Stage heterogeneity: do the kept particles (junk apart) at their refined poses split reproducibly into
    two populations (:func:`cryofastar_core.job.judge.split_test`, on rank 0, shared)?"""
    with ctx.timer.stage("heterogeneity"):
        idx = np.flatnonzero(poses.keep)
        return ctx.comm.on_main(lambda: split_test(inputs.particles, idx, poses.rotations[idx], poses.shifts[idx],
                                                   poses.half[idx], ctx.device, ctx.cfg.seed))


def _split_into_classes(ctx: _Context, inputs: _Inputs, poses: _Poses) -> Refined:
    """Stage refine_classes: the selected particles refined again as two classes from their feed-forward poses,
    exactly as ``--classes 2`` would (:func:`cryofastar_core.job.classes.refine_classes`): another protein or
    conformation gets its own map instead of being averaged in. Not from the one-class poses: on the test
    mixture that start put 87 % in the right class, the feed-forward one 97 % (tests/test_classes.py)."""
    log.warning("the particles split into two structures (split figure %.4f, one structure stays below %s): "
                "refining them as two classes (--no-split-mixed keeps one)", poses.split.figure, HETEROGENEOUS_ABOVE)
    with ctx.timer.stage("refine_classes"), scratch_for(inputs.particles, ctx.out / STATE_DIR / "scratch",
                                                        ctx.comm.rank):
        refined = refine_classes(replace(ctx.cfg, classes=2), inputs.particles, poses.est["rotations"].copy(),
                                 poses.est["shifts"].copy(), poses.half, poses.selected, inputs.apix, ctx.device,
                                 ctx.progress, ctx.comm)
    _take_refined(ctx, poses, refined, 2)
    return refined


def _junk_counts(poses: _Poses) -> tuple[int, int]:
    """``(junk, judged)``: the particles refinement found without evidence for any pose, of those it refined
    (the kept ones, junk included whether or not it was then set apart)."""
    return int(poses.junk.sum()), int((poses.keep | poses.junk).sum())


def _set_junk_apart(ctx: _Context, poses: _Poses) -> None:
    """The kept set is the selected particles less the junk the last refinement found (it already left the
    junk out of the maps), unless ``keep_junk``; logged."""
    poses.keep = poses.selected if ctx.cfg.keep_junk else poses.selected & ~poses.junk
    if not poses.junk_rule:
        return
    n_junk, n_judged = _junk_counts(poses)
    if n_junk == 0:
        log.info("junk: none found (every particle's best score is above what structureless images score)")
        return
    where = "kept in the maps (--keep-junk)" if ctx.cfg.keep_junk else "left out of the maps, written to junk.star"
    (log.warning if ctx.cfg.keep_junk else log.info)(
        "junk: %d of %d particles (%.1f %%) show no evidence for any pose: %s", n_junk, n_judged,
        100 * n_junk / n_judged, where)


def _reconstruct(ctx: _Context, inputs: _Inputs, poses: _Poses, refined_maps: tuple | None) -> tuple | None:
    """Stage reconstruct: rank 0's ``(full, half1, half2, freq, curve, resolution)`` (None on the other ranks)
    of the kept particles (with several classes: of class 1's).

    ``refined_maps``: refinement's last maps, the same on every rank (see :func:`_refine_shared`), or None
    without refinement."""
    with ctx.timer.stage("reconstruct"):
        return _maps_of(ctx, inputs, poses, _members(poses, 1), refined_maps)


def _members(poses: _Poses, number: int) -> np.ndarray:
    """The kept particles of class ``number`` (all the kept ones with one class)."""
    return poses.keep if poses.classes is None else poses.keep & (poses.classes == number)


def _maps_of(ctx: _Context, inputs: _Inputs, poses: _Poses, members: np.ndarray, refined_maps: tuple | None):
    """Rank 0's maps with their FSC of the particles ``members``: refinement's when it made them at the input
    box (its last pass inserted them at their final poses, in the frame it centred there: no second read),
    else reconstructed (every rank) and the frame's origin moved to the map's centre of mass measured at
    the input box (the members' shifts move with it, on every rank)."""
    apix = inputs.apix
    if refined_maps is not None:  # refinement centred its frame at this very box
        return ctx.comm.on_main(lambda: with_fsc(refined_maps, apix), share=False)
    halves = accumulate_shard(inputs.particles, poses.rotations, poses.shifts, poses.half, members, apix,
                              ctx.device, ctx.cfg.read_chunk, ctx.progress, ctx.comm)
    maps = ctx.comm.on_main(lambda: finalize_halves(halves), share=False)
    t = ctx.comm.on_main(lambda: centring_at_input_box(maps[0]))
    if t is not None:
        log.info("final map's centre of mass moved to the box centre (%.2f px at the input box)", float(t.norm()))
        poses.shifts[members] = moved_shifts(poses.rotations[members], poses.shifts[members], t)
        maps = ctx.comm.on_main(lambda: moved_maps(maps, t), share=False)
    return ctx.comm.on_main(lambda: with_fsc(maps, apix), share=False)


def _reconstruct_other_classes(ctx: _Context, inputs: _Inputs, poses: _Poses) -> list[tuple[int, tuple | None]]:
    """Stage reconstruct_classes (several classes only): ``(number, maps)`` of classes 2..K as
    :func:`_reconstruct` (``maps`` None for a class with fewer than 2 kept particles)."""
    if poses.classes is None:
        return []
    out = []
    with ctx.timer.stage("reconstruct_classes"):
        for number in range(2, poses.n_classes + 1):
            members = _members(poses, number)
            if members.sum() < 2:
                out.append((number, None))
                continue
            given = poses.class_maps[number - 1] if len(poses.class_maps) >= number else None
            out.append((number, _maps_of(ctx, inputs, poses, members, given)))
    return out


def _judge_and_write(ctx: _Context, inputs: _Inputs, poses: _Poses, maps: tuple,
                     others: list[tuple[int, tuple | None]]) -> Report:
    """Stages quality and write (rank 0): the verdict (of class 1 and of every other class), the outputs,
    report.json, then the closing log lines."""
    quality = _judge_poses(ctx, inputs, poses, maps)
    with ctx.timer.stage("quality_classes"):  # one stage for every further class (a stage's time is set once)
        classes = [ClassOutput(number, m, None if m is None else _judge_class(inputs, poses, number, m, ctx.device))
                   for number, m in others]
    report = _write_run(ctx, inputs, poses, maps, quality, classes)
    _log_verdict(report, quality)
    return report


def _judge_poses(ctx: _Context, inputs: _Inputs, poses: _Poses, maps: tuple) -> PoseQuality:
    """Stage quality: the data-only verdict on the kept particles' poses against the half maps."""
    _, half1, half2, *_ = maps
    with ctx.timer.stage("quality"):
        quality = _judge_members(inputs, poses, 1, (half1, half2), ctx.device)
    if poses.junk_rule:
        quality = with_junk(quality, *_junk_counts(poses), in_maps=ctx.cfg.keep_junk)
    if poses.classes is None:  # with classes the history opens with the one-class pass they replaced
        quality = with_unresolved_mates(quality, poses.refinement)
    if "class_support" in poses.est:
        quality = with_class_disagreement(quality, float(poses.est["class_support"]), LOW_SUPPORT,
                                          refined=ctx.cfg.refine_iters > 0)
    if poses.split is not None:
        quality = with_heterogeneity(quality, poses.split, into_classes=poses.classes is not None)
    return quality


def _judge_class(inputs: _Inputs, poses: _Poses, number: int, maps: tuple, device: torch.device) -> PoseQuality:
    """The verdict on class ``number``'s poses against its own half maps."""
    _, half1, half2, *_ = maps
    return _judge_members(inputs, poses, number, (half1, half2), device)


def _judge_members(inputs: _Inputs, poses: _Poses, number: int, half_maps: tuple, device: torch.device) -> PoseQuality:
    """:func:`assess_quality` of class ``number``'s kept particles (all the kept ones with one class)."""
    idx = np.flatnonzero(_members(poses, number))
    return assess_quality(inputs.particles, idx, poses.rotations[idx], poses.shifts[idx], poses.half[idx], half_maps,
                          device)


def _write_run(ctx: _Context, inputs: _Inputs, poses: _Poses, maps: tuple, quality: PoseQuality,
               classes: list[ClassOutput]) -> Report:
    """Stage write: every output moved into place together, then report.json (with the fingerprint) last."""
    full, half1, half2, freq, curve, res = maps
    with ctx.timer.stage("write"):
        outputs = write_outputs(ctx.out, inputs.particles, poses.rotations, poses.shifts, poses.half, poses.keep,
                                poses.confidence, poses.est, full, half1, half2, freq, curve, inputs.apix, quality,
                                poses.junk, poses.junk_score, poses.junk_rule, poses.classes, classes)
    ctx.timer.timings["total"] = round(time.perf_counter() - ctx.t_start, 3)
    est, particles, weights_info = poses.est, inputs.particles, inputs.weights_info
    report = Report(
        version=__version__, settings=settings_of(ctx.cfg), weights=weights_info, n_particles=len(particles),
        n_kept=int(poses.keep.sum()), reference=int(est["reference"]), flipped_chunks=int(est["flipped_chunks"]),
        n_chunks=int(est["n_chunks"]), apix=inputs.apix, box=int(particles.box), model_box=inputs.model_box,
        resolution_0143=None if quality.verdict == "failed" else float(res), timings_s=ctx.timer.timings,
        refinement=poses.refinement, outputs=outputs + [REPORT], resumed_from_poses=poses.resumed,
        junk=_junk_summary(ctx, poses), work_scale=poses.work_scale, peak_memory_mb=ctx.timer.peak_mb,
        processes=ctx.comm.world_size, pose_warning=pose_trust_note(_posed_by(est, weights_info)["provenance"],
                                                                    refined=ctx.cfg.refine_iters > 0),
        quality=quality.to_dict(), class_averages=_class_summary(est),
        classes=class_summary(poses.classes, poses.keep, (1, maps, quality), classes))
    payload = json.loads(report.to_json())
    payload["fingerprint"] = inputs.fingerprint
    with atomic_output(ctx.out / REPORT) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    return report


def _posed_by(est: dict, weights_info: dict) -> dict:
    """The identity of the pose model that gave the feed-forward poses: the class averages' on the
    class-average route, else the weights'."""
    return json.loads(str(est["class_pose_model"])) if "class_pose_model" in est else weights_info


def _class_summary(est: dict) -> dict:
    """``report.json`` → ``class_averages``: empty unless the poses came through 2D class averages."""
    if "class_numbers" not in est:
        return {}
    return {"source": str(est["class_source"]), "n_classes": int(len(est["class_numbers"])),
            "posed_by": _posed_by(est, {})["path"], "median_support": round(float(est["class_support"]), 3)}


def _junk_summary(ctx: _Context, poses: _Poses) -> dict:
    """``report.json`` → ``junk``: how many particles were found without evidence for any pose, whether
    they are in the maps, and what the decision rested on (empty without refinement's global passes)."""
    if not poses.junk_rule:
        return {}
    n_junk, n_judged = _junk_counts(poses)
    return {"n_flagged": n_junk, "fraction": round(n_junk / max(n_judged, 1), 4), "in_maps": bool(ctx.cfg.keep_junk),
            "file": "junk.star" if n_junk and not ctx.cfg.keep_junk else None, "rule": poses.junk_rule}


def _log_verdict(report: Report, quality: PoseQuality) -> None:
    """The run's last log lines: the pose warning, the resolution (or why none), the pose-quality verdict."""
    log.warning("%s", report.pose_warning)
    log.info("%s", report.resolution_text)
    for line in [*report.verdict_lines, *(f"  - {r}" for r in quality.reasons[1:])]:
        (log.warning if quality.verdict != "ok" else log.info)("%s", line)
