"""RELION's table vocabulary shared by the STAR and ``.cs`` modules: label names and optics groups.

A leaf of the io package's import graph (it imports no other io module), so that
:mod:`~cryofastar_core.io.star` (which converts ``.cs`` inputs through :mod:`~cryofastar_core.io.cs`) and
:mod:`~cryofastar_core.io.cs` (which builds RELION tables and ``.cs`` files from STAR inputs) both use it
without importing each other in a circle.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

IMAGE_NAME = "rlnImageName"
OPTICS_GROUP = "rlnOpticsGroup"
ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGINS_ANGST = ("rlnOriginXAngst", "rlnOriginYAngst")
ORIGINS_PX = ("rlnOriginX", "rlnOriginY")
RANDOM_SUBSET = "rlnRandomSubset"
# Labels RELION 3.1's converter moves from a 3.0 particle table into the optics table.
OPTICS_LABELS_30 = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize",
                    "rlnMagnification", "rlnDetectorPixelSize", "rlnBeamTiltX", "rlnBeamTiltY")
# Recommended per-particle confidence label: known to RELION 3.1 (no "unknown label" warning), in [0, 1].
CONFIDENCE_LABEL = "rlnMaxValueProbDistribution"


def build_optics(keys: pd.DataFrame, box: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Group particles by identical optics values -> (1-based group per particle, optics table).

    ``keys`` holds RELION optics labels per particle (``rlnImagePixelSize`` at least).
    """
    keys = keys.reset_index(drop=True)
    group = keys.groupby(list(keys.columns), sort=False, dropna=False).ngroup().to_numpy() + 1
    first_row = pd.Series(np.arange(len(group))).groupby(group).first()  # group id -> its first particle
    optics = pd.DataFrame({OPTICS_GROUP: first_row.index.to_numpy().astype(np.int64)})
    optics["rlnOpticsGroupName"] = [f"opticsGroup{g}" for g in optics[OPTICS_GROUP]]
    for c in keys.columns:
        optics[c] = keys[c].to_numpy()[first_row.to_numpy()]
    optics["rlnImageSize"] = int(box)
    optics["rlnImageDimensionality"] = 2
    return group.astype(np.int64), optics.sort_values(OPTICS_GROUP).reset_index(drop=True)
