"""Weights files: our own tagged format, written atomically and read with ``weights_only=True``.

A file is a dict ``{format, format_version, package_version, config, state_dict, extra}`` holding
only tensors and plain Python values, so loading never unpickles arbitrary objects.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from cryofastar_core import __version__
from cryofastar_core.runtime.errors import WeightsError
from cryofastar_core.model.config import ModelConfig
from cryofastar_core.model.factory import build_model

# Model options measured as dead ends and removed (model card, "Weights files the loader refuses"; docs/model-history.md): files that
# used them at their neutral value load; files trained with them on are refused by name.
REMOVED_OPTIONS = {"head": "linear", "abs_pos": False, "ref_channel": False, "stem": "patch", "decoder": "reference",
                   "peer_attention": False}

FORMAT_TAG = "cryofastar-weights"
FORMAT_VERSION = 1
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def save_weights(model: nn.Module, path: str | Path, extra: dict | None = None, half: bool = False) -> None:
    """Write ``model`` to ``path`` (temp file + rename). ``extra``: training provenance of plain values
    (str/int/float/bool/None/tensors in dicts and lists); ``half`` stores floating tensors as fp16."""
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    state = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).cpu().clone()
             for k, v in model.state_dict().items()}
    payload = dict(format=FORMAT_TAG, format_version=FORMAT_VERSION, package_version=__version__,
                   config=dataclasses.asdict(model.cfg), state_dict=state, extra=extra)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_weights_file(path: str | Path) -> dict:
    """The validated payload of a weights file (state dict on CPU); raises :class:`WeightsError`."""
    path = Path(path)
    fix_ours = "pass a file written by CryoFastAR's trainer (save_weights) or the shipped default weights"
    if not path.is_file():
        raise _error(path, "no such file", "check the path to the weights file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused or not a torch file at all
        raise _error(path, f"not a loadable weights file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                     fix_ours) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_TAG:
        tag = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise _error(path, f"format tag is {tag!r}, expected {FORMAT_TAG!r}", fix_ours)
    version = payload.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
        raise _error(path, f"format version {version!r} is not supported (this is CryoFastAR {__version__}, "
                           f"format version {FORMAT_VERSION}; file written by {payload.get('package_version')!r})",
                     "use the CryoFastAR version that wrote the file, or re-export the weights with this version")
    config = payload.get("config")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if not isinstance(config, dict):
        raise _error(path, "the model configuration is missing", fix_ours)
    used = sorted(k for k, neutral in REMOVED_OPTIONS.items() if k in config and config[k] != neutral)
    if used:
        raise _error(path, "trained with model options this version no longer has ("
                           + ", ".join(f"{k}={config[k]!r}" for k in used) + "; measured dead ends, see the model card)",
                     "retrain with `cryofastar train`, or use the CryoFastAR version that wrote the file")
    config = {k: v for k, v in config.items() if k not in REMOVED_OPTIONS}
    payload["config"] = config
    unknown = sorted(set(config) - fields)
    if unknown:
        raise _error(path, f"unknown model configuration keys {unknown}",
                     "use the CryoFastAR version that wrote the file")
    if not isinstance(payload.get("state_dict"), dict):
        raise _error(path, "the state dict is missing", fix_ours)
    return payload


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model described by the file at ``path`` and load its weights; returned in eval mode
    with fp32 parameters on ``device``."""
    payload = read_weights_file(path)
    try:
        # files written before the choice of architecture existed are patch models
        cfg = ModelConfig(**{"arch": "patch", **payload["config"]})
    except (TypeError, ValueError) as exc:
        raise _error(Path(path), f"invalid model configuration ({exc})",
                     "use the CryoFastAR version that wrote the file") from exc
    model = build_model(cfg)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise _error(Path(path), "the weights do not match the stored model configuration "
                                 f"({' '.join(line.strip() for line in first[:3])[:300]})",
                     "the file is damaged or was edited; re-export it from the training checkpoint") from exc
    return model.to(device).eval()


def init_from_weights(model: nn.Module, path: str | Path) -> None:
    """Start ``model`` from the weights file at ``path``; a file of another architecture, size or box is
    refused naming the file and the differing tensors."""
    src = load_weights(path)
    try:
        model.load_state_dict(src.state_dict(), strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])[:300]
        raise _error(Path(path), f"does not match the configured model ({detail})",
                     "use weights of the same architecture, size and box, or start without them") from None


def _error(path: Path, problem: str, fix: str) -> WeightsError:
    return WeightsError(f"{path}: {problem}. Fix: {fix}")


def _check_plain(value, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be str, got {type(k).__name__}")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a weights file "
                        "(use str, int, float, bool, None, tensors, lists or dicts)")
