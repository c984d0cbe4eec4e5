"""The shipped line model (:class:`LineCryoFastAR`, ``arch: lines``): each view's 1D projections as
tokens and a polar FPM. ``encoder`` embeds a view's lines, ``decoder`` joins the views with
line-similarity-biased attention, ``head`` writes the polar FPM, ``network`` joins them."""
from cryofastar_core.model.lines.decoder import LineDecoder, MatchBias, angle_features, line_similarity, zscore_rows
from cryofastar_core.model.lines.encoder import LineEncoder, line_features
from cryofastar_core.model.lines.head import LineHead, polar_grid
from cryofastar_core.model.lines.network import LineCryoFastAR

__all__ = ["LineCryoFastAR", "LineDecoder", "LineEncoder", "LineHead", "MatchBias", "angle_features",
           "line_features", "line_similarity", "polar_grid", "zscore_rows"]
