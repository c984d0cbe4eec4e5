"""``cryofastar-relion``: CryoFastAR as a RELION External job (RELION 3.1, 4.0 and 5.0).

RELION runs this with the project folder as the working directory::

    cryofastar-relion --o External/job012/ --in_parts Import/job001/particles.star \\
        --weights /path/weights.pt --gpu 0 --j 4

It runs :func:`cryofastar_core.job.run` with ``out_dir = --o`` and ``project_dir = .``, writes
``RELION_OUTPUT_NODES.star`` for the RELION version that owns the project, and then exactly one exit
marker: ``RELION_JOB_EXIT_SUCCESS``, ``_FAILURE`` (the reason is printed to stderr, i.e. ``run.err``) or
``_ABORTED`` (the GUI's Abort button, noticed between batches). Progress goes to stdout (``run.out``).
Nothing is written outside ``--o``. See ``relion_external/README.md``.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path

from cryofastar_core.runtime.errors import CryoFastARError, InputError
from cryofastar_core.runtime.exit_codes import INTERNAL_ERROR, INTERRUPTED, OK, Terminated, exit_code, sigterm_raises
from relion_external.markers import JobAborted, JobMarkers
from relion_external.nodes import detect_relion_version, job_output_nodes, write_output_nodes
from relion_external.protocol import (ADAPTER_PARAMS, INPUT_FLAGS, PARAMS, ExternalArgs, gui_names, job_settings,
                                      parse_external_args, particles_path, unused_flags)

PROG = "cryofastar-relion"
EXIT_ABORTED = INTERRUPTED  # RELION ignores exit codes; queue systems and shell chains see this one


class ProgressReporter:
    """The RELION front end's renderer of the engine's progress (:class:`cryofastar_core.runtime.progress.Progress`):
    a line in ``run.out`` every ``interval`` seconds per stage (and at each stage's end), and a poll for
    RELION's abort request at every call."""

    def __init__(self, markers: JobMarkers, interval: float = 2.0, stream=None):
        self.markers, self.interval = markers, interval
        self.stream = stream if stream is not None else sys.stdout
        self._last: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.markers.check_abort()
        now = time.monotonic()
        if done >= total or now - self._last.get(stage, -1e9) >= self.interval:
            self._last[stage] = now
            pct = 100.0 * done / total if total else 100.0
            print(f"{PROG}: {stage}: {done}/{total} particles ({pct:.0f} %)", file=self.stream, flush=True)


def note_verdict(job_dir: Path, report) -> None:
    """Append the pose-quality verdict to the job's ``note.txt``, which the GUI shows beside the job.

    RELION appends the command line to that file at each execution and the GUI's note editor saves
    it: only ever append, so neither loses what it wrote.
    """
    if not report.verdict_lines:
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(job_dir / "note.txt", "a", encoding="utf-8") as fh:
        fh.write(f"++++ {stamp} CryoFastAR: {report.resolution_text}\n")
        fh.writelines(f"++++ {line}\n" for line in report.verdict_lines)


def relion_version(params: dict[str, str | None], project_dir: Path, job_dir: Path) -> int:
    """The ``relion_version`` user parameter (3, 3.1, 4, 4.0, 5, 5.0) if given, else detected."""
    value = params.get("relion_version")
    if value:
        major = value.strip().split(".")[0]
        if major not in ("3", "4", "5"):
            raise InputError(None, "relion_version", f"'{value}' is not a RELION version this adapter knows",
                             "leave 'relion_version' empty (detected from default_pipeline.star), or use 3.1, 4.0 or 5.0")
        return int(major)
    return detect_relion_version(project_dir, job_dir)


def run_external_job(argv: list[str]) -> int:
    """Parse ``argv``, run the job, write nodes and exactly one exit marker; return the exit code."""
    # The output folder first, so that even a bad command line ends with a FAILURE marker RELION can see.
    try:
        args = parse_external_args(argv)
    except CryoFastARError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return exit_code(exc)

    project = Path.cwd()
    job_dir = Path(args.out_dir)
    markers = JobMarkers(job_dir)
    status, code = "failure", INTERNAL_ERROR
    try:
        _run_job(args, project, job_dir, markers)
        status, code = "success", OK
    except (JobAborted, CryoFastARError, Terminated, KeyboardInterrupt, Exception) as exc:
        status, code = _report_failure(exc, args)
    finally:
        markers.finish(status)
    return code


def _run_job(args: ExternalArgs, project: Path, job_dir: Path, markers: JobMarkers) -> None:
    """Check the settings, run the engine (polling for RELION's abort), write the output nodes and report."""
    from cryofastar_core.job import JobConfig, run

    settings = job_settings(args)
    particles = particles_path(args)
    version = relion_version(args.params, project, job_dir)
    _announce(args, project, version, particles, settings)
    markers.check_abort()

    cfg = JobConfig(particles=particles, out_dir=job_dir, project_dir=project, **settings)
    report = run(cfg, progress=ProgressReporter(markers))
    write_output_nodes(job_dir, job_output_nodes(args.out_dir), version)
    print(f"{PROG}: done: {report.n_kept} of {report.n_particles} particles kept; {report.resolution_text}; "
          f"outputs in {args.out_dir}", flush=True)
    note_verdict(job_dir, report)
    for line in report.verdict_lines:
        print(f"{PROG}: {line}", flush=True)


def _announce(args: ExternalArgs, project: Path, version: int, particles: Path, settings: dict) -> None:
    """The job's opening lines in ``run.out``: what runs on what, and the inputs and flags it does not use."""
    print(f"{PROG}: project {project}; output {args.out_dir}; RELION {version}.x pipeline", flush=True)
    print(f"{PROG}: particles {particles}; settings {settings}", flush=True)
    for flag in ("in_3dref", "in_mask"):
        if flag in args.inputs:
            print(f"{PROG}: note: --{flag} {args.inputs[flag]} is not used (poses are estimated "
                  "without a reference)", flush=True)
    ignored = unused_flags(args)
    if ignored:
        print(f"{PROG}: note: ignoring {' '.join(ignored)}", flush=True)


def _report_failure(exc: BaseException, args: ExternalArgs) -> tuple[str, int]:
    """Print why the job ended early (stdout and/or ``run.err``); the exit marker's status and the exit code.

    The cases are tried in this order, as ``except`` clauses would be: an abort, bad input, SIGTERM,
    Ctrl-C, then anything else (a bug: the traceback is kept for the report). Called while ``exc`` is
    being handled, so ``traceback.print_exc`` prints it."""
    if isinstance(exc, JobAborted):
        print(f"{PROG}: aborted: {exc}", flush=True)
        print(f"{PROG}: aborted by the user; no outputs were written", file=sys.stderr, flush=True)
        return "aborted", EXIT_ABORTED
    if isinstance(exc, CryoFastARError):
        exc = exc.renamed(gui_names(args.params))
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
    elif isinstance(exc, Terminated):  # SIGTERM unwinds so the job is marked failed, not left running
        print(f"{PROG}: error: terminated (SIGTERM: cancelled, or the queue's time limit). "
              "Run the job again ('Continue') to resume after the pose estimate", file=sys.stderr, flush=True)
    elif isinstance(exc, KeyboardInterrupt):
        print(f"{PROG}: error: interrupted", file=sys.stderr, flush=True)
    else:  # a bug, not bad input: keep the traceback for the report
        traceback.print_exc(file=sys.stderr)
        print(f"{PROG}: error: unexpected {type(exc).__name__}: {exc}. Please report this with run.err attached",
              file=sys.stderr, flush=True)
    return "failure", exit_code(exc)


def usage() -> str:
    """What ``--help`` prints: how RELION calls the program and the parameters it reads."""
    params = ", ".join([*PARAMS, *ADAPTER_PARAMS])
    return (f"usage: {PROG} --o External/jobNNN/ --in_parts PARTICLES.star [--PARAM VALUE ...] [--j THREADS]\n\n"
            "CryoFastAR as a RELION External job: feed-forward poses and a map from particles.\n"
            "RELION runs it with the project folder as the working directory and passes --o; set it up\n"
            "in the GUI's External job tab (relion_external/README.md).\n\n"
            f"input nodes: {', '.join('--' + f for f in INPUT_FLAGS)} (only --in_parts is used)\n"
            f"parameters (typed without dashes as the GUI's labels): {params}\n"
            "outputs in --o: particles.star, map.mrc, half1.mrc, half2.mrc, fsc.*, plots, report.json,\n"
            "with classes > 1 also classNNN_map.mrc, _half1.mrc, _half2.mrc, _fsc.tsv per further class,\n"
            "RELION_OUTPUT_NODES.star and one RELION_JOB_EXIT_* marker.\n")


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``cryofastar-relion = relion_external.main:main``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in args):
        print(usage(), end="")  # help writes nothing, not even an exit marker
        return 0
    # Progress goes to run.out through ProgressReporter only (stderr is run.err, where the GUI shows
    # errors). Headless plotting.
    os.environ.setdefault("MPLBACKEND", "Agg")
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    with sigterm_raises():  # scancel or a queue's time limit: see run_external_job
        return run_external_job(args)


if __name__ == "__main__":
    sys.exit(main())
