"""The one internal pose convention, and the converters to RELION and CryoSPARC.

Internal convention (used by every engine module; converted only at the I/O edges):

* Arrays: volumes ``V[z, y, x]``, images ``P[y, x]``, the centre at index ``n // 2``
  (as mrcfile and RELION). Coordinates are ``(x, y, z)`` column vectors.
* ``rotation`` ``R`` (``(..., 3, 3)``) maps **image-frame coordinates to map-frame coordinates**.
  The image is the projection along z of the map sampled at ``R @ (x, y, z)``:
  ``P(x, y) = sum_z V(R @ (x, y, z))`` and, by the Fourier slice theorem, the image's
  centred 2D transform at frequency ``(kx, ky)`` is ``V_hat(R @ (kx, ky, 0))``.
  ``R`` is the transpose of RELION's matrix ``A(rot, tilt, psi)`` and equals
  ``scipy.Rotation.from_rotvec(alignments3D/pose).as_matrix()`` for CryoSPARC
  (``tests/test_physics_relion.py`` checks ``A`` against ``relion_project``).
* ``shift`` (``(..., 2)``, pixels, ``(x, y)``) has RELION's origin meaning: the particle's
  centre sits at ``box_centre - shift``, i.e. ``image(p) = centred_image(p + shift)``.
  RELION stores it in Å (``rlnOriginXAngst``), CryoSPARC in pixels of ``alignments3D/psize_A``
  with the same sign (not yet checked against a CryoSPARC server: ``plugin/README.md``).

Everything here is a pure function of tensors; dtype and device follow the input.
"""
from __future__ import annotations

import math

import torch

_EPS = 1e-6


def relion_euler_to_matrix(rot: torch.Tensor, tilt: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """RELION Euler angles (degrees, ZYZ) -> internal rotations ``R = A^T``, shape ``(..., 3, 3)``."""
    return relion_matrix_A(rot, tilt, psi).transpose(-1, -2)


def relion_matrix_A(rot: torch.Tensor, tilt: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """RELION's rotation matrix ``A``: it maps map coordinates to image coordinates."""
    rot, tilt, psi = (torch.deg2rad(torch.as_tensor(a, dtype=torch.float64)) for a in (rot, tilt, psi))
    ca, sa = torch.cos(rot), torch.sin(rot)
    cb, sb = torch.cos(tilt), torch.sin(tilt)
    cg, sg = torch.cos(psi), torch.sin(psi)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    row0 = torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1)
    row1 = torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1)
    row2 = torch.stack([sc, ss, cb], -1)
    return torch.stack([row0, row1, row2], -2)


def matrix_to_relion_euler(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Internal rotations ``(..., 3, 3)`` -> RELION ``(rot, tilt, psi)`` in degrees, tilt in [0, 180].

    At gimbal lock (tilt 0 or 180) it sets rot = 0, as RELION does.
    """
    A = torch.as_tensor(R, dtype=torch.float64).transpose(-1, -2)
    abs_sb = torch.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    regular = abs_sb > 16 * 1.1920929e-07
    psi = torch.atan2(A[..., 1, 2], -A[..., 0, 2])
    rot = torch.atan2(A[..., 2, 1], A[..., 2, 0])
    tilt = torch.atan2(abs_sb, A[..., 2, 2])
    # Gimbal lock: only rot + psi (tilt 0) or psi - rot (tilt 180) is defined; put it all in psi.
    up = A[..., 2, 2] > 0
    psi_lock = torch.where(up, torch.atan2(-A[..., 1, 0], A[..., 0, 0]), torch.atan2(A[..., 1, 0], -A[..., 0, 0]))
    tilt_lock = torch.where(up, torch.zeros_like(tilt), torch.full_like(tilt, math.pi))
    rot = torch.where(regular, rot, torch.zeros_like(rot))
    tilt = torch.where(regular, tilt, tilt_lock)
    psi = torch.where(regular, psi, psi_lock)
    return torch.rad2deg(rot), torch.rad2deg(tilt), torch.rad2deg(psi)


def rotvec_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Axis-angle vectors ``(..., 3)`` (radians) -> rotation matrices (Rodrigues).

    For CryoSPARC's ``alignments3D/pose`` this gives the internal ``R`` directly.
    """
    v = torch.as_tensor(rotvec)
    if not v.is_floating_point():
        v = v.double()
    theta = torch.linalg.norm(v, dim=-1, keepdim=True)
    small = theta < _EPS
    axis = v / torch.where(small, torch.ones_like(theta), theta)
    K = _skew(axis)
    s = torch.sin(theta)[..., None]
    c = torch.cos(theta)[..., None]
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand(K.shape)
    R = eye + s * K + (1 - c) * (K @ K)
    # Second-order expansion near zero keeps the map smooth and exact to float precision.
    Kv = _skew(v)
    R_small = eye + Kv + 0.5 * (Kv @ Kv)
    return torch.where(small[..., None], R_small, R)


def matrix_to_rotvec(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` -> axis-angle vectors ``(..., 3)`` with angle in [0, pi]."""
    R = torch.as_tensor(R)
    if not R.is_floating_point():
        R = R.double()
    q = matrix_to_quaternion(R)  # (w, x, y, z), w >= 0
    w = q[..., 0].clamp(-1.0, 1.0)
    xyz = q[..., 1:]
    sin_half = torch.linalg.norm(xyz, dim=-1)
    angle = 2 * torch.atan2(sin_half, w)
    scale = torch.where(sin_half < _EPS, 2.0 / w.clamp_min(_EPS), angle / sin_half.clamp_min(_EPS))
    return xyz * scale[..., None]


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices -> unit quaternions ``(w, x, y, z)`` with ``w >= 0`` (numerically stable branch choice)."""
    m = R
    t0 = 1 + m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    t1 = 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2]
    t2 = 1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2]
    t3 = 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]
    cands = torch.stack(
        [
            torch.stack([t0, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
            torch.stack([m[..., 2, 1] - m[..., 1, 2], t1, m[..., 1, 0] + m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0]], -1),
            torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] + m[..., 0, 1], t2, m[..., 2, 1] + m[..., 1, 2]], -1),
            torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 2, 1] + m[..., 1, 2], t3], -1),
        ],
        -2,
    )
    best = torch.stack([t0, t1, t2, t3], -1).argmax(-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = q / torch.linalg.norm(q, dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def random_rotations(n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` Haar-uniform rotations ``(n, 3, 3)`` from normalised Gaussian quaternions."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / torch.linalg.norm(q, dim=-1, keepdim=True)
    return quaternion_to_matrix(q).to(dtype=dtype, device=device)


def rotations_at_angle(n: int, angle_deg: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` rotations ``(n, 3, 3)`` float64, each by exactly ``angle_deg`` about a random axis (uniform on
    the sphere): the perturbations of pose-accuracy benchmarks and the near poses of the quality check."""
    axes = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    axes = axes / axes.norm(dim=-1, keepdim=True)
    return rotvec_to_matrix(axes * math.radians(angle_deg))


def rotations_within_tilt(n: int, max_tilt_deg: float, generator: torch.Generator | None = None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` rotations ``Q`` ``(n, 3, 3)`` whose viewing direction ``Q e_z`` lies uniformly on the cap within
    ``max_tilt_deg`` of ``e_z``, with a uniform in-plane angle: ``Q = T(n) Rz(ψ)``, ``T`` the shortest
    rotation taking ``e_z`` to ``n``. At 180° this is Haar-uniform (uniform direction × uniform ψ).
    """
    if not 0.0 <= max_tilt_deg <= 180.0:
        raise ValueError(f"max_tilt_deg must be in [0, 180], got {max_tilt_deg}")
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    cos_max = math.cos(math.radians(max_tilt_deg))
    cos_t = 1.0 - u[:, 0] * (1.0 - cos_max)  # uniform in cos θ: uniform on the cap's area
    theta = torch.arccos(cos_t.clamp(-1.0, 1.0))
    phi = 2 * math.pi * u[:, 1]
    psi = 2 * math.pi * u[:, 2]
    # T(n) Rz(ψ) = Rz(φ) Ry(θ) Rz(ψ − φ): T(n) = Rz(φ) Ry(θ) Rz(−φ) takes e_z to
    # n = (sinθ cosφ, sinθ sinφ, cosθ) along the great circle; RELION's ZYZ Euler rotation is exactly
    # this product: R = Aᵀ = Rz(rot) Ry(tilt) Rz(psi).
    return relion_euler_to_matrix(torch.rad2deg(phi), torch.rad2deg(theta), torch.rad2deg(psi - phi)).to(dtype)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(w, x, y, z)`` -> rotation matrices."""
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def rotation_angle_deg(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """Geodesic angle in degrees between two rotation batches."""
    tr = (R1.transpose(-1, -2) @ R2).diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.rad2deg(torch.arccos(((tr - 1) / 2).clamp(-1.0, 1.0)))


def relion_origin_to_shift(origin_angst: torch.Tensor, apix: torch.Tensor | float) -> torch.Tensor:
    """``(rlnOriginXAngst, rlnOriginYAngst)`` ``(..., 2)`` -> internal shift in pixels (same sign)."""
    return torch.as_tensor(origin_angst) / torch.as_tensor(apix)[..., None]


def shift_to_relion_origin(shift_px: torch.Tensor, apix: torch.Tensor | float) -> torch.Tensor:
    """Internal shift in pixels -> ``(rlnOriginXAngst, rlnOriginYAngst)`` in Å."""
    return torch.as_tensor(shift_px) * torch.as_tensor(apix)[..., None]


def cryosparc_shift_to_shift(shift: torch.Tensor, align_psize: torch.Tensor | float,
                             blob_psize: torch.Tensor | float) -> torch.Tensor:
    """``alignments3D/shift`` (pixels of ``alignments3D/psize_A``) -> internal shift in blob pixels."""
    return torch.as_tensor(shift) * (torch.as_tensor(align_psize) / torch.as_tensor(blob_psize))[..., None]


FLIP_Z = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


def mirror_rotations(R: torch.Tensor) -> torch.Tensor:
    """The other hand: the same images come from the z-mirrored map with rotations ``F R F``."""
    F = FLIP_Z.to(dtype=R.dtype, device=R.device)
    return F @ R @ F


def _skew(v: torch.Tensor) -> torch.Tensor:
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([torch.stack([o, -z, y], -1), torch.stack([z, o, -x], -1), torch.stack([-y, x, o], -1)], -2)


def compose_class_pose(class_rotations: torch.Tensor, class_shifts: torch.Tensor, in_plane: torch.Tensor,
                       in_plane_shifts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A particle's 3D pose from its 2D class average's and its own 2D alignment against that average.

    RELION's 2D classification is its 3D code with ``rot = tilt = 0``: a particle is its class average
    turned by ``A2 = A(0, 0, ψ)`` and moved by its origin ``o``. A class average seen at ``A_c`` with
    origin ``o_c`` therefore gives the particle ``A = A2 A_c`` and origin ``o + A2 o_c`` (the class's
    origin turned with the image). Internally (``R = Aᵀ``): ``R = R_c R2`` and
    ``s = s2 + R2ᵀ[:2, :2] s_c``, with ``R2`` the internal rotation of ``(0, 0, ψ)`` as read from the
    particle STAR (:func:`relion_euler_to_matrix`). tests/test_class_route.py checks this on real
    RELION Class2D output against the simulated truth.

    ``class_rotations`` ``(N, 3, 3)`` and ``class_shifts`` ``(N, 2)`` px: each particle's class pose;
    ``in_plane`` ``(N, 3, 3)`` and ``in_plane_shifts`` ``(N, 2)`` px: its 2D alignment. Returns
    ``(rotations (N, 3, 3), shifts (N, 2))``.
    """
    rotations = class_rotations @ in_plane
    turned = (in_plane.transpose(-1, -2)[..., :2, :2] @ class_shifts[..., None])[..., 0]
    return rotations, in_plane_shifts + turned
