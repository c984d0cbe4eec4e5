"""Model classes by name: ``ModelConfig.arch`` -> the class that builds it."""
from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .lines import LineCryoFastAR
from .network import CryoFastAR

MODELS: dict[str, type[nn.Module]] = {"patch": CryoFastAR, "lines": LineCryoFastAR}


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of ``cfg.arch``."""
    return MODELS[cfg.arch](cfg)
