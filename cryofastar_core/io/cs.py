"""CryoSPARC ``.cs`` particle files through cryosparc-tools' ``Dataset`` (offline; no server).

Field meanings (CryoSPARC's; ``plugin/README.md`` lists those not yet checked against a server):
``blob/path`` relative to the CryoSPARC project folder (a leading ``>`` is dropped), ``blob/idx`` 0-based,
``blob/psize_A`` Å/px, ``blob/sign`` contrast, ``ctf/*`` in Å and radians, ``alignments3D/pose`` rotation
vector (= internal ``R``), ``alignments3D/shift`` pixels of ``alignments3D/psize_A``, ``alignments3D/split`` 0/1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from cryosparc.dataset import Dataset

from cryofastar_core.runtime.errors import InputError
from cryofastar_core.io import poses
from cryofastar_core.io.atomic_write import atomic_output
from cryofastar_core.io.particle_set import ParticleSet, as_indices, check_stacks
from cryofastar_core.io.paths import resolve_image_path, strip_cryosparc_prefix
from cryofastar_core.io.relion_tables import IMAGE_NAME, OPTICS_GROUP, build_optics


# Field dtypes as cryosparc-tools' own particle fixtures declare them.
BLOB_FIELDS = [("blob/path", "O"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"),
               ("blob/sign", "<f4")]
CTF_FIELDS = [("ctf/exp_group_id", "<u4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"),
              ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"),
              ("ctf/scale", "<f4"), ("ctf/bfactor", "<f4")]
ALIGN_FIELDS = [("alignments3D/split", "<u4"), ("alignments3D/shift", "<f4", (2,)), ("alignments3D/pose", "<f4", (3,)),
                ("alignments3D/psize_A", "<f4"), ("alignments3D/error", "<f4"), ("alignments3D/error_min", "<f4"),
                ("alignments3D/resid_pow", "<f4"), ("alignments3D/slice_pow", "<f4"), ("alignments3D/image_pow", "<f4"),
                ("alignments3D/cross_cor", "<f4"), ("alignments3D/alpha", "<f4"), ("alignments3D/alpha_min", "<f4"),
                ("alignments3D/weight", "<f4"), ("alignments3D/pose_ess", "<f4"), ("alignments3D/shift_ess", "<f4"),
                ("alignments3D/class_posterior", "<f4"), ("alignments3D/class", "<u4"), ("alignments3D/class_ess", "<f4")]
# Neutral values for the alignment statistics we do not estimate (one class, full weight).
_ALIGN_DEFAULTS = {"alignments3D/alpha": 1.0, "alignments3D/alpha_min": 1.0, "alignments3D/weight": 1.0,
                   "alignments3D/pose_ess": 1.0, "alignments3D/shift_ess": 1.0, "alignments3D/class_posterior": 1.0,
                   "alignments3D/class_ess": 1.0}


def _load(path: Path) -> Dataset:
    try:
        return Dataset.load(path)
    except Exception as exc:  # cryosparc-tools raises several types for a bad file
        raise InputError(path, None, f"not a readable CryoSPARC .cs file ({exc})",
                         "give a particle .cs file exported by CryoSPARC") from exc


def _strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_cs_particles(path: Path, project_dir: Path | None = None) -> ParticleSet:
    """Read and check a CryoSPARC particle ``.cs`` (see :func:`cryofastar_core.io.read_particles`)."""
    path = Path(path)
    ds = _load(path)
    n = len(ds)
    if n == 0:
        raise InputError(path, None, "the .cs file holds no particles", "give a particle .cs with at least one row")
    fields = set(ds.fields())
    apix = _blob_pixel_size(path, ds, fields)
    image_files, file_index, slice_index, box = _locate_images(path, ds, fields, project_dir)
    ctf = _read_ctf(path, ds, fields) if "ctf/df1_A" in fields else None
    rotations, shifts, half_set = _read_alignments(path, ds, fields, apix)
    sign = np.asarray(ds["blob/sign"], dtype=np.float64) if "blob/sign" in fields else np.ones(n)
    return ParticleSet(source=path, source_format="cryosparc", image_files=[Path(p) for p in image_files],
                       file_index=file_index, slice_index=slice_index, apix=apix, box=box, ctf=ctf,
                       rotations=rotations, shifts=shifts, half_set=half_set, sign=sign,
                       table=dataset_frame(ds), optics=None, dataset=ds, project_dir=project_dir)


def _blob_pixel_size(path: Path, ds: Dataset, fields: set[str]) -> np.ndarray:
    """The per-particle pixel size ``blob/psize_A`` (Å/px), after checking that the blob slot locates the images."""
    for f in ("blob/path", "blob/idx"):
        if f not in fields:
            raise InputError(path, f, "field is missing, so the particle images cannot be found",
                             "give the .cs that holds the blob slot (or the passthrough file joined to it)")
    if "blob/psize_A" not in fields:
        raise InputError(path, "blob/psize_A", "no pixel size", "give a .cs with the blob slot's psize_A")
    apix = np.asarray(ds["blob/psize_A"], dtype=np.float64)
    if not (np.isfinite(apix) & (apix > 0)).all():
        raise InputError(path, "blob/psize_A", "pixel size is not a positive number", "fix the blob slot")
    return apix


def _locate_images(path: Path, ds: Dataset, fields: set[str],
                   project_dir: Path | None) -> tuple[pd.Index, np.ndarray, np.ndarray, int]:
    """The image stacks ``blob/path`` names (resolved), each particle's stack and 0-based slice, and the
    common box size, after checking the stacks' headers (and ``blob/shape``, where given) against the table."""
    names = [strip_cryosparc_prefix(p) for p in _strings(ds["blob/path"])]
    codes, uniques = pd.factorize(pd.Series(names))
    # CryoSPARC keeps .cs files in <project>/Jnn/, so the file's grandparent is the project folder.
    bases = [Path(project_dir) if project_dir is not None else Path.cwd(), path.parent.parent, path.parent]
    resolved = [str(resolve_image_path(u, bases, path, "blob/path")) for u in uniques]
    rcodes, image_files = pd.factorize(pd.Series(resolved))
    file_index = rcodes[codes].astype(np.int64)
    slice_index = np.asarray(ds["blob/idx"], dtype=np.int64)
    box = check_stacks(path, "blob/idx", [Path(p) for p in image_files], file_index, slice_index)
    if "blob/shape" in fields:
        shape = np.asarray(ds["blob/shape"]).reshape(len(ds), -1)
        if (shape != box).any():
            raise InputError(path, "blob/shape", f"blob/shape {shape[np.argmax((shape != box).any(1))].tolist()} "
                             f"does not match the stacks' box {box}", "fix blob/shape or re-extract")
    return image_files, file_index, slice_index, box


def _read_ctf(path: Path, ds: Dataset, fields: set[str]) -> dict[str, np.ndarray]:
    """The ctf slot as :class:`ParticleSet` CTF parameters (Å, degrees, kV, mm); every value finite."""
    ctf = {"defocus_u": _ctf_field(path, ds, fields, "ctf/df1_A"),
           "defocus_v": (_ctf_field(path, ds, fields, "ctf/df2_A") if "ctf/df2_A" in fields
                         else _ctf_field(path, ds, fields, "ctf/df1_A")),
           "defocus_angle": _ctf_field(path, ds, fields, "ctf/df_angle_rad", 0.0, 180 / np.pi),
           "voltage": _ctf_field(path, ds, fields, "ctf/accel_kv"),
           "cs": _ctf_field(path, ds, fields, "ctf/cs_mm"),
           "amplitude_contrast": _ctf_field(path, ds, fields, "ctf/amp_contrast"),
           "phase_shift": _ctf_field(path, ds, fields, "ctf/phase_shift_rad", 0.0, 180 / np.pi),
           "bfactor": _ctf_field(path, ds, fields, "ctf/bfactor", 0.0),
           "scale": _ctf_field(path, ds, fields, "ctf/scale", 1.0)}
    for k, v in ctf.items():
        if not np.isfinite(v).all():
            raise InputError(path, k, "CTF parameter is NaN", "fix the ctf slot")
    return ctf


def _ctf_field(path: Path, ds: Dataset, fields: set[str], f: str, default: float | None = None,
               scale: float = 1.0) -> np.ndarray:
    """The ctf field ``f`` times ``scale``; where it is missing, ``default`` for every particle, or
    InputError when the field has no default."""
    if f in fields:
        return np.asarray(ds[f], dtype=np.float64) * scale
    if default is None:
        raise InputError(path, f, "defocus is given but this CTF parameter is missing",
                         "give a .cs with the complete ctf slot")
    return np.full(len(ds), default)


def _read_alignments(path: Path, ds: Dataset, fields: set[str], apix: np.ndarray
                     ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The alignments3D slot's rotations ``(N, 3, 3)``, shifts ``(N, 2)`` in blob pixels and half sets in
    {1, 2}, each ``None`` where the slot does not give it (zero shifts where only poses are given)."""
    rotations = shifts = half_set = None
    if "alignments3D/pose" in fields:
        rotations = poses.rotvec_to_rotations(np.asarray(ds["alignments3D/pose"], dtype=np.float64))
        shifts = np.zeros((len(ds), 2))
    if "alignments3D/shift" in fields:
        align_psize = (np.asarray(ds["alignments3D/psize_A"], dtype=np.float64)
                       if "alignments3D/psize_A" in fields else apix.copy())
        align_psize = np.where(align_psize > 0, align_psize, apix)
        shifts = poses.cryosparc_shift_to_shift(np.asarray(ds["alignments3D/shift"], dtype=np.float64), align_psize, apix)
    if "alignments3D/split" in fields:
        split = np.asarray(ds["alignments3D/split"], dtype=np.int64)
        if not np.isin(split, (0, 1)).all():
            raise InputError(path, "alignments3D/split", "values other than 0 and 1 found", "fix or drop the split")
        half_set = split + 1
    return rotations, shifts, half_set


def dataset_frame(ds: Dataset) -> pd.DataFrame:
    """A ``.cs`` table as a DataFrame: one column per field, vector fields as ``name[0]``, ``name[1]``, ..."""
    cols: dict[str, np.ndarray] = {}
    for f in ds.fields():
        a = np.asarray(ds[f])
        if a.ndim == 1:
            cols[f] = _strings(a) if a.dtype.kind in "OSU" else a
        else:
            for i in range(a.shape[1]):
                cols[f"{f}[{i}]"] = a[:, i]
    return pd.DataFrame(cols)


def write_particles_cs(particles: ParticleSet, path: str | Path, rotations: np.ndarray, shifts: np.ndarray,
                       half_set: np.ndarray | None = None, keep: np.ndarray | None = None,
                       extra: dict[str, np.ndarray] | None = None) -> None:
    """Write a CryoSPARC particle ``.cs`` with new ``alignments3D``, atomically.

    A ``.cs`` input passes every field (and uid) through; a STAR input gets ``blob/*`` (``blob/path``
    as written in ``rlnImageName``) and ``ctf/*`` built from it. ``rotations`` ``(N, 3, 3)``, ``shifts``
    ``(N, 2)`` px and ``half_set`` ``(N,)`` in {1, 2} (default: the input split, by
    :func:`cryofastar_core.reconstruct.half_sets.half_sets`) cover all ``N`` particles; ``keep`` picks
    rows; ``extra`` maps ``slot/field`` names to ``(N, ...)`` arrays (e.g. ``alignments3D/error``) that
    are set after the defaults.
    """
    n = len(particles)
    ds = particles.dataset.copy() if particles.dataset is not None else _dataset_from_star(particles)
    missing = [f for f in ALIGN_FIELDS if f[0] not in ds.fields()]
    if missing:
        ds.add_fields(missing)
        for f in missing:
            ds[f[0]] = _ALIGN_DEFAULTS.get(f[0], 0)
    ds["alignments3D/pose"] = poses.rotations_to_rotvec(_rows(rotations, n, "rotations")).astype(np.float32)
    ds["alignments3D/shift"] = np.asarray(_rows(shifts, n, "shifts"), dtype=np.float32)
    ds["alignments3D/psize_A"] = particles.apix.astype(np.float32)  # shifts are in blob pixels
    if half_set is None:
        from cryofastar_core.reconstruct.half_sets import half_sets

        half_set = half_sets(particles.half_set, n, "the particles")
    hs = np.asarray(_rows(half_set, n, "half_set")).astype(np.int64)
    if not np.isin(hs, (1, 2)).all():
        raise ValueError("half_set values must be 1 or 2")
    ds["alignments3D/split"] = (hs - 1).astype(np.uint32)
    for name, values in (extra or {}).items():
        values = _rows(values, n, name)
        if name not in ds.fields():
            ds.add_fields([(name, values.dtype.str, values.shape[1:])] if values.ndim > 1 else [(name, values.dtype.str)])
        ds[name] = values
    if keep is not None:
        ds = ds.take(as_indices(keep, n))
    with atomic_output(path) as tmp:
        ds.save(tmp)


def _rows(a, n: int, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.shape[0] != n:
        raise ValueError(f"{what} has {a.shape[0]} rows for {n} particles")
    return a


def _dataset_from_star(particles: ParticleSet) -> Dataset:
    n = len(particles)
    fields = list(BLOB_FIELDS) + (list(CTF_FIELDS) if particles.ctf is not None else [])
    ds = Dataset.allocate(n, fields)
    names = particles.table[IMAGE_NAME].astype(str).str.strip().str.partition("@")
    stack = names[2].where(names[1] == "@", particles.table[IMAGE_NAME].astype(str))
    ds["blob/path"] = np.array(stack.tolist(), dtype=object)
    ds["blob/idx"] = particles.slice_index.astype(np.uint32)
    ds["blob/shape"] = np.full((n, 2), particles.box, dtype=np.uint32)
    ds["blob/psize_A"] = particles.apix.astype(np.float32)
    ds["blob/sign"] = particles.sign.astype(np.float32)
    if particles.ctf is not None:
        c = particles.ctf
        group = (pd.to_numeric(particles.table[OPTICS_GROUP]).to_numpy() if OPTICS_GROUP in particles.table.columns
                 else np.ones(n))
        ds["ctf/exp_group_id"] = group.astype(np.uint32)
        for f, key, scale in (("ctf/accel_kv", "voltage", 1), ("ctf/cs_mm", "cs", 1),
                              ("ctf/amp_contrast", "amplitude_contrast", 1), ("ctf/df1_A", "defocus_u", 1),
                              ("ctf/df2_A", "defocus_v", 1), ("ctf/df_angle_rad", "defocus_angle", np.pi / 180),
                              ("ctf/phase_shift_rad", "phase_shift", np.pi / 180), ("ctf/scale", "scale", 1),
                              ("ctf/bfactor", "bfactor", 1)):
            ds[f] = (c[key] * scale).astype(np.float32)
    return ds


def dataset_to_relion31(particles: ParticleSet) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RELION 3.1 particle and optics tables for a ``.cs`` input (the mapping listed under "Conventions" in
    ``plugin/README.md``)."""
    ds = particles.dataset
    fields = set(ds.fields())
    stacks = [strip_cryosparc_prefix(p) for p in _strings(ds["blob/path"])]
    table = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@{p}" for i, p in zip(particles.slice_index, stacks)]})
    keys = pd.DataFrame({"rlnImagePixelSize": particles.apix})
    if "ctf/exp_group_id" in fields:
        keys.insert(0, "_exp_group", np.asarray(ds["ctf/exp_group_id"]).astype(np.int64))
    if particles.ctf is not None:
        c = particles.ctf
        keys["rlnVoltage"], keys["rlnSphericalAberration"] = c["voltage"], c["cs"]
        keys["rlnAmplitudeContrast"] = c["amplitude_contrast"]
    group, optics = build_optics(keys, particles.box)
    optics = optics.drop(columns=[c for c in ("_exp_group",) if c in optics.columns])
    table["rlnOpticsGroup"] = group
    if "location/micrograph_path" in fields:
        table["rlnMicrographName"] = [strip_cryosparc_prefix(p) for p in _strings(ds["location/micrograph_path"])]
    if particles.ctf is not None:
        c = particles.ctf
        table["rlnDefocusU"], table["rlnDefocusV"], table["rlnDefocusAngle"] = c["defocus_u"], c["defocus_v"], c["defocus_angle"]
        table["rlnPhaseShift"], table["rlnCtfBfactor"], table["rlnCtfScalefactor"] = c["phase_shift"], c["bfactor"], c["scale"]
    if particles.rotations is not None:
        rot, tilt, psi = poses.rotations_to_euler(particles.rotations)
        table["rlnAngleRot"], table["rlnAngleTilt"], table["rlnAnglePsi"] = rot, tilt, psi
    if particles.shifts is not None:
        origin = poses.shift_to_origin_angst(particles.shifts, particles.apix)
        table["rlnOriginXAngst"], table["rlnOriginYAngst"] = origin[:, 0], origin[:, 1]
    if particles.half_set is not None:
        table["rlnRandomSubset"] = particles.half_set.astype(np.int64)
    return table, optics
