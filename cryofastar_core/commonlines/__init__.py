"""Classical common lines: poses of a set of views from their Fourier lines, with no learning.

Three steps, each a module:

1. :mod:`~.polar` — every view's central Fourier lines ``(N, L, K)`` at ``L`` in-plane angles and
   ``K`` radii, masked, centred and band-limited to where lines are told apart.
2. :mod:`~.detect` — for every pair of views the pair of lines with the same 3D direction (the common
   line), with a small 1D shift search.
3. :mod:`~.sync` — relative rotations from triangles of common lines (votes over every third view),
   then all rotations at once from the top eigenvectors of the matrix of relative rotations
   (synchronisation), in closed form.

:mod:`~.poser` wraps the three as a pose model with the network's interface, so the job's chunks,
anchors, Kabsch and hand check run unchanged (``--weights common-lines``). :mod:`~.learned` is an
optional trained encoder between steps 1 and 2 (identity when untrained; ``cryofastar train-lines``,
files read by :mod:`~.weights`). Measured against the
shipped network and ASPIRE on the model ladder: ``bench/model_accuracy.py --weights common-lines``.
"""
from cryofastar_core.commonlines.config import COMMON_LINES, CommonLinesConfig
from cryofastar_core.commonlines.detect import CommonLines, detect_common_lines
from cryofastar_core.commonlines.polar import fourier_lines
from cryofastar_core.commonlines.poser import CommonLinesPoser, estimate_rotations
from cryofastar_core.commonlines.sync import synchronize, vote_dihedral_angles

__all__ = ["COMMON_LINES", "CommonLines", "CommonLinesConfig", "CommonLinesPoser", "detect_common_lines",
           "estimate_rotations", "fourier_lines", "synchronize", "vote_dihedral_angles"]
