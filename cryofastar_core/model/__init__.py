"""The CryoFastAR network, its FPM targets, pose recovery (Kabsch), loss and weights files."""
from .checkpoint import load_weights, save_weights
from .config import MODEL_SIZES, ModelConfig, model_config
from .factory import MODELS, build_model
from .fpm import denormalize, fpm_targets, mirror_fpm, normalize, planar_grid
from .kabsch import KabschResult, kabsch
from .loss import LossConfig, fpm_loss
from .lines import LineCryoFastAR
from .network import CryoFastAR, ModelOutput

__all__ = [
    "CryoFastAR", "KabschResult", "LineCryoFastAR", "MODELS", "build_model", "LossConfig", "MODEL_SIZES", "ModelConfig", "ModelOutput",
    "denormalize", "fpm_loss", "fpm_targets", "kabsch", "load_weights", "mirror_fpm", "model_config",
    "normalize", "planar_grid", "save_weights",
]
