"""RELION Euler <-> internal <-> CryoSPARC rotation vector, against scipy as the independent reference."""
from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from cryofastar_core.io import poses


def test_euler_rotvec_round_trip_random_poses():
    rng = np.random.default_rng(0)
    n = 500
    eul = np.stack([rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)], -1)
    R = poses.euler_to_rotations(*eul.T)
    np.testing.assert_allclose(R, Rotation.from_euler("ZYZ", eul, degrees=True).as_matrix(), atol=1e-12)
    rv = poses.rotations_to_rotvec(R)
    np.testing.assert_allclose(Rotation.from_rotvec(rv).as_matrix(), R, atol=1e-9)
    np.testing.assert_allclose(poses.rotvec_to_rotations(rv), R, atol=1e-9)
    back = poses.euler_to_rotations(*poses.rotations_to_euler(poses.rotvec_to_rotations(rv)))
    np.testing.assert_allclose(back, R, atol=1e-9)
    # CryoSPARC -> RELION Euler: scipy's intrinsic ZYZ of the rotation vector's matrix.
    rot, tilt, psi = poses.rotations_to_euler(Rotation.from_rotvec(rv).as_matrix())
    np.testing.assert_allclose(Rotation.from_euler("ZYZ", np.stack([rot, tilt, psi], -1), degrees=True).as_matrix(),
                               R, atol=1e-9)


def test_shift_conversions():
    sh = np.array([[1.5, -2.0], [0.0, 3.0]])
    apix = np.array([2.0, 1.0])
    np.testing.assert_allclose(poses.shift_to_origin_angst(sh, apix), [[3.0, -4.0], [0.0, 3.0]])
    np.testing.assert_allclose(poses.origin_angst_to_shift(poses.shift_to_origin_angst(sh, apix), apix), sh)
    np.testing.assert_allclose(poses.cryosparc_shift_to_shift(sh, np.array([4.0, 1.0]), apix), [[3.0, -4.0], [0.0, 3.0]])
