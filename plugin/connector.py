"""Pull particles from a CryoSPARC job, run the engine, push poses and maps into a new External job.

Steps, all server traffic through the seam :class:`plugin.server.CryoSPARCServer`:

1. check the source job has the output, load it (all slots) as a ``Dataset``;
2. find the images: read them from the project folder when it is mounted here, otherwise stream each
   stack through the API into ``OUT/cryosparc_input/images/`` (deleted afterwards unless kept);
3. create an External job in the workspace, connect the input, mark it running;
4. run :func:`cryofastar_core.job.run` on ``OUT/cryosparc_input/particles.cs`` (progress into the job log);
5. save ``particles`` (slot ``alignments3D``, everything else passed through from the input) and
   ``volume`` (``map``, ``map_half_A``, ``map_half_B``, uploaded into the job folder); log the FSC
   (captioned with the pose-quality verdict), viewing-direction and confidence plots; show the map's
   projections as the job card's tile image; mark the job completed.

Any failure after step 3 marks the External job failed with the reason (secrets redacted) and is
re-raised. Nothing is ever written into the source job or the project folder except through the
External job.
"""
from __future__ import annotations

import filecmp
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from cryosparc.dataset import Dataset

from cryofastar_core import __version__
from cryofastar_core.runtime.errors import InputError
from cryofastar_core.io import read_map
from cryofastar_core.io.atomic_write import atomic_output
from cryofastar_core.io.paths import strip_cryosparc_prefix
from cryofastar_core.job import JOB_OPTIONS, JobConfig, Report, run
from plugin.credentials import redact

log = logging.getLogger(__name__)

INPUT_NAME = "input_particles"
PARTICLES_OUTPUT = "particles"
VOLUME_OUTPUT = "volume"
# Slot names as CryoSPARC's refinement jobs name them; every one has the "volume" data type.
VOLUME_SLOTS = [{"name": "map", "dtype": "volume"}, {"name": "map_half_A", "dtype": "volume"},
                {"name": "map_half_B", "dtype": "volume"}]
VOLUME_FILES = {"map": "map.mrc", "map_half_A": "half1.mrc", "map_half_B": "half2.mrc"}
TILE_FILE = "cryosparc_tile.png"  # the job card's picture, kept in the local work folder
INPUT_DIR = "cryosparc_input"
IMAGES = ("auto", "mounted", "stream")
CLASS_AVERAGES_FLAG = "--class-averages-from"


def job_option_names() -> list[str]:
    """The user job options, keyword arguments in the engine's field names: one per declared job option
    (cryofastar_core.job.options). The connector sets particles, out_dir and project_dir itself."""
    return [opt.name for opt in JOB_OPTIONS]


def engine_config(options: dict[str, Any], particles: Path, out_dir: Path, project_dir: Path | None) -> JobConfig:
    """A validated :class:`JobConfig` from user job options (``views=16, device="cuda", ...``)."""
    unknown = sorted(set(options) - set(job_option_names()))
    if unknown:
        raise InputError(None, ", ".join(unknown), "unknown job option(s)",
                         f"use only {', '.join(job_option_names())}")
    cfg = JobConfig(particles=Path(particles), out_dir=Path(out_dir), project_dir=project_dir, **options)
    cfg.validate()
    return cfg


def parse_output_ref(text: str, flag: str = "--particles", example: str = "J42.particles") -> tuple[str, str]:
    """``"J42.particles"`` -> ``("J42", "particles")``."""
    job, sep, output = str(text).strip().partition(".")
    if not sep or not job or not output or not job[0] in "Jj" or not job[1:].isdigit():
        raise InputError(None, flag, f"'{text}' is not JOB.OUTPUT", f"name the job and its output, e.g. {flag} {example}")
    return "J" + job[1:], output


@dataclass
class ConnectorConfig:
    """One connector run. ``project_dir`` overrides where the project folder is mounted on this machine."""

    project: str
    workspace: str
    particles: str  # "J42.particles"
    out_dir: Path
    class_averages: str | None = None  # "J41.class_averages": the 2D classification the particles carry
    options: dict[str, Any] = field(default_factory=dict)
    title: str = "CryoFastAR poses"
    project_dir: Path | None = None
    images: str = "auto"  # auto | mounted | stream
    keep_streamed: bool = False
    secrets: tuple[str, ...] = ()  # redacted from anything sent to the server

    def validate(self) -> None:
        if self.images not in IMAGES:
            raise InputError(None, "--images", f"unknown mode '{self.images}'", f"use one of {', '.join(IMAGES)}")
        for name, uid, letter in (("--project", self.project, "P"), ("--workspace", self.workspace, "W")):
            if not uid or uid[0].upper() != letter or not uid[1:].isdigit():
                raise InputError(None, name, f"'{uid}' is not a {letter}-number uid", f"use e.g. {letter}3")
        if self.class_averages is not None:
            parse_output_ref(self.class_averages, CLASS_AVERAGES_FLAG, "J41.class_averages")


@dataclass
class ConnectorResult:
    """What a connector run produced."""

    external_job: str
    report: Report
    out_dir: Path
    n_particles_saved: int
    image_source: str  # "mounted" or "streamed"
    map_paths: dict[str, str]  # slot -> project-relative path in the External job folder


@dataclass
class _Source:
    """The checked source particles and where their images are read from."""

    job: str
    output: str
    particles: Dataset
    blob_paths: list[str]
    image_root: Path | None
    image_source: str  # "mounted" or "streamed"
    averages: Dataset | None = None  # the class averages of the particles' 2D classification, when given


def run_connector(server, cfg: ConnectorConfig) -> ConnectorResult:
    """Run the whole round trip (module docstring). ``server`` speaks :class:`plugin.server.CryoSPARCServer`."""
    cfg.validate()
    src_job, src_output = parse_output_ref(cfg.particles)
    out = Path(cfg.out_dir)
    input_cs = out / INPUT_DIR / "particles.cs"
    # Options are checked before anything is created on the server.
    engine_config(cfg.options, input_cs, out, None)
    src = _load_source(server, cfg, src_job, src_output)
    ext = _create_external_job(server, cfg, src, out)
    job_log = _JobLog(server, cfg.project, ext, cfg.secrets)
    try:
        report, saved, map_paths = _work_in_external_job(server, cfg, ext, src, out, input_cs, job_log)
    except BaseException as exc:
        _mark_failed(server, cfg, ext, exc)
        raise
    finally:
        if src.image_source == "streamed" and not cfg.keep_streamed:
            shutil.rmtree(out / INPUT_DIR / "images", ignore_errors=True)
    return ConnectorResult(external_job=ext, report=report, out_dir=out, n_particles_saved=saved,
                           image_source=src.image_source, map_paths=map_paths)


def _load_source(server: Any, cfg: ConnectorConfig, src_job: str, src_output: str) -> _Source:
    """Check the source job has the output, load its particles (all slots), check them, find their images."""
    _require_output(server, cfg.project, src_job, src_output, "--particles")
    particles = server.load_output(cfg.project, src_job, src_output, slots="all")
    _check_particles(particles, cfg.particles)
    averages = _load_class_averages(server, cfg, particles) if cfg.class_averages is not None else None
    blob_paths = _blob_paths(particles) + ([] if averages is None else _blob_paths(averages))
    blob_paths = list(dict.fromkeys(blob_paths))
    image_root, image_source = _image_source(server, cfg, blob_paths)
    return _Source(job=src_job, output=src_output, particles=particles, blob_paths=blob_paths,
                   image_root=image_root, image_source=image_source, averages=averages)


def _require_output(server: Any, project: str, job: str, output: str, flag: str) -> None:
    """Refuse, naming the flag and the outputs the job has, a job without the named output."""
    outputs = server.find_job(project, job).outputs
    if output not in outputs:
        raise InputError(None, flag, f"job {job} has no output '{output}' (it has: {', '.join(outputs) or 'none'})",
                         f"use one of: {', '.join(f'{job}.{o}' for o in outputs) or 'another job'}")


def _load_class_averages(server: Any, cfg: ConnectorConfig, particles: Dataset) -> Dataset:
    """The class averages output named by ``cfg.class_averages`` (blob slot), after checking that the particles
    carry the 2D classification they belong to (the engine matches ``alignments2D/class`` to ``blob/idx``)."""
    job, output = parse_output_ref(cfg.class_averages, CLASS_AVERAGES_FLAG, "J41.class_averages")
    if "alignments2D/class" not in particles.fields():
        raise InputError(None, f"{cfg.particles} alignments2D/class", "the particles carry no 2D classification",
                         "give the particles output of the same 2D classification or Select 2D job "
                         f"(or leave out {CLASS_AVERAGES_FLAG})")
    _require_output(server, cfg.project, job, output, CLASS_AVERAGES_FLAG)
    averages = server.load_output(cfg.project, job, output, slots=["blob"])
    missing = [f for f in ("blob/path", "blob/idx") if f not in averages.fields()]
    if len(averages) == 0 or missing:
        raise InputError(None, f"{cfg.class_averages} {', '.join(missing)}".strip(), "no class average images",
                         "choose the class averages output of a 2D classification or Select 2D job")
    return averages


def _create_external_job(server: Any, cfg: ConnectorConfig, src: _Source, out: Path) -> str:
    """Create the External job in the workspace; its uid."""
    desc = (f"CryoFastAR {__version__} feed-forward poses for {src.job}.{src.output} ({len(src.particles)} particles). "
            f"Local work folder: {out.resolve()}")
    ext = server.create_external_job(cfg.project, cfg.workspace, cfg.title, desc)
    log.info("created External job %s %s in %s", cfg.project, ext, cfg.workspace)
    return ext


def _work_in_external_job(server: Any, cfg: ConnectorConfig, ext: str, src: _Source, out: Path, input_cs: Path,
                          job_log: _JobLog) -> tuple[Report, int, dict[str, str]]:
    """Connect the input, mark the job running, run the engine, publish the outputs, mark it completed.
    Returns the engine's report, the number of particles saved and the map paths."""
    server.connect_input(cfg.project, ext, INPUT_NAME, src.job, src.output, ["blob", "?ctf"])
    server.start(cfg.project, ext)
    image_root = _prepare_input(server, cfg.project, src, out, input_cs, job_log)
    report = _run_engine(cfg, input_cs, out, image_root, job_log)
    saved, map_paths = _publish_outputs(server, cfg.project, ext, out, src.particles, report, job_log)
    server.stop(cfg.project, ext)
    return report, saved, map_paths


def _prepare_input(server: Any, project: str, src: _Source, out: Path, input_cs: Path, job_log: _JobLog) -> Path | None:
    """Say where the images come from, stream them if needed and write the input copy; the image folder."""
    image_root = src.image_root
    where = ("read from the project folder at " + str(image_root) if src.image_source == "mounted"
             else "streamed through the API")
    job_log(f"CryoFastAR {__version__}: {len(src.particles)} particles from {src.job}.{src.output}; images {where}")
    out.mkdir(parents=True, exist_ok=True)
    (out / INPUT_DIR).mkdir(exist_ok=True)
    if src.image_source == "streamed":
        image_root = out / INPUT_DIR / "images"
        _stream_images(server, project, src.blob_paths, image_root, job_log)
    _save_if_changed(src.particles, input_cs)
    if src.averages is not None:  # beside the particles, named as the engine looks for it (io/cs_class2d.py)
        _save_if_changed(src.averages, input_cs.with_name("class_averages.cs"))
    return image_root


def _run_engine(cfg: ConnectorConfig, input_cs: Path, out: Path, image_root: Path | None, job_log: _JobLog) -> Report:
    """Run the engine on the input copy, progress and a summary into the job log."""
    job_cfg = engine_config(cfg.options, input_cs, out, image_root)
    report = run(job_cfg, progress=job_log.progress)
    job_log(f"poses done: {report.n_kept} of {report.n_particles} particles kept, {report.resolution_text}, "
            f"box {report.box}, {report.apix:.3f} Å/px")
    return report


def _publish_outputs(server: Any, project: str, job: str, out: Path, particles: Dataset, report: Report,
                     job_log: _JobLog) -> tuple[int, dict[str, str]]:
    """Save both outputs, log the plots, set the tile image and write the closing log lines.
    Returns the number of particles saved and the map paths."""
    saved = _save_particles(server, project, job, out / "particles.cs", particles)
    map_paths = _save_volume(server, project, job, out)
    class_volumes = _save_class_volumes(server, project, job, out, report)
    _log_plots(server, project, job, out, report)
    server.set_tile_image(project, job, write_tile_image(out / VOLUME_FILES["map"], out / TILE_FILE))
    job_log(f"outputs: '{PARTICLES_OUTPUT}' ({saved} particles, alignments3D + passthrough) and "
            f"'{VOLUME_OUTPUT}' (map, half maps{'; class 1 of ' + str(len(report.classes)) if report.classes else ''})"
            f"{''.join(f', {n!r}' for n in class_volumes)}. Continue with Homogeneous Reconstruction Only, or Local "
            "Refinement (with a mask), or use the map as the initial model of a Homogeneous/NU refinement.")
    for line in report.verdict_lines:  # last in the job log, where the user looks
        job_log(line)
    return saved, map_paths


def _mark_failed(server: Any, cfg: ConnectorConfig, ext: str, exc: BaseException) -> None:
    """Stop the External job with the failure's reason (secrets redacted); a failure to do so is only logged."""
    reason = redact(_describe(exc), cfg.secrets)
    try:
        server.stop(cfg.project, ext, error=f"CryoFastAR failed: {reason}")
    except Exception as stop_exc:  # the original failure matters more than this one
        log.warning("could not mark External job %s failed: %s", ext,
                    redact(f"{type(stop_exc).__name__}: {stop_exc}", cfg.secrets))


def run_in_cryosparc(cs, project: str, workspace: str, particles: str, *, out_dir: str | Path | None = None,
                     title: str = "CryoFastAR poses", project_dir: str | Path | None = None, images: str = "auto",
                     keep_streamed: bool = False, class_averages: str | None = None, **job_options) -> ConnectorResult:
    """Notebook entry: ``run_in_cryosparc(cs, "P3", "W1", "J42.particles", views=128, device="cuda")``.

    ``class_averages`` (``"J41.class_averages"``): the class averages of the 2D classification the particles
    carry (``alignments2D``); the engine then poses the averages and composes each particle's pose.

    ``cs`` is a connected ``cryosparc.tools.CryoSPARC`` (5.x). ``job_options`` are the engine's
    settings (:class:`cryofastar_core.job.JobConfig` fields, e.g. ``weights``, ``views``,
    ``candidates``, ``anchors``, ``refine_iters``, ``keep_fraction``, ``device``). Local outputs go to
    ``out_dir`` (default ``./cryofastar_<project>_<job>_<output>``). Returns a :class:`ConnectorResult`.
    """
    from plugin.server import CryoSPARCServer

    server = cs if getattr(cs, "cryofastar_seam", False) else CryoSPARCServer(cs)
    cfg = ConnectorConfig(project=project, workspace=workspace, particles=particles,
                          out_dir=Path(out_dir) if out_dir is not None else default_out_dir(project, particles),
                          options=job_options, title=title, project_dir=Path(project_dir) if project_dir else None,
                          images=images, keep_streamed=keep_streamed, class_averages=class_averages)
    return run_connector(server, cfg)


def default_out_dir(project: str, particles: str) -> Path:
    job, output = parse_output_ref(particles)
    return Path(f"cryofastar_{project}_{job}_{output}")


# --- helpers ---------------------------------------------------------------------------------------
class _JobLog:
    """Job event log: plain lines, and one live progress line per stage (a repeated ``name``, 5.x)."""

    def __init__(self, server, project: str, job: str, secrets: tuple[str, ...], min_interval_s: float = 2.0):
        self.server, self.project, self.job, self.secrets = server, project, job, secrets
        self.min_interval_s = min_interval_s
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, text: str, level: str = "text", name: str | None = None) -> None:
        self.server.log(self.project, self.job, redact(text, self.secrets), level=level, name=name)

    def progress(self, stage: str, done: int, total: int) -> None:
        """The CryoSPARC front end's renderer of the engine's progress (:class:`cryofastar_core.runtime.progress.Progress`)."""
        # At most one update per few seconds or 10 %, and always the last one, to spare the API.
        now = time.monotonic()
        pct = int(100 * done / max(total, 1))
        last_t, last_pct = self._last.get(stage, (-1e9, -100))
        if done < total and now - last_t < self.min_interval_s and pct - last_pct < 10:
            return
        self._last[stage] = (now, pct)
        bar = "#" * (pct // 5) + "-" * (20 - pct // 5)
        self(f"{stage}: [{bar}] {pct}% ({done}/{total})", name=f"progress_{stage}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = str(exc)
    return text if isinstance(exc, InputError) else f"{type(exc).__name__}: {text}"


def _check_particles(ds: Dataset, ref: str) -> None:
    if len(ds) == 0:
        raise InputError(None, ref, "the output holds no particles", "choose a particle output with particles")
    missing = [f for f in ("blob/path", "blob/idx", "blob/psize_A") if f not in ds.fields()]
    if missing:
        raise InputError(None, f"{ref} {', '.join(missing)}", "the particles have no images (blob slot)",
                         "choose an output of an Extract, Restack or refinement job that carries the blob slot")


def _blob_paths(ds: Dataset) -> list[str]:
    values = [v.decode() if isinstance(v, bytes) else str(v) for v in ds["blob/path"]]
    return list(dict.fromkeys(strip_cryosparc_prefix(v) for v in values))


def _image_source(server, cfg: ConnectorConfig, blob_paths: list[str]) -> tuple[Path | None, str]:
    """``(folder the blob paths resolve against, "mounted")`` or ``(None, "streamed")``."""
    if cfg.images != "stream":
        root = cfg.project_dir if cfg.project_dir is not None else Path(str(server.project_dir(cfg.project)))
        missing = [p for p in blob_paths if not (root / p).is_file()]
        if not missing:
            return root, "mounted"
        if cfg.images == "mounted":
            raise InputError(root / missing[0], "blob/path", f"{len(missing)} of {len(blob_paths)} particle stacks "
                             "are not readable here", "mount the project folder (or pass --project-dir where it is "
                             "mounted), or use --images stream")
        log.info("project folder %s is not readable here (%d of %d stacks missing): streaming images through the API",
                 root, len(missing), len(blob_paths))
    absolute = [p for p in blob_paths if PurePosixPath(p).is_absolute()]
    if absolute:
        raise InputError(None, "blob/path", f"absolute image path {absolute[0]} cannot be streamed (only paths inside "
                         "the project folder can)", "mount that folder here and pass --project-dir, or re-extract")
    return None, "streamed"


def _stream_images(server, project: str, blob_paths: list[str], root: Path, job_log: _JobLog) -> None:
    """Download each stack once, into ``root/<blob path>``; complete files from an earlier run are kept."""
    for k, rel in enumerate(blob_paths):
        target = root / rel
        if not target.resolve().is_relative_to(root.resolve()):
            raise InputError(None, "blob/path", f"'{rel}' points outside the project folder", "fix the path")
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(target) as tmp:
                server.download_file(project, rel, tmp)
        job_log.progress("download", k + 1, len(blob_paths))


class _Unchanged(Exception):
    pass


def _save_if_changed(ds: Dataset, path: Path) -> None:
    """Write the input copy; an identical earlier copy is kept untouched so an interrupted run resumes
    (the engine's resume fingerprint includes the file's modification time)."""
    try:
        with atomic_output(path) as tmp:
            ds.save(tmp)
            if path.is_file() and filecmp.cmp(path, tmp, shallow=False):
                raise _Unchanged()  # atomic_output drops the temporary copy
    except _Unchanged:
        pass


def _save_particles(server, project: str, job: str, result_cs: Path, source: Dataset) -> int:
    """Save the engine's ``alignments3D`` as the ``particles`` output (rest passed through)."""
    result = Dataset.load(result_cs)
    known = set(np.asarray(source["uid"]).tolist())
    stray = [u for u in np.asarray(result["uid"]).tolist() if u not in known]
    if stray:
        raise RuntimeError(f"{result_cs}: {len(stray)} particle uids are not in the input (e.g. {stray[0]})")
    out = server.add_output(project, job, type="particle", name=PARTICLES_OUTPUT, slots=["alignments3D"],
                            passthrough=INPUT_NAME, title="Particles with CryoFastAR poses", alloc=result)
    if not np.array_equal(np.asarray(out["uid"]), np.asarray(result["uid"])):
        raise RuntimeError("the server allocated the particle output with other uids than the result")
    missing = []
    for name in out.fields():
        if name == "uid":
            continue
        if name in result.fields():
            out[name] = result[name]
        else:
            missing.append(name)
    if missing:
        log.warning("fields left at their defaults in the saved particles: %s", ", ".join(missing))
    server.save_output(project, job, PARTICLES_OUTPUT, out)
    return len(out)


def _save_volume(server, project: str, job: str, out: Path, files: dict[str, str] = VOLUME_FILES,
                 name: str = VOLUME_OUTPUT, title: str = "CryoFastAR map and half maps") -> dict[str, str]:
    """Upload map and half maps (``files``: slot -> file in ``out``) into the job folder and save the volume
    output ``name`` pointing at them."""
    paths: dict[str, str] = {}
    shapes: dict[str, tuple[int, int, int]] = {}
    apix = {}
    for slot, filename in files.items():
        data, apix[slot] = read_map(out / filename)
        shapes[slot] = data.shape
        upload = f"cryofastar_{slot}.mrc" if name == VOLUME_OUTPUT else f"cryofastar_{name}_{slot}.mrc"
        paths[slot] = server.upload_mrc(project, job, upload, data, apix[slot])
    vol = server.add_output(project, job, type="volume", name=name, slots=VOLUME_SLOTS, passthrough=None,
                            title=title, alloc=1)
    for slot in files:
        vol[f"{slot}/path"] = np.array([paths[slot]], dtype=object)
        if f"{slot}/shape" in vol.fields():
            vol[f"{slot}/shape"] = np.array([shapes[slot]])
        if f"{slot}/psize_A" in vol.fields():
            vol[f"{slot}/psize_A"] = apix[slot]
    server.save_output(project, job, name, vol)
    return paths


def _save_class_volumes(server, project: str, job: str, out: Path, report: Report) -> list[str]:
    """Several classes: one volume output per further class (``volume_class002``, ...; class 1 is
    ``volume``), so CryoSPARC's own jobs can take any class's map. Returns the outputs' names."""
    names = []
    for c in report.classes[1:]:
        if not c["files"]:
            continue
        stem = f"class{c['number']:03d}"
        files = {slot: f"{stem}_{VOLUME_FILES[slot]}" for slot in VOLUME_FILES}
        title = f"CryoFastAR class {c['number']} ({c['particles']} particles{', sink' if c['sink'] else ''})"
        _save_volume(server, project, job, out, files, f"volume_{stem}", title)
        names.append(f"volume_{stem}")
    return names


def fsc_caption(report: Report) -> str:
    """The FSC plot's line in the event log: the resolution (or why there is none) and the verdict."""
    verdict = str(report.quality.get("verdict", "not assessed")).upper()
    if report.resolution_0143 is None:
        return f"Half-map FSC: consistency only, not a resolution (pose quality: {verdict})"
    return f"Half-map FSC (0.143: {report.resolution_0143:.2f} Å; pose quality: {verdict})"


def write_tile_image(map_path: Path, target: Path) -> Path:
    """The job card's picture: the map projected along z, y and x, side by side, in grey (PNG)."""
    from matplotlib.image import imsave

    data, _ = read_map(map_path)
    vol = np.asarray(data, dtype=np.float64)
    panels = []
    for axis in range(3):
        proj = vol.sum(axis=axis)
        lo, hi = np.percentile(proj, [1.0, 99.5])
        panels.append(np.clip((proj - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0))
    gap = np.ones((panels[0].shape[0], max(1, panels[0].shape[1] // 16)))
    with atomic_output(target) as tmp:
        imsave(tmp, np.hstack([panels[0], gap, panels[1], gap, panels[2]]), cmap="gray", vmin=0.0, vmax=1.0,
               origin="lower", format="png")
    return target


def _log_plots(server, project: str, job: str, out: Path, report: Report) -> None:
    fsc_table = (out / "fsc.tsv").read_text() if (out / "fsc.tsv").is_file() else None
    fsc_text = fsc_caption(report)
    plots = [("fsc.png", fsc_text, fsc_table),
             ("viewing_directions.png", "Viewing directions", None),
             ("confidence.png", "Per-particle confidence", None),
             ("junk.png", "Junk: each particle's evidence for its pose (red: set apart)", None)]
    for filename, text, raw in plots:
        if (out / filename).is_file():
            server.log_plot(project, job, out / filename, text, raw_data=raw)
