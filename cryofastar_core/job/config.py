"""Every setting of one run: JobConfig, and the user options every front end derives its flags from."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from cryofastar_core.commonlines.config import COMMON_LINES
from cryofastar_core.job.options import JobOption, option, options_of
from cryofastar_core.refine.classes import MAX_CLASSES
from cryofastar_core.runtime.errors import InputError, WeightsError
from cryofastar_core.weights import resolve_weights


@dataclass
class JobConfig:
    """Every setting of one run; validated by :meth:`validate` before any work."""

    # The fields declared with option() are the user options: the one declaration every front end
    # derives its flags, GUI parameters, job options and step-file keys from (cryofastar_core.job.options;
    # the list is JOB_OPTIONS below). Help is one line of plain text for a facility user; the default is
    # appended where it is shown. particles, out_dir and project_dir are set by each front end its own way.
    particles: Path
    out_dir: Path
    weights: str = option("default", "shipped weights name or a weights file, or common-lines (classical common "
                          "lines, no weights: for clean or class-average-like images)")
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
    # The class-average route (job/class_route.py): on the class averages' SNR the classical estimator is far
    # more accurate than the shipped network (bench/model_accuracy.py; the model card's table).
    class_averages: str = option("auto", "particles from a 2D classification (RELION Class2D or Select, CryoSPARC 2D "
                                 "classification or Select 2D): pose their class averages "
                                 "and give each particle its class's pose turned by its own 2D alignment (auto), "
                                 "or ignore the 2D classification (off)", choices=("auto", "off"))
    class_poses: str = option("common-lines", "how class averages are posed: common-lines, or a weights name or "
                              "file as for --weights")
    # On by default: the feed-forward poses alone are tens of degrees off and refinement brings them to a
    # few degrees (bench/refine_benchmark.py; the results under bench/results/).
    refine_iters: int = option(3, "refinement iterations after the feed-forward poses and the global passes "
                               "(0: feed-forward poses only)", minimum=0,
                               fix="use 0 (off) or a small number such as 3")
    refine_global: bool = option(True, "when refining, first assign every particle globally (15 deg grid) against "
                                 "the feed-forward map, so poses tens of degrees off can still be refined")
    # Refinement works smaller than the input (cryofastar_core/job/work_scale.py): the ab initio passes on a
    # subset at a cropped box, then every particle locally at the box that reaches target_resolution.
    target_resolution: float | None = option(None, "resolution (Å) the job's local refinement aims at; it works at "
                                             "the smallest box that reaches it and leaves finer work to the host's "
                                             "refinement", default_text="what a 64 px box reaches",
                                             minimum=0, open_min=True,
                                             fix="use e.g. 8 (Å)")
    ab_initio_particles: int = option(2000, "particles (drawn at random, balanced over the half sets) the ab initio "
                                      "passes use before every particle is assigned (0: all)", minimum=0,
                                      fix="use 0 (all) or e.g. 5000")
    keep_junk: bool = option(False, "when refining, keep in the maps the particles that show no evidence for any "
                             "pose (junk); they are found and reported either way")
    # Several classes (refine/classes.py): the one-class global passes settle a consensus, then the classes
    # are found by global passes that weigh each particle into every class (tests/test_classes.py).
    classes: int = option(1, "classes in the ab initio: several conformations (or junk of another protein) each "
                          "build their own map; maps, FSC and verdict per class, rlnClassNumber per particle",
                          minimum=1, maximum=MAX_CLASSES, fix=f"use 1 to {MAX_CLASSES} classes")
    # A one-class run whose particles fail the split test (evaluation/heterogeneity.py) holds two structures;
    # the classes then set the other one apart (tests/test_classes.py; bench/results/2026-12-06-classes.md).
    split_mixed: bool = option(True, "with one class, when the particles split reproducibly into two structures "
                               "(another protein or conformation), continue as two classes; off: one class, and "
                               "the verdict says doubtful")
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
    threads: int | None = option(None, "CPU threads", default_text="the CPUs this process may use", minimum=1,
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
        if self.classes > 1 and (self.refine_iters == 0 or not self.refine_global):
            raise InputError(None, "classes", "classes are found by refinement's global passes, which are off",
                             "refine (refine_iters 1 or more, refine_global on) or use 1 class")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(None, "device", "CUDA was asked for but no GPU is visible", "use auto or cpu")

    def check_class_poses(self) -> None:
        """Raises InputError when ``class_poses`` names no pose model (checked with the weights, before the
        particles are posed, whether or not they carry class averages; not checked when the route is off)."""
        if self.class_averages == "off" or self.class_poses == COMMON_LINES:
            return
        try:
            resolve_weights(self.class_poses)
        except WeightsError:
            raise InputError(self.class_poses, "class_poses", "neither common lines nor a weights file or shipped "
                             "weights name",
                             f"use {COMMON_LINES} or a file written by `cryofastar train` or `train-lines`") from None

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


# The job's user options, in declaration order (cryofastar_core.job.options).
JOB_OPTIONS: tuple[JobOption, ...] = options_of(JobConfig)


def settings_of(cfg: JobConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}

