"""The training loop: curriculum stages, AdamW with warm-up + cosine, bf16 on CUDA, checkpoints, resume, DDP.

Run folder (only rank 0 writes)::

    config.yaml      the validated configuration of the run
    metrics.csv      step, stage, views, snr, lr, loss terms, views/s, TFLOP/s, validation errors
    checkpoint.pt    latest full state (model, optimiser, schedule position, RNG); weights-only loadable
    loss.png         loss curves, refreshed at every checkpoint
    weights.pt       final model (cryofastar_core.model.save_weights), written when the run stops
    summary.json     throughput and FLOP estimates

Distributed: under ``torchrun`` each rank simulates its share of the GLOBAL batch (``batch_size /
world_size`` samples, seeded per global sample index), so the data and the averaged gradients do not
depend on the number of ranks. The launch is read, the rank's GPU picked and the process group joined
(gloo on CPU, NCCL on CUDA, one timeout) by :mod:`cryofastar_core.runtime.distributed`, as for ``cryofastar run``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import yaml
from torch import nn

from cryofastar_core.runtime.distributed import DistEnv, init_process_group, rank_device, shutdown
from cryofastar_core.runtime.errors import InputError
from cryofastar_core.geometry import mirror_rotations, rotation_angle_deg
from cryofastar_core.io.atomic_write import atomic_output

from cryofastar_core.training.config import StageConfig, TrainConfig
from cryofastar_core.training.data import VALIDATION_STREAM, BatchSimulator, TrainingBatch, VolumeFTCache, VolumeSource
from cryofastar_core.training.schedule import learning_rate, max_tilt_at, snr_at, stage_at, views_at

if TYPE_CHECKING:
    from cryofastar_core.model.loss import LossConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cryofastar-train-checkpoint"
CHECKPOINT_VERSION = 1
FIXED_COLUMNS = ["step", "stage", "views", "snr", "ctf", "lr"]
TAIL_COLUMNS = ["grad_norm", "views_per_s", "tflops", "val_rot_err_deg", "val_rot_err_mean_deg",
                "val_shift_err_px", "val_spread", "elapsed_s"]
HALF_EXPORT_PARAMS = 20_000_000
# Dense bf16 tensor-core peaks (TFLOP/s) for the utilisation estimate; unknown devices report none.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}

VolumeFactory = Callable[[StageConfig, str], VolumeSource]


# Where this process sits in a distributed run: the one type, read from torchrun's environment by
# cryofastar_core.runtime.distributed.dist_env (this name is kept for callers of train(dist=...)).
DistInfo = DistEnv


@dataclass
class TrainResult:
    """What a call to :func:`train` did: ``steps_done`` is the global step reached."""

    steps_done: int
    total_steps: int
    last_loss: float | None
    weights_path: Path | None
    views_per_s: float | None
    tflops: float | None


def default_volume_factory(cfg: TrainConfig) -> VolumeFactory:
    """Volumes from :class:`cryofastar_core.training.volumes.VolumeLibrary` (``split`` and ``n_pseudo`` per stage)."""

    def make(stage: StageConfig, split: str) -> VolumeSource:
        from cryofastar_core.training.volumes import VolumeLibrary

        return VolumeLibrary(box=cfg.box, split=split, cache_dir=cfg.cache_dir, n_pseudo=stage.n_pseudo, seed=cfg.seed)

    return make


def resolve_device(device: str, dist: DistEnv) -> torch.device:
    """``auto`` -> CUDA when available; on CUDA, the rank's local GPU (``distributed.rank_device``)."""
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(None, "--device", f"unknown device {device!r}", "use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(None, "--device", "CUDA was requested but no GPU is visible", "use --device cpu or auto")
    return torch.device(rank_device(device, dist))


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, device: str = "auto",
          max_steps: int | None = None, dist: DistEnv | None = None,
          volume_factory: VolumeFactory | None = None) -> TrainResult:
    """Train (or continue) the run in ``out_dir`` until all stages are done or ``max_steps`` global steps.

    ``max_steps`` truncates the run without changing its schedule, so a run stopped there and resumed
    later follows the same trajectory as an uninterrupted one.
    """
    dist = dist or DistEnv()
    dev = resolve_device(device, dist)
    init_process_group(dev, dist)
    try:
        return _Trainer(cfg, Path(out_dir), dev, dist, volume_factory or default_volume_factory(cfg)).run(resume, max_steps)
    finally:
        if dist.distributed:
            shutdown()


class _Trainer:
    def __init__(self, cfg: TrainConfig, out_dir: Path, dev: torch.device, dist: DistEnv,
                 volume_factory: VolumeFactory):
        self.cfg, self.out, self.dev, self.dist = cfg, out_dir, dev, dist
        self.volume_factory = volume_factory
        self.is_main = dist.rank == 0
        self.ckpt_path = out_dir / "checkpoint.pt"
        self.csv_path = out_dir / "metrics.csv"
        self._sources: dict[tuple, VolumeFTCache] = {}
        self._val_batches: dict[int, TrainingBatch] = {}
        self._columns: list[str] | None = None
        self._rows: list[dict] = []
        self._flops_per_view: float | None = None
        self._tb = None

    # --- set-up -------------------------------------------------------------------------------------
    def _check_config(self) -> None:
        for i, s in enumerate(self.cfg.stages):
            if s.batch_size % self.dist.world_size:
                raise InputError(None, f"stages[{i}].batch_size",
                                 f"{s.batch_size} samples cannot be split over {self.dist.world_size} processes",
                                 "make the global batch size a multiple of the number of processes")

    def _build_model(self) -> nn.Module:
        from cryofastar_core.model import build_model, model_config
        from cryofastar_core.model.checkpoint import init_from_weights

        overrides = dict(self.cfg.model.overrides)
        overrides.setdefault("checkpointing", self.cfg.activation_checkpointing)
        mcfg = model_config(self.cfg.model.size, self.cfg.box, **overrides)
        torch.manual_seed(self.cfg.seed)  # identical initialisation on every rank
        model = build_model(mcfg)
        if self.cfg.init_weights:
            init_from_weights(model, self.cfg.init_weights)
        return model.to(self.dev)

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        # No weight decay on biases, norms and embeddings (1-D tensors), as usual for ViTs.
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        o = self.cfg.optimizer
        return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=self.cfg.stages[0].lr, betas=tuple(o.betas), eps=o.eps)

    def _source(self, stage: StageConfig, split: str) -> VolumeFTCache:
        key = (split, stage.n_pseudo)
        if key not in self._sources:
            self._sources[key] = VolumeFTCache(self.volume_factory(stage, split), self.dev, self.cfg.volume_cache)
        src = self._sources[key]
        if len(src) == 0:
            raise InputError(self.cfg.cache_dir, f"stage '{stage.name}'", f"the volume library split '{split}' is empty",
                             "build the volume library or set n_pseudo > 0")
        if stage.volumes == "single" and stage.single_index >= len(src):
            raise InputError(None, f"stage '{stage.name}'.single_index",
                             f"{stage.single_index} is past the {len(src)} volumes of split '{split}'",
                             f"use an index below {len(src)}")
        return src

    # --- main loop ----------------------------------------------------------------------------------
    def run(self, resume: bool, max_steps: int | None) -> TrainResult:
        """Set up (or resume), then train step by step; after a step, on their schedules (:meth:`_due`),
        log with validation and write a checkpoint. Exports the weights at the end."""
        model, optimizer, step = self._start(resume)
        ddp_model = self._parallel(model)
        loop = self._begin_loop(model, step, max_steps)
        while loop.step < loop.end:
            info = self._train_step(model, ddp_model, optimizer, loop)
            do_ckpt, do_val, do_log = self._due(loop.step, loop.end)
            if do_log:
                self._log_step(model, loop, info, do_val)
            if do_ckpt:
                self._checkpoint(model, optimizer, loop.step)
            if do_log:
                loop.interval = _Interval()  # after validation and checkpoint I/O, so views/s counts training only
        return self._finish(model, loop)

    def _start(self, resume: bool) -> tuple[nn.Module, torch.optim.Optimizer, int]:
        """Check the configuration, prepare the run folder, build the model and optimiser and, with
        ``resume``, load the checkpoint (model, optimiser, RNG). Returns the step to start from."""
        self._check_config()
        if self.is_main:
            self._prepare_out_dir(resume)
        self._barrier()
        model = self._build_model()
        self._ctf_correction = model.cfg.ctf_correction
        optimizer = self._make_optimizer(model)
        step = 0
        if resume:
            step = self._load_checkpoint(model, optimizer)
        if self.is_main:
            self._init_metrics(step, resume)
        return model, optimizer, step

    def _parallel(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped in DDP when there are several ranks (the wrapper runs the training forward)."""
        if self.dist.world_size > 1:
            return nn.parallel.DistributedDataParallel(
                model, device_ids=[self.dev.index] if self.dev.type == "cuda" else None)
        return model

    def _begin_loop(self, model: nn.Module, step: int, max_steps: int | None) -> "_Loop":
        """The loop's state from ``step`` to ``max_steps`` (capped at the schedule's end); TF32 on CUDA;
        ``model`` in training mode."""
        from cryofastar_core.model import LossConfig

        cfg, dist = self.cfg, self.dist
        loss_cfg = LossConfig(**cfg.loss)
        total = cfg.total_steps
        end = total if max_steps is None else max(0, min(total, max_steps))
        use_bf16 = cfg.bf16 and self.dev.type == "cuda"
        if self.dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.is_main:
            n_params = sum(p.numel() for p in model.parameters())
            log.info("training %s (%.2f M parameters) on %s x%d, steps %d -> %d of %d, run folder %s",
                     cfg.model.size, n_params / 1e6, self.dev, dist.world_size, step, end, total, self.out)
        model.train()
        return _Loop(step=step, end=end, total=total, use_bf16=use_bf16, loss_cfg=loss_cfg, interval=_Interval(),
                     t_start=time.perf_counter())

    def _train_step(self, model: nn.Module, ddp_model: nn.Module, optimizer: torch.optim.Optimizer,
                    loop: "_Loop") -> "_StepInfo":
        """One optimiser step on this rank's share of the global batch of step ``loop.step`` (then
        advanced by one). The first step of the process also counts the FLOPs per view."""
        from cryofastar_core.model import fpm_loss

        cfg, dist, step = self.cfg, self.dist, loop.step
        pos = stage_at(cfg.stages, step)
        stage = pos.stage
        lr = learning_rate(stage, pos.local_step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        views = views_at(stage, cfg.seed, step)
        snr = snr_at(stage, pos.local_step)
        per_rank = stage.batch_size // dist.world_size
        sim = BatchSimulator(self._source(stage, stage.split), cfg.box, self.dev)
        batch = sim.make_batch(stage, seed=cfg.seed, step=step, first_sample=dist.rank * per_rank,
                               n_samples=per_rank, views=views, snr=snr,
                               max_tilt_deg=max_tilt_at(stage, pos.local_step),
                               ctf_correction=self._ctf_correction)
        counter = _flop_counter() if loop.first_step_of_process else None
        with counter if counter is not None else _nullcontext():
            with torch.autocast(device_type=self.dev.type, dtype=torch.bfloat16, enabled=loop.use_bf16):
                out = ddp_model(batch.images)
            loss, terms = fpm_loss(out, batch.targets(out.grid), batch.clean, loop.loss_cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if counter is not None:
            self._flops_per_view = counter.get_total_flops() / max(1, per_rank * views)
        loop.first_step_of_process = False
        clip = cfg.optimizer.grad_clip
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip if clip is not None else float("inf"))
        optimizer.step()
        loop.step += 1
        loop.interval.add({k: v for k, v in terms.items() if v.ndim == 0}, grad_norm.detach(),
                          views * stage.batch_size)
        return _StepInfo(stage=stage, stage_index=pos.index, lr=lr, views=views, snr=snr)

    def _due(self, step: int, end: int) -> tuple[bool, bool, bool]:
        """Whether a checkpoint, a validation and a log line are due after ``step`` steps: all at the
        last step; a log line whenever either of the others runs."""
        at_end = step == end
        do_ckpt = step % self.cfg.checkpoint_every == 0 or at_end
        val_every = self.cfg.val_every or self.cfg.checkpoint_every
        do_val = step % val_every == 0 or at_end
        do_log = step % self.cfg.log_every == 0 or do_ckpt or do_val
        return do_ckpt, do_val, do_log

    def _log_step(self, model: nn.Module, loop: "_Loop", info: "_StepInfo", do_val: bool) -> None:
        """Average the interval's loss terms over the ranks and, on rank 0, validate (``do_val``) and
        write the metrics row and the log line."""
        means, gnorm, loop.views_per_s = self._reduce_interval(loop.interval)
        loop.last_loss = means.get("loss")
        val = self._validate(model, info.stage, info.stage_index, loop.use_bf16) if do_val and self.is_main else {}
        if not self.is_main:
            return
        views_per_s, snr = loop.views_per_s, info.snr
        row = dict(step=loop.step, stage=info.stage.name, views=info.views, snr="" if snr is None else _num(snr),
                   ctf=int(info.stage.ctf), lr=_num(info.lr), **{k: _num(v) for k, v in means.items()},
                   grad_norm=_num(gnorm), views_per_s=_num(views_per_s),
                   tflops=_num(self._tflops(views_per_s)) if self._flops_per_view else "",
                   elapsed_s=_num(time.perf_counter() - loop.t_start), **val)
        self._write_row(row)
        log.info("step %d/%d [%s] V=%d snr=%s lr=%.2e loss=%.4f %s%.0f views/s%s%s", loop.step, loop.total,
                 info.stage.name, info.views, "clean" if snr is None else f"{snr:.3g}", info.lr, loop.last_loss,
                 " ".join(f"{k}={v:.4g}" for k, v in means.items() if k != "loss") + " ",
                 views_per_s, self._throughput_note(views_per_s),
                 f" val_rot_err={val['val_rot_err_deg']:.2f} deg spread={val['val_spread']:.3f}" if val else "")

    def _checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Rank 0 writes checkpoint.pt and redraws loss.png; every rank waits for it."""
        if self.is_main:
            self._save_checkpoint(model, optimizer, step)
            self._plot()
        self._barrier()

    def _finish(self, model: nn.Module, loop: "_Loop") -> TrainResult:
        """Rank 0 exports weights.pt and summary.json and closes TensorBoard; every rank waits for it."""
        weights_path = None
        if self.is_main:
            weights_path = self._export(model, loop.step, loop.total)
            self._write_summary(loop.step, loop.total, loop.views_per_s)
            if self._tb is not None:
                self._tb.close()
        self._barrier()
        views_per_s = loop.views_per_s
        return TrainResult(loop.step, loop.total, loop.last_loss, weights_path, views_per_s,
                           self._tflops(views_per_s) if views_per_s and self._flops_per_view else None)

    # --- distributed helpers ------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            torch.distributed.barrier()

    def _reduce_interval(self, interval: "_Interval") -> tuple[dict[str, float], float, float]:
        keys = sorted(interval.sums)
        vec = torch.stack([interval.sums[k] for k in keys] + [interval.grad_norm]).double() / max(1, interval.n)
        if self.dist.world_size > 1:
            vec = vec.to(self.dev)
            torch.distributed.all_reduce(vec)
            vec = vec / self.dist.world_size
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        elapsed = time.perf_counter() - interval.t0
        vals = vec.cpu().tolist()
        means = dict(zip(keys, vals[:-1]))
        means = {"loss": means.pop("loss"), **means} if "loss" in means else means
        return means, vals[-1], interval.views / max(elapsed, 1e-9)

    def _peak_tflops(self) -> float | None:
        if self.dev.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.dev)
        return next((v for k, v in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)

    def _throughput_note(self, views_per_s: float | None) -> str:
        """`` 123.4 TFLOP/s (31% of peak)`` on CUDA, from the FLOPs counted on the first step."""
        tflops = self._tflops(views_per_s)
        if tflops is None or self.dev.type != "cuda":
            return ""
        peak = self._peak_tflops()
        per_gpu = tflops / self.dist.world_size
        return f" {per_gpu:.1f} TFLOP/s/GPU" + (f" ({100 * per_gpu / peak:.0f}% of bf16 peak)" if peak else "")

    def _tflops(self, views_per_s: float | None) -> float | None:
        if not views_per_s or not self._flops_per_view:
            return None
        return self._flops_per_view * views_per_s / 1e12

    # --- validation ---------------------------------------------------------------------------------
    def _validation_batch(self, stage: StageConfig, index: int) -> TrainingBatch:
        """A fixed held-out batch per stage: ``heldout`` real structures (or the stage's single volume), the
        stage's hardest setting (views_max, snr_end, its CTF and shifts), seeded apart from training data.

        Held-out pseudo-molecules are left out: they validated 20-35 degrees better than real structures
        (docs/model-history.md), so they hid what the ladder then showed."""
        if index not in self._val_batches:
            split = stage.split if stage.volumes == "single" else "heldout"
            val_stage = dataclasses.replace(stage, clean_fraction=0.0,
                                            n_pseudo=stage.n_pseudo if stage.volumes == "single" else 0)
            try:
                source = self._source(val_stage, split)
            except InputError:
                source = self._source(stage, stage.split)  # no held-out volumes: new poses of training ones
            sim = BatchSimulator(source, self.cfg.box, self.dev)
            self._val_batches[index] = sim.make_batch(val_stage, seed=self.cfg.seed, step=index,
                                                      first_sample=0, n_samples=self.cfg.val_samples,
                                                      views=stage.views_max, snr=stage.snr_end,
                                                      stream=VALIDATION_STREAM, max_tilt_deg=stage.max_tilt_end,
                                                      ctf_correction=self._ctf_correction)
        return self._val_batches[index]

    @torch.no_grad()
    def _validate(self, model: nn.Module, stage: StageConfig, index: int, use_bf16: bool) -> dict:
        batch = self._validation_batch(stage, index)
        model.eval()
        try:
            with torch.autocast(device_type=self.dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(batch.images)
        finally:
            model.train()
        errs = validation_errors(out.xyz.float(), out.conf.float(), batch, self.cfg.box, out.grid)
        return {k: _num(v) for k, v in errs.items()}

    # --- files --------------------------------------------------------------------------------------
    def _prepare_out_dir(self, resume: bool) -> None:
        if resume:
            if not self.ckpt_path.is_file():
                raise InputError(self.out, "--resume", "no checkpoint.pt in the run folder",
                                 "start a new run without --resume, or point --o at the folder of an earlier run")
        else:
            if self.ckpt_path.exists() or self.csv_path.exists():
                raise InputError(self.out, "--o", "the run folder already holds a run",
                                 "add --resume to continue it, or choose a new --o folder")
            self.out.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        cfg_path = self.out / "config.yaml"
        if resume and cfg_path.is_file() and cfg_path.read_text() != text:
            log.warning("the configuration differs from the one the run started with (%s); continuing with the new one",
                        cfg_path)
        with atomic_output(cfg_path) as tmp:
            tmp.write_text(text)
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional

            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        except Exception:  # tensorboard not installed: CSV and PNG only
            self._tb = None

    def _init_metrics(self, step: int, resume: bool) -> None:
        if resume and self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                self._columns = list(reader.fieldnames or []) or None
                # Rows past the checkpoint were logged by a run that died before saving: drop them.
                self._rows = [r for r in reader if r.get("step") and int(r["step"]) <= step]
            self._rewrite_csv()

    def _write_row(self, row: dict) -> None:
        if self._columns is None:
            terms = [k for k in row if k not in FIXED_COLUMNS and k not in TAIL_COLUMNS]
            self._columns = FIXED_COLUMNS + terms + TAIL_COLUMNS
            self._rewrite_csv()
        self._rows.append(row)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, self._columns, extrasaction="ignore", restval="").writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, row["step"])

    def _rewrite_csv(self) -> None:
        with atomic_output(self.csv_path) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, self._columns or FIXED_COLUMNS, extrasaction="ignore", restval="")
                w.writeheader()
                w.writerows(self._rows)

    def _save_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        pos = stage_at(self.cfg.stages, max(0, step - 1))
        rng = {"torch": torch.get_rng_state()}
        if self.dev.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.dev)
        payload = {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
            "step": step, "stage": pos.stage.name, "stage_index": pos.index,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            # The schedule is a pure function of the global step (schedule.py); stored for the record.
            "scheduler": {"kind": "per-stage warm-up + cosine", "step": step},
            "rng": rng,
            "world_size": self.dist.world_size,
            "config": self.cfg.to_dict(),
        }
        with atomic_output(self.ckpt_path) as tmp:
            torch.save(payload, tmp)

    def _load_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        try:
            payload = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(self.ckpt_path, None, f"cannot read the checkpoint ({type(exc).__name__}: {exc})",
                             "restore the file or start a new run") from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise InputError(self.ckpt_path, "format", "not a CryoFastAR training checkpoint",
                             "point --o at a folder written by cryofastar train")
        if payload.get("format_version") != CHECKPOINT_VERSION:
            raise InputError(self.ckpt_path, "format_version", f"version {payload.get('format_version')} is not supported",
                             "resume with the CryoFastAR version that wrote it")
        try:
            model.load_state_dict(payload["model"], strict=True)
        except RuntimeError as exc:
            raise InputError(self.ckpt_path, "model", f"does not match the configured model ({str(exc)[:300]})",
                             "resume with the configuration the run started with") from None
        optimizer.load_state_dict(payload["optimizer"])
        _optimizer_to(optimizer, self.dev)
        rng = payload.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.dev.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.dev)
        step = int(payload["step"])
        if self.is_main:
            log.info("resumed from %s at step %d (stage %s)", self.ckpt_path, step, payload.get("stage"))
        return step

    def _plot(self) -> None:
        try:
            plot_training_curves(self._rows, self.out / "loss.png", title=f"CryoFastAR training ({self.out.name})")
        except Exception as exc:  # a figure must never stop training
            log.warning("could not draw loss.png: %s", exc)

    def _export(self, model: nn.Module, step: int, total: int) -> Path:
        from cryofastar_core.model import save_weights

        n_params = sum(p.numel() for p in model.parameters())
        half = {"true": True, "false": False}.get(self.cfg.export_half, n_params > HALF_EXPORT_PARAMS)
        path = self.out / "weights.pt"
        pos = stage_at(self.cfg.stages, max(0, step - 1))
        volumes = {f"{split}/n_pseudo={n}": [s.name for s in getattr(src.source, "specs", [])]
                   for (split, n), src in self._sources.items()}
        extra = {"trained_steps": step, "total_steps": total, "complete": step >= total,
                 "last_stage": pos.stage.name, "train_config": self.cfg.to_dict(), "volumes": volumes}
        save_weights(model, path, extra=extra, half=half)
        log.info("wrote %s (%s, step %d of %d)", path, "fp16" if half else "fp32", step, total)
        return path

    def _write_summary(self, step: int, total: int, views_per_s: float | None) -> None:
        peak = self._peak_tflops()
        tflops = self._tflops(views_per_s)
        per_device = tflops / self.dist.world_size if tflops else None
        summary = {
            "steps_done": step, "total_steps": total, "device": str(self.dev), "world_size": self.dist.world_size,
            "device_name": torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else "cpu",
            "views_per_s": views_per_s, "train_flops_per_view": self._flops_per_view,
            "achieved_tflops_total": tflops, "achieved_tflops_per_device": per_device, "peak_tflops_bf16": peak,
            "utilisation": (per_device / peak) if (per_device and peak) else None,
        }
        with atomic_output(self.out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))


def plot_training_curves(rows: list[dict], path: Path, title: str = "") -> None:
    """Loss terms (log scale) beside the validation rotation error, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    def column(key: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for r in rows:
            v = r.get(key, "")
            if v not in ("", None) and math.isfinite(float(v)):
                xs.append(float(r["step"]))
                ys.append(float(v))
        return xs, ys

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in ("regression", "grid", "denoise"):
        xs, ys = column(key)
        pts = [(x, y) for x, y in zip(xs, ys) if y > 0]
        if pts:
            ax_loss.plot(*zip(*pts), label=key, lw=1.2)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss term")
    ax_loss.grid(alpha=0.3, which="both")
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=8)
    for key, label in (("val_rot_err_deg", "median"), ("val_rot_err_mean_deg", "mean")):
        xs, ys = column(key)
        if xs:
            ax_val.plot(xs, ys, "o-", ms=3, lw=1.2, label=label)
    ax_val.set_xlabel("step")
    ax_val.set_ylabel("held-out rotation error (deg)")
    ax_val.set_ylim(bottom=0)
    ax_val.grid(alpha=0.3)
    if ax_val.get_legend_handles_labels()[0]:
        ax_val.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


def validation_errors(xyz: torch.Tensor, conf: torch.Tensor, batch: TrainingBatch, box: int,
                      grid: torch.Tensor | None = None, operators: list[torch.Tensor] | None = None
                      ) -> dict[str, float | list[float]]:
    """Pose errors of predicted FPMs (at the in-plane points ``grid``, default the planar grid)
    against the batch's ground truth (auxiliary views only).

    Rotations come from confidence-weighted Kabsch; per sample the hand (mirror) with the smaller mean
    error is taken, as the loss is hand-invariant. Returns the median and mean rotation error (degrees),
    the median shift error (pixels) and ``val_spread``: how much the auxiliary FPMs vary over the
    batch's views relative to how much the targets vary (per pixel and coordinate, then averaged).
    Near 0 the model outputs one FPM whatever the images (collapsed onto the mean target, the
    plateau a regression falls into before it finds pose features); near 1 its outputs vary like poses.

    With ``operators`` (per sample, the symmetry of its map: ``(n, 3, 3)``,
    :func:`cryofastar_core.evaluation.symmetry.symmetry_operators`), also each sample's errors modulo that
    symmetry (``val_rot_err_mod_sym_deg``, their median over the batch, and per sample
    ``val_rot_err_mod_sym_per_sample``): a view at ``g R`` is the same image as at ``R``, so either is right.
    """
    from cryofastar_core.model import denormalize, kabsch

    fit = kabsch(denormalize(xyz[:, 1:]), conf[:, 1:], box, grid)
    err = _hand_resolved_errors(fit.rotation, batch.rotations)
    shift_err = torch.linalg.norm(fit.shift - batch.shifts[:, 1:].to(fit.shift.dtype), dim=-1)
    pred_aux = xyz[:, 1:].flatten(0, 1)
    target_aux = batch.targets(grid)[:, 1:].flatten(0, 1).to(pred_aux.dtype)
    spread = pred_aux.std(dim=0).mean() / target_aux.std(dim=0).mean().clamp_min(1e-12)
    out = {"val_rot_err_deg": float(err.median()), "val_rot_err_mean_deg": float(err.mean()),
           "val_shift_err_px": float(shift_err.median()), "val_spread": float(spread)}
    if operators is not None:
        modulo = torch.stack([_hand_resolved_errors(fit.rotation[b:b + 1], batch.rotations[b:b + 1], operators[b])[0]
                              for b in range(len(operators))])
        out["val_rot_err_mod_sym_deg"] = float(modulo.median())
        out["val_rot_err_mod_sym_per_sample"] = [float(m) for m in modulo.median(-1).values]
    return out


def _hand_resolved_errors(pred: torch.Tensor, rotations: torch.Tensor, operators: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, V - 1)`` degrees: each auxiliary view's predicted relative rotation ``pred`` ``(B, V - 1, 3, 3)``
    against the truth's, ``rotations`` ``(B, V, 3, 3)``, in the hand (mirror or not) with the smaller mean per
    sample; with ``operators`` ``(n, 3, 3)`` against the nearest of the truth's views turned by them
    (``R_0ᵀ g R_i``; the reference's own turn is one of them, as the operators form a group)."""
    from cryofastar_core.model.fpm import relative_rotations

    ops = (torch.eye(3, dtype=pred.dtype, device=pred.device)[None] if operators is None
           else torch.as_tensor(operators, dtype=pred.dtype, device=pred.device))
    R = rotations.to(pred.dtype)
    truths = relative_rotations(R[:, None, 0], ops[None, :, None] @ R[:, None])[:, :, 1:]   # (B, n, V - 1, 3, 3)
    err_same = rotation_angle_deg(pred[:, None], truths).amin(1)
    err_flip = rotation_angle_deg(mirror_rotations(pred)[:, None], truths).amin(1)
    flip = err_flip.mean(-1) < err_same.mean(-1)
    return torch.where(flip[:, None], err_flip, err_same)


class _Interval:
    """Running sums of the loss terms between two log lines (kept on the device: no per-step sync)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.grad_norm = torch.zeros((), dtype=torch.float64)
        self.n = 0
        self.views = 0
        self.t0 = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor, views: int) -> None:
        for k, v in terms.items():
            v = v.detach().double()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.grad_norm = self.grad_norm.to(grad_norm.device) + grad_norm.double()
        self.n += 1
        self.views += views


@dataclass
class _Loop:
    """The training loop's running state (one per call to :meth:`_Trainer.run`)."""

    step: int  # global steps done
    end: int  # stop here (``max_steps`` or the schedule's end)
    total: int  # the schedule's length
    use_bf16: bool
    loss_cfg: LossConfig
    interval: _Interval  # loss terms since the last log line
    t_start: float
    last_loss: float | None = None
    views_per_s: float | None = None
    first_step_of_process: bool = True  # FLOPs are counted on this step only


@dataclass
class _StepInfo:
    """What the log line needs from the step just trained."""

    stage: StageConfig
    stage_index: int
    lr: float
    views: int
    snr: float | None


def _optimizer_to(optimizer: torch.optim.Optimizer, dev: torch.device) -> None:
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and k != "step":
                state[k] = v.to(dev)


def _flop_counter():
    try:
        from torch.utils.flop_counter import FlopCounterMode

        return FlopCounterMode(display=False)
    except Exception:  # older torch: no estimate
        return None


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _num(v) -> float | str:
    if v is None:
        return ""
    v = float(v)
    return v if math.isfinite(v) else ""
