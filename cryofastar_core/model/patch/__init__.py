"""The patch-token model (:class:`CryoFastAR`, ``arch: patch``), the baseline of the A/B in docs/model-history.md:
a ViT encoder on image patches (``encoder``), the reference/auxiliary decoder (``decoder``), dense
FPM heads (``head``) and the network that joins them (``network``)."""
from cryofastar_core.model.patch.decoder import Decoder
from cryofastar_core.model.patch.encoder import Encoder
from cryofastar_core.model.patch.head import FPMHead
from cryofastar_core.model.patch.network import CryoFastAR

__all__ = ["CryoFastAR", "Decoder", "Encoder", "FPMHead"]
