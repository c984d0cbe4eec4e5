"""What ``--weights`` names: a trained network (a shipped name or a weights file), classical common lines,
or common lines through a trained line encoder (a file of ``cryofastar train-lines``).

``common-lines`` (:data:`~cryofastar_core.commonlines.COMMON_LINES`) selects
:class:`~cryofastar_core.commonlines.CommonLinesPoser`: no file, nothing learned, the same interface,
so the job, the benchmarks and the model ladder treat all alike.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from cryofastar_core.commonlines import COMMON_LINES, CommonLinesConfig, CommonLinesPoser
from cryofastar_core.commonlines.weights import is_line_encoder_file, load_line_encoder
from cryofastar_core.model import load_weights
from cryofastar_core.model.checkpoint import read_weights_file
from cryofastar_core.weights import resolve_weights


def load_pose_model(weights: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The pose model ``weights`` names, on ``device``: classical common lines, common lines through a
    trained line encoder (a file of ``cryofastar train-lines``), or a network."""
    if str(weights) == COMMON_LINES:
        return CommonLinesPoser(CommonLinesConfig()).to(device)
    path = resolve_weights(weights)
    if is_line_encoder_file(path):
        encoder, cfg, _ = load_line_encoder(path)
        return CommonLinesPoser(cfg, encoder).to(device)
    return load_weights(path, device=device)


def pose_model_identity(weights: str | Path, model: nn.Module) -> dict:
    """What the report and the resume fingerprint record of the pose model: for a weights file its
    path, hash, configuration and provenance; for common lines its settings (hashed in their place)."""
    if str(weights) == COMMON_LINES:
        config = asdict(model.cfg)
        digest = hashlib.sha256(json.dumps({"method": COMMON_LINES, **config}, sort_keys=True).encode()).hexdigest()
        return {"path": COMMON_LINES, "sha256": digest, "config": config, "provenance": {"method": COMMON_LINES}}
    path = resolve_weights(weights)
    if is_line_encoder_file(path):
        _, cfg, extra = load_line_encoder(path)
        return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "config": asdict(cfg),
                "provenance": {"method": "common-lines-learned", **extra}}
    content = read_weights_file(path)
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "config": content.get("config"), "provenance": content.get("extra", {})}


def reference_candidates(model: nn.Module, requested: int) -> int:
    """How many reference candidates are worth scoring with ``model``: the network's answer depends on
    the reference, so ``requested``; common lines solve every pass in closed form and their confidence is
    the same vote share whichever view is first, so one (64 candidates would mean 64 full solves)."""
    return 1 if isinstance(model, CommonLinesPoser) else requested
