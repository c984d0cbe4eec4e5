"""Model classes by name: ``ModelConfig.arch`` -> the class that builds it."""
from __future__ import annotations

from torch import nn

from cryofastar_core.model.config import ModelConfig
from cryofastar_core.model.lines.network import LineCryoFastAR
from cryofastar_core.model.patch.network import CryoFastAR

MODELS: dict[str, type[nn.Module]] = {"patch": CryoFastAR, "lines": LineCryoFastAR}


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of ``cfg.arch``."""
    return MODELS[cfg.arch](cfg)
