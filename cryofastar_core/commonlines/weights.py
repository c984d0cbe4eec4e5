"""Line-encoder weights files: our own tagged format, written atomically, read with ``weights_only=True``.

A file is ``{format, format_version, package_version, lines_config, encoder, state_dict, extra}``:
the estimator settings the encoder was trained for (:class:`~.config.CommonLinesConfig`), the encoder's
shape, its fp16 tensors and the training provenance. Written by ``cryofastar train-lines``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from cryofastar_core import __version__
from cryofastar_core.commonlines.config import CommonLinesConfig
from cryofastar_core.commonlines.learned import LineEncoder
from cryofastar_core.io.atomic_write import atomic_output
from cryofastar_core.runtime.errors import WeightsError

FORMAT_TAG = "cryofastar-line-encoder"
FORMAT_VERSION = 1


def save_line_encoder(path: str | Path, encoder: LineEncoder, cfg: CommonLinesConfig, extra: dict) -> None:
    """Write ``encoder`` (fp16) trained for the estimator settings ``cfg`` to ``path``, atomically."""
    state = {k: v.detach().half().cpu().clone() for k, v in encoder.state_dict().items()}
    payload = {"format": FORMAT_TAG, "format_version": FORMAT_VERSION, "package_version": __version__,
               "lines_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
               "encoder": {"n_radii": encoder.n_radii, "channels": encoder.channels, "depth": encoder.depth},
               "state_dict": state, "extra": extra}
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def is_line_encoder_file(path: str | Path) -> bool:
    """Whether ``path`` holds a line encoder (and not a network's weights)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(payload, dict) and payload.get("format") == FORMAT_TAG


def load_line_encoder(path: str | Path) -> tuple[LineEncoder, CommonLinesConfig, dict]:
    """The encoder in ``path`` (fp32, eval mode), the estimator settings it was trained for, and its
    provenance; :class:`WeightsError` naming the file, what is wrong and the fix otherwise."""
    path = Path(path)
    fix = "pass a file written by `cryofastar train-lines` (its line_encoder.pt)"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a loadable line-encoder file ({type(exc).__name__}). Fix: {fix}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_TAG:
        raise WeightsError(f"{path}: format tag is not {FORMAT_TAG!r}. Fix: {fix}")
    if payload.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{path}: format_version {payload.get('format_version')!r} is not {FORMAT_VERSION}. "
                           f"Fix: use the CryoFastAR version that wrote it, or retrain")
    try:
        raw = dict(payload["lines_config"])
        cfg = CommonLinesConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()})
        encoder = LineEncoder(**payload["encoder"])
        encoder.load_state_dict({k: v.float() for k, v in payload["state_dict"].items()}, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"{path}: the line encoder does not match its stored settings ({str(exc)[:200]}). "
                           f"Fix: {fix}") from exc
    if encoder.n_radii != len(cfg.radii):
        raise WeightsError(f"{path}: field encoder.n_radii is {encoder.n_radii} but its settings sample "
                           f"{len(cfg.radii)} radii. Fix: {fix}")
    return encoder.eval(), cfg, dict(payload.get("extra") or {})
