"""The CryoFastAR network, its FPM targets, pose recovery (Kabsch), loss and weights files.

One folder per model variant: ``lines/`` (the shipped :class:`LineCryoFastAR`) and ``patch/`` (the
baseline :class:`CryoFastAR`), each split into encoder, decoder, head and network. What both use
stays here: transformer blocks and :func:`~cryofastar_core.model.blocks.run_block` (``blocks``),
RoPE, the FPM, Kabsch, the loss, :class:`ModelOutput` (``output``), the configuration, the model
factory and weights files."""
from cryofastar_core.model.checkpoint import load_weights, save_weights
from cryofastar_core.model.config import MODEL_SIZES, ModelConfig, model_config
from cryofastar_core.model.factory import MODELS, build_model
from cryofastar_core.model.fpm import denormalize, fpm_targets, mirror_fpm, normalize, planar_grid
from cryofastar_core.model.kabsch import KabschResult, kabsch
from cryofastar_core.model.loss import LossConfig, fpm_loss
from cryofastar_core.model.lines import LineCryoFastAR
from cryofastar_core.model.output import ModelOutput
from cryofastar_core.model.patch import CryoFastAR

__all__ = [
    "CryoFastAR", "KabschResult", "LineCryoFastAR", "MODELS", "build_model", "LossConfig", "MODEL_SIZES", "ModelConfig", "ModelOutput",
    "denormalize", "fpm_loss", "fpm_targets", "kabsch", "load_weights", "mirror_fpm", "model_config",
    "normalize", "planar_grid", "save_weights",
]
