"""Training configuration: a curriculum of stages plus model, loss and optimiser settings, read from YAML.

One YAML file describes a whole run::

    box: 64
    model: {size: XS, overrides: {}}
    loss: {}                      # LossConfig fields (cryofastar_core.model)
    optimizer: {betas: [0.9, 0.95], weight_decay: 0.05, grad_clip: 1.0}
    seed: 0
    stages:
      - {name: A, steps: 2000, batch_size: 8, views_min: 4, views_max: 8, volumes: single}
      - {name: B, steps: 20000, batch_size: 8, views_min: 8, views_max: 32, snr_start: 10, snr_end: 0.1}

A file may also hold a single stage as ``stage: {...}`` instead of ``stages: [...]``.
Validation happens once, here: unknown keys, wrong types and bad values raise
:class:`~cryofastar_core.runtime.errors.InputError` naming the file and the key (reading and typing follow
:mod:`cryofastar_core.runtime.yaml_config`, shared with ``cryofastar run`` step files).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional

from cryofastar_core.runtime.errors import InputError
from cryofastar_core.runtime.yaml_config import build_dataclass, read_yaml_mapping, require_mapping


@dataclass
class StageConfig:
    """One curriculum stage.

    Each step draws ``batch_size`` samples (the global batch, split over distributed ranks); a sample
    is ``V`` views of ONE volume, with ``V`` drawn per step uniformly in ``[views_min, views_max]``.
    ``snr_start``/``snr_end``: signal-to-noise ratio (per-image signal variance / noise variance),
    ramped log-linearly over the stage; ``None`` (both) means clean images. ``volumes``: ``single``
    trains on entry ``single_index`` of the library split ``split``, ``library`` on all of it (real
    structures plus ``n_pseudo`` pseudo-molecules, ``training.volumes.VolumeLibrary``); validation
    uses the ``heldout`` split (or, for ``single``, new poses of the same volume).
    ``max_tilt_start``/``max_tilt_end`` (degrees, ramped linearly over the stage): the largest angle
    between an auxiliary view's viewing direction and the reference's (in-plane angle always uniform);
    180 (the default) is Haar-uniform. Small tilts first make the relative pose learnable from
    image similarity before views become unrelated-looking (a curriculum on pose difficulty).
    """

    name: str
    steps: int
    batch_size: int
    views_min: int = 4
    views_max: int = 8
    snr_start: Optional[float] = None
    snr_end: Optional[float] = None
    ctf: bool = False
    max_shift_px: float = 0.0
    volumes: Literal["single", "library"] = "library"
    single_index: int = 0
    split: Literal["train", "heldout", "eval"] = "train"
    n_pseudo: int = 0
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 0
    # CTF draws (used when ctf is true): defocus uniform in [defocus_min, defocus_max] Å,
    # |U - V| uniform in [0, astigmatism_max] Å at a uniform random angle.
    defocus_min: float = 5000.0
    defocus_max: float = 30000.0
    astigmatism_max: float = 1000.0
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor_max: float = 0.0
    # Pixel size jitter (Å/px), uniform per sample: only scales the CTF's frequency axis.
    apix_min: float = 1.0
    apix_max: float = 6.0
    max_tilt_start: float = 180.0
    max_tilt_end: float = 180.0
    # Fraction of samples drawn as rung 1 (clean, no CTF, no shifts) so a later rung keeps what the
    # first taught: the shipped R4 segment without it fell back to chance on clean images (docs/model-history.md).
    clean_fraction: float = 0.0

    def validate(self, path: str | Path | None, where: str) -> None:
        def bad(key: str, problem: str, fix: str) -> InputError:
            return InputError(path, f"{where}.{key}", problem, fix)

        if not self.name:
            raise bad("name", "is empty", "give the stage a name")
        for key in ("steps", "batch_size"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}", f"set a positive {key}")
        if self.views_min < 4:
            # Two (or three) views leave a free dihedral angle; with many structures the target is
            # ambiguous, so training never uses them.
            raise bad("views_min", f"must be >= 4, got {self.views_min}", "train with at least 4 views per sample")
        if self.views_max < self.views_min:
            raise bad("views_max", f"{self.views_max} is below views_min {self.views_min}", "set views_max >= views_min")
        if (self.snr_start is None) != (self.snr_end is None):
            raise bad("snr_end" if self.snr_end is None else "snr_start", "snr_start and snr_end must be both set or both absent",
                      "give both (noisy stage) or neither (clean stage)")
        for key in ("snr_start", "snr_end"):
            v = getattr(self, key)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise bad(key, f"must be a positive finite number, got {v}", "use e.g. 10 or 0.1")
        for key in ("max_tilt_start", "max_tilt_end"):
            if not 0 <= getattr(self, key) <= 180:
                raise bad(key, f"must be in [0, 180] degrees, got {getattr(self, key)}", "use e.g. 30 or 180")
        if not 0 <= self.clean_fraction <= 1:
            raise bad("clean_fraction", f"must be in [0, 1], got {self.clean_fraction}", "use e.g. 0 or 0.25")
        if self.max_shift_px < 0:
            raise bad("max_shift_px", "must be >= 0", "use e.g. 0, 2.5 or 5")
        if self.single_index < 0:
            raise bad("single_index", "must be >= 0", "use an index into the volume library")
        if self.n_pseudo < 0:
            raise bad("n_pseudo", "must be >= 0", "use 0 or a positive count")
        if not (self.lr > 0):
            raise bad("lr", f"must be > 0, got {self.lr}", "use e.g. 1e-4")
        if not (0 <= self.min_lr <= self.lr):
            raise bad("min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}", "use e.g. 1e-6")
        if not (0 <= self.warmup_steps <= self.steps):
            raise bad("warmup_steps", f"must be in [0, steps={self.steps}], got {self.warmup_steps}", "lower it")
        if not (0 < self.defocus_min <= self.defocus_max):
            raise bad("defocus_max", "need 0 < defocus_min <= defocus_max (Å)", "use e.g. 5000 and 30000")
        for key in ("astigmatism_max", "bfactor_max"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0", "use 0 or a positive value")
        if not (0 < self.apix_min <= self.apix_max):
            raise bad("apix_max", "need 0 < apix_min <= apix_max (Å/px)", "use e.g. 1.0 and 6.0")
        if not (self.voltage > 0 and self.cs >= 0 and 0 <= self.amplitude_contrast < 1):
            raise bad("voltage", "voltage > 0, cs >= 0 and 0 <= amplitude_contrast < 1 are required",
                      "use 300, 2.7 and 0.1")


@dataclass
class ModelSection:
    """``size``: XS/S/M/L (``cryofastar_core.model.model_config``); ``overrides``: ModelConfig fields."""

    size: str = "XS"
    overrides: dict = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    """AdamW and global-norm gradient clipping (``None``: off)."""

    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    eps: float = 1e-8
    grad_clip: Optional[float] = 1.0

    def validate(self, path: str | Path | None) -> None:
        if not all(0 <= b < 1 for b in self.betas):
            raise InputError(path, "optimizer.betas", f"must be two numbers in [0, 1), got {list(self.betas)}", "use [0.9, 0.95]")
        if self.weight_decay < 0 or self.eps <= 0:
            raise InputError(path, "optimizer.weight_decay", "weight_decay must be >= 0 and eps > 0", "use 0.05 and 1e-8")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise InputError(path, "optimizer.grad_clip", "must be > 0 or null", "use 1.0, or null to switch clipping off")


@dataclass
class TrainConfig:
    """A whole training run. ``stages`` run in order; the LR schedule restarts (warm-up + cosine) per stage.

    ``checkpoint_every``/``log_every``/``val_every`` count global steps (``val_every`` 0: at checkpoints).
    ``val_samples``: held-out samples scored by Kabsch rotation error. ``volume_cache``: how many
    prepared volume transforms stay on the device. ``cache_dir``: the volume library's cache
    (relative paths are relative to the config file). ``export_half``: ``auto`` exports the final
    weights in fp16 when the model has more than 20 M parameters. ``init_weights``: optional weights
    file to start from (fine-tuning; relative to the config file).
    """

    box: int
    stages: list[StageConfig]
    model: ModelSection = field(default_factory=ModelSection)
    loss: dict = field(default_factory=dict)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 50
    val_every: int = 0
    val_samples: int = 4
    bf16: bool = True
    activation_checkpointing: bool = False
    volume_cache: int = 64
    cache_dir: Optional[str] = None
    export_half: Literal["auto", "true", "false"] = "auto"
    init_weights: Optional[str] = None

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def to_dict(self) -> dict:
        """Plain types only (lists, dicts, str, int, float, bool, None): safe for YAML and weights-only checkpoints."""
        return _plain(dataclasses.asdict(self))

    def validate(self, path: str | Path | None) -> None:
        if self.box < 8 or self.box % 2:
            raise InputError(path, "box", f"must be an even number >= 8, got {self.box}", "use 64 or 128")
        if not self.stages:
            raise InputError(path, "stages", "no stages", "add at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise InputError(path, "stages", f"stage names repeat: {names}", "give every stage a unique name")
        for i, s in enumerate(self.stages):
            s.validate(path, f"stages[{i}]")
        self.optimizer.validate(path)
        for key in ("checkpoint_every", "log_every", "val_samples", "volume_cache"):
            if getattr(self, key) < 1:
                raise InputError(path, key, f"must be >= 1, got {getattr(self, key)}", "use a positive integer")
        if self.val_every < 0:
            raise InputError(path, "val_every", "must be >= 0", "use 0 (validate at checkpoints) or a step count")
        self._validate_model_and_loss(path)

    def _validate_model_and_loss(self, path: str | Path | None) -> None:
        """Build the model and loss configs once, so a typo fails now and not after hours of setup."""
        from cryofastar_core.model import LossConfig, model_config

        try:
            model_config(self.model.size, self.box, **self.model.overrides)
        except (TypeError, ValueError) as exc:
            raise InputError(path, "model", str(exc), "use size XS/S/M/L and ModelConfig field names in overrides") from None
        try:
            LossConfig(**self.loss)
        except (TypeError, ValueError) as exc:
            names = ", ".join(f.name for f in fields(LossConfig))
            raise InputError(path, "loss", str(exc), f"use LossConfig fields: {names}") from None


def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a training YAML (see the module docstring)."""
    path = Path(path)
    return train_config_from_dict(read_yaml_mapping(path, "config"), path)


def continue_from(cfg: TrainConfig, from_stage: str | None, init_weights: str | None,
                  path: str | Path | None = None) -> TrainConfig:
    """``cfg`` starting at stage ``from_stage`` (earlier stages dropped) from ``init_weights``: how a
    curriculum continues from committed weights when the run folder's checkpoint is gone.

    ``init_weights`` comes from the command line, so it is relative to the working directory; it is
    kept absolute, as the config file's own paths are, because the run folder's ``config.yaml`` is
    read back from another folder when the run resumes."""
    if from_stage is not None:
        names = [s.name for s in cfg.stages]
        if from_stage not in names:
            raise InputError(path, "--from-stage", f"no stage named {from_stage!r}", f"use one of: {', '.join(names)}")
        cfg = dataclasses.replace(cfg, stages=cfg.stages[names.index(from_stage):])
    if init_weights is not None:
        cfg = dataclasses.replace(cfg, init_weights=str(Path(init_weights).expanduser().resolve()))
    return cfg


def train_config_from_dict(data: Any, path: str | Path | None = None) -> TrainConfig:
    """Validate a parsed YAML mapping into a :class:`TrainConfig`; errors name ``path`` and the key."""
    data = require_mapping(data, path)
    if "stage" in data:
        if "stages" in data:
            raise InputError(path, "stage", "both 'stage' and 'stages' are given", "keep one of them")
        data["stages"] = [data.pop("stage")]
    cfg = build_dataclass(TrainConfig, data, path)
    base = Path(path).parent if path is not None else Path(".")
    for key in ("cache_dir", "init_weights"):
        value = getattr(cfg, key)
        if value is not None and not Path(value).expanduser().is_absolute():
            setattr(cfg, key, str((base / Path(value).expanduser()).resolve()))
    cfg.validate(path)
    return cfg


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
