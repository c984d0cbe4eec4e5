"""numpy front-ends to the pose converters of :mod:`cryofastar_core.geometry` (the only convention code)."""
from __future__ import annotations

import numpy as np
import torch

from cryofastar_core import geometry


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float64))


def euler_to_rotations(rot, tilt, psi) -> np.ndarray:
    """RELION ``rlnAngleRot/Tilt/Psi`` (degrees) -> internal ``R`` ``(N, 3, 3)`` float64."""
    return geometry.relion_euler_to_matrix(_t(rot), _t(tilt), _t(psi)).numpy()


def rotations_to_euler(R) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Internal ``R`` ``(N, 3, 3)`` -> RELION ``(rot, tilt, psi)`` in degrees."""
    rot, tilt, psi = geometry.matrix_to_relion_euler(_t(R))
    return rot.numpy(), tilt.numpy(), psi.numpy()


def rotvec_to_rotations(pose) -> np.ndarray:
    """CryoSPARC ``alignments3D/pose`` ``(N, 3)`` -> internal ``R``."""
    return geometry.rotvec_to_matrix(_t(pose)).numpy()


def rotations_to_rotvec(R) -> np.ndarray:
    """Internal ``R`` -> CryoSPARC ``alignments3D/pose`` ``(N, 3)``."""
    return geometry.matrix_to_rotvec(_t(R)).numpy()


def origin_angst_to_shift(origin_angst, apix) -> np.ndarray:
    """``(rlnOriginXAngst, rlnOriginYAngst)`` ``(N, 2)`` -> internal shift in pixels."""
    return geometry.relion_origin_to_shift(_t(origin_angst), _t(apix)).numpy()


def shift_to_origin_angst(shift, apix) -> np.ndarray:
    """Internal shift ``(N, 2)`` px -> ``(rlnOriginXAngst, rlnOriginYAngst)``."""
    return geometry.shift_to_relion_origin(_t(shift), _t(apix)).numpy()


def cryosparc_shift_to_shift(shift, align_psize, blob_psize) -> np.ndarray:
    """``alignments3D/shift`` (px of ``alignments3D/psize_A``) -> internal shift in blob pixels."""
    return geometry.cryosparc_shift_to_shift(_t(shift), _t(align_psize), _t(blob_psize)).numpy()
