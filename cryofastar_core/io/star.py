"""RELION particle STAR files: 3.1+ (``data_optics`` + ``data_particles``) and 3.0 legacy (one table).

Column names live here and in :mod:`~cryofastar_core.io.relion_tables` (those the ``.cs`` module
shares). Reading goes through the ``starfile``
package; every STAR written is RELION 3.1 format (RELION's own ``# version 30001`` header per block).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryofastar_core.runtime.errors import InputError
from cryofastar_core.io import poses
from cryofastar_core.io.atomic_write import atomic_output
from cryofastar_core.io.cs import dataset_to_relion31
from cryofastar_core.io.particle_set import ParticleSet, as_indices, check_stacks
from cryofastar_core.io.paths import relion_bases, resolve_image_path, strip_cryosparc_prefix
from cryofastar_core.io.relion_tables import (ANGLES, IMAGE_NAME, OPTICS_GROUP, OPTICS_LABELS_30, ORIGINS_ANGST,
                                              ORIGINS_PX, RANDOM_SUBSET, build_optics)

log = logging.getLogger(__name__)

# What relion_project 3.1.3 --nr_uniform writes (origins in px that it never applied to its images).
_RELION_PROJECT_PARTICLES = {*ANGLES, *ORIGINS_PX, OPTICS_GROUP, IMAGE_NAME}
_RELION_PROJECT_OPTICS = {OPTICS_GROUP, "rlnOpticsGroupName", "rlnVoltage", "rlnSphericalAberration",
                          "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"}


# ----------------------------------------------------------------------------------------------- reading

def _read_blocks(path: Path) -> dict[str, pd.DataFrame]:
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises a variety of parser errors
        raise InputError(path, None, f"not a readable STAR file ({exc})", "check the file is a RELION STAR file") from exc
    return {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}


def read_star_particles(path: Path, project_dir: Path | None = None) -> ParticleSet:
    """Read and check a RELION particle STAR (see :func:`cryofastar_core.io.read_particles`)."""
    path = Path(path)
    blocks = _read_blocks(path)
    optics = blocks.get("optics")
    parts = blocks.get("particles")
    if parts is None:
        parts = next((b for k, b in blocks.items() if k != "optics" and IMAGE_NAME in b.columns), None)
    if parts is None:
        parts = next((b for k, b in blocks.items() if k != "optics"), None)
    if parts is None or len(parts) == 0:
        raise InputError(path, None, "the STAR file holds no particles", "give a particle STAR file with at least one row")
    if IMAGE_NAME not in parts.columns:
        raise InputError(path, IMAGE_NAME, "column is missing, so the particle images cannot be found",
                         "give a particle STAR (e.g. from Extract, Select or Refine3D), not a micrograph or model STAR")
    fmt = "relion31" if optics is not None else "relion30"
    n = len(parts)

    if fmt == "relion31":
        group_row = _optics_rows(path, optics, parts)

        def value(label: str) -> np.ndarray | None:
            if label in optics.columns:
                return optics[label].to_numpy()[group_row]
            return parts[label].to_numpy() if label in parts.columns else None
    else:
        def value(label: str) -> np.ndarray | None:
            return parts[label].to_numpy() if label in parts.columns else None

    apix = _pixel_size(path, fmt, value)
    image_files, file_index, slice_index = _image_locations(path, parts[IMAGE_NAME], project_dir)
    box = check_stacks(path, IMAGE_NAME, image_files, file_index, slice_index)
    if fmt == "relion31" and "rlnImageSize" in optics.columns:
        sizes = optics["rlnImageSize"].to_numpy()
        used = np.unique(group_row)
        wrong = [int(optics[OPTICS_GROUP].iloc[g]) for g in used if int(sizes[g]) != box]
        if wrong:
            raise InputError(path, "rlnImageSize", f"optics group(s) {wrong} give a box size other than the stacks' {box}",
                             "correct rlnImageSize in data_optics or re-extract the particles")

    ctf = _ctf(path, parts, value, n)
    rotations = None
    if all(a in parts.columns for a in ANGLES):
        ang = [_finite(path, parts, a) for a in ANGLES]
        rotations = poses.euler_to_rotations(*ang)
    shifts = _shifts(path, fmt, parts, optics, apix)
    if shifts is None and rotations is not None:
        shifts = np.zeros((n, 2))
    half_set = None
    if RANDOM_SUBSET in parts.columns:
        half_set = pd.to_numeric(parts[RANDOM_SUBSET], errors="coerce").to_numpy()
        if not np.isin(half_set, (1, 2)).all():
            raise InputError(path, RANDOM_SUBSET, "values other than 1 and 2 found",
                             "remove the column (a new random split is then made) or set it to 1/2")
        half_set = half_set.astype(np.int64)
    return ParticleSet(source=path, source_format=fmt, image_files=image_files, file_index=file_index,
                       slice_index=slice_index, apix=apix, box=box, ctf=ctf, rotations=rotations, shifts=shifts,
                       half_set=half_set, sign=np.ones(n), table=parts, optics=optics,
                       project_dir=project_dir)


def _optics_rows(path: Path, optics: pd.DataFrame, parts: pd.DataFrame) -> np.ndarray:
    if OPTICS_GROUP not in optics.columns:
        raise InputError(path, OPTICS_GROUP, "data_optics has no rlnOpticsGroup column", "repair the optics table")
    if OPTICS_GROUP not in parts.columns:
        raise InputError(path, OPTICS_GROUP, "data_particles has no rlnOpticsGroup column although data_optics exists",
                         "add rlnOpticsGroup to every particle (e.g. re-run Import or Extract in RELION 3.1+)")
    ids = pd.to_numeric(optics[OPTICS_GROUP], errors="coerce").to_numpy()
    lookup = {int(g): i for i, g in enumerate(ids) if np.isfinite(g)}
    groups = pd.to_numeric(parts[OPTICS_GROUP], errors="coerce").to_numpy()
    unknown = sorted({str(int(g)) if np.isfinite(g) else "(not a number)" for g in np.unique(groups)
                      if not np.isfinite(g) or int(g) not in lookup})
    if unknown:
        raise InputError(path, OPTICS_GROUP, f"particles refer to optics group(s) [{', '.join(unknown[:5])}] "
                         "that data_optics does not define",
                         f"define them in data_optics (defined: {sorted(lookup)}) or fix rlnOpticsGroup")
    return np.array([lookup[int(g)] for g in groups], dtype=np.int64)


def _pixel_size(path: Path, fmt: str, value) -> np.ndarray:
    apix = value("rlnImagePixelSize")
    if apix is None and fmt == "relion30":
        dps, mag = value("rlnDetectorPixelSize"), value("rlnMagnification")
        if dps is not None and mag is not None:
            apix = 1e4 * np.asarray(dps, dtype=np.float64) / np.asarray(mag, dtype=np.float64)
    if apix is None:
        where = "data_optics" if fmt == "relion31" else "the particle table"
        raise InputError(path, "rlnImagePixelSize", f"no pixel size in {where}",
                         "add rlnImagePixelSize (Å/px of the particle images)"
                         + ("" if fmt == "relion31" else ", or rlnDetectorPixelSize and rlnMagnification"))
    apix = np.asarray(apix, dtype=np.float64)
    if not (np.isfinite(apix) & (apix > 0)).all():
        raise InputError(path, "rlnImagePixelSize", "pixel size is not a positive number", "set the correct Å/px")
    return apix


def _image_locations(path: Path, names: pd.Series, project_dir: Path | None
                     ) -> tuple[list[Path], np.ndarray, np.ndarray]:
    names = names.astype(str).str.strip()
    parts = names.str.partition("@")
    has_at = parts[1] == "@"
    files = parts[2].where(has_at, names)
    numbers = pd.to_numeric(parts[0].where(has_at, "1"), errors="coerce").to_numpy()
    bad = ~np.isfinite(numbers) | (numbers < 1) | (np.mod(numbers, 1) != 0)
    if bad.any():
        raise InputError(path, IMAGE_NAME, f"bad image name '{names.iloc[int(np.argmax(bad))]}'",
                         "use RELION's N@stack form with N counted from 1")
    codes, uniques = pd.factorize(files)
    bases = relion_bases(path, project_dir)
    resolved = [resolve_image_path(strip_cryosparc_prefix(u), bases, path, IMAGE_NAME) for u in uniques]
    # Different spellings of one file (./a.mrcs, a.mrcs) become one entry.
    rcodes, image_files = pd.factorize(pd.Series([str(p) for p in resolved]))
    file_index = rcodes[codes].astype(np.int64)
    return [Path(p) for p in image_files], file_index, numbers.astype(np.int64) - 1


def _finite(path: Path, table: pd.DataFrame, label: str) -> np.ndarray:
    a = pd.to_numeric(table[label], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(a).all():
        raise InputError(path, label, f"non-numeric or NaN value in row {int(np.argmax(~np.isfinite(a))) + 1}",
                         "fix or remove those particles")
    return a


def _ctf(path: Path, parts: pd.DataFrame, value, n: int) -> dict[str, np.ndarray] | None:
    if "rlnDefocusU" not in parts.columns:
        return None
    u = _finite(path, parts, "rlnDefocusU")
    out = {"defocus_u": u,
           "defocus_v": _finite(path, parts, "rlnDefocusV") if "rlnDefocusV" in parts.columns else u.copy(),
           "defocus_angle": _finite(path, parts, "rlnDefocusAngle") if "rlnDefocusAngle" in parts.columns else np.zeros(n)}
    for key, label in (("voltage", "rlnVoltage"), ("cs", "rlnSphericalAberration"),
                       ("amplitude_contrast", "rlnAmplitudeContrast")):
        v = value(label)
        if v is None:
            raise InputError(path, label, "defocus is given but this CTF parameter is missing",
                             f"add {label} to data_optics (or the particle table for RELION 3.0 files)")
        out[key] = np.asarray(v, dtype=np.float64)
    for key, label, default in (("phase_shift", "rlnPhaseShift", 0.0), ("bfactor", "rlnCtfBfactor", 0.0),
                                ("scale", "rlnCtfScalefactor", 1.0)):
        v = value(label)
        if v is None and label == "rlnCtfBfactor":
            v = value("rlnCtfBFactor")  # a common misspelling; RELION's label has a lower-case f
        out[key] = np.full(n, default) if v is None else np.asarray(v, dtype=np.float64)
    for key, v in out.items():
        if not np.isfinite(v).all():
            raise InputError(path, key, "CTF parameter is NaN or not numeric", "fix the CTF values of those particles")
    return out


def _shifts(path: Path, fmt: str, parts: pd.DataFrame, optics: pd.DataFrame | None, apix: np.ndarray) -> np.ndarray | None:
    if all(c in parts.columns for c in ORIGINS_ANGST):
        origin = np.stack([_finite(path, parts, c) for c in ORIGINS_ANGST], -1)
        return poses.origin_angst_to_shift(origin, apix)
    if not any(c in parts.columns for c in ORIGINS_PX):
        return None
    px = np.stack([_finite(path, parts, c) if c in parts.columns else np.zeros(len(parts)) for c in ORIGINS_PX], -1)
    if fmt == "relion30":
        return px
    # A RELION 3.1 file with pixel origins only. RELION 3.1 reads just the ...Angst labels there and
    # silently takes 0, so the pixel values cannot be trusted in either direction.
    if not px.any():
        return np.zeros_like(px)
    if (set(parts.columns) == _RELION_PROJECT_PARTICLES and set(optics.columns) == _RELION_PROJECT_OPTICS
            and len(optics) == 1):
        # relion_project 3.1.3 --nr_uniform --sigma_offset writes random px origins but projects with
        # the (absent, hence 0) Angst origins: its images are not shifted. Tested with the binary.
        log.warning("%s: looks like relion_project 3.1.3 output; its pixel rlnOriginX/Y were never applied "
                    "to the images, so the shifts are taken as 0 (as RELION 3.1 itself does)", path)
        return np.zeros_like(px)
    raise InputError(path, "rlnOriginX", "origins are given only in pixels (rlnOriginX/Y) in a RELION 3.1 file "
                     "(it has data_optics); RELION 3.1 ignores these columns and uses 0",
                     "if they are real shifts, add rlnOriginXAngst = rlnOriginX × rlnImagePixelSize (same for Y) "
                     "and delete rlnOriginX/Y; if the images were not shifted (e.g. relion_project), delete rlnOriginX/Y")


# ----------------------------------------------------------------------------------------------- writing

def write_particles_star(particles: ParticleSet, path: str | Path, rotations: np.ndarray | None = None,
                         shifts: np.ndarray | None = None, half_set: np.ndarray | None = None,
                         extra_columns: dict[str, np.ndarray] | None = None, keep: np.ndarray | None = None) -> None:
    """Write ``particles`` as a RELION 3.1 particle STAR, atomically.

    Every input column and the optics table are kept; only the pose columns (``rlnAngleRot/Tilt/Psi``,
    ``rlnOriginXAngst/YAngst``), ``rlnRandomSubset`` and ``extra_columns`` change or are added.
    ``rotations`` ``(N, 3, 3)``, ``shifts`` ``(N, 2)`` px, ``half_set`` ``(N,)`` in {1, 2} and the extra
    columns are given for all ``N`` particles; ``keep`` (boolean mask or indices) picks the rows written.
    A 3.0 input is converted (optics table built, pixel origins replaced by Å origins); a ``.cs`` input
    becomes a fresh 3.1 table. For a per-particle confidence use :data:`CONFIDENCE_LABEL`.
    """
    n = len(particles)
    table, optics = _relion31_tables(particles)
    if rotations is not None:
        rot, tilt, psi = poses.rotations_to_euler(_check_len(rotations, n, "rotations"))
        table["rlnAngleRot"], table["rlnAngleTilt"], table["rlnAnglePsi"] = rot, tilt, psi
    if shifts is not None:
        origin = poses.shift_to_origin_angst(_check_len(shifts, n, "shifts"), particles.apix)
        table = table.drop(columns=[c for c in ORIGINS_PX if c in table.columns])
        table["rlnOriginXAngst"], table["rlnOriginYAngst"] = origin[:, 0], origin[:, 1]
    if half_set is not None:
        hs = np.asarray(_check_len(half_set, n, "half_set")).astype(np.int64)
        if not np.isin(hs, (1, 2)).all():
            raise ValueError("half_set values must be 1 or 2")
        table[RANDOM_SUBSET] = hs
    for label, values in (extra_columns or {}).items():
        table[label] = _check_len(values, n, label)
    if keep is not None:
        rows = as_indices(keep, n)
        table = table.iloc[rows].reset_index(drop=True)
        used = pd.unique(table[OPTICS_GROUP])
        optics = optics[optics[OPTICS_GROUP].isin(used)].reset_index(drop=True)
    if (particles.sign != 1).any():
        log.warning("%s: input images have CryoSPARC blob/sign -1; RELION reads them with that contrast "
                    "(STAR has no sign column)", path)
    _write_star_blocks(path, {"optics": optics, "particles": table})


def new_star(path: str | Path, image_names: list[str], apix: float, box: int, voltage: float, cs: float,
             amplitude_contrast: float, ctf: dict[str, np.ndarray] | None, rotations: np.ndarray | None,
             shifts: np.ndarray | None, extra_columns: dict[str, np.ndarray] | None = None) -> None:
    """Write a new RELION 3.1 particle STAR with one optics group (used by ``cryofastar simulate``).

    ``image_names`` are ``N@stack`` strings; ``ctf`` maps ``CTFParams`` field names to ``(N,)`` arrays
    (``voltage``/``cs``/``amplitude_contrast`` come from the optics arguments and are ignored there);
    ``rotations`` ``(N, 3, 3)`` internal, ``shifts`` ``(N, 2)`` px.
    """
    n = len(image_names)
    optics = pd.DataFrame({OPTICS_GROUP: [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [float(voltage)],
                           "rlnSphericalAberration": [float(cs)], "rlnAmplitudeContrast": [float(amplitude_contrast)],
                           "rlnImagePixelSize": [float(apix)], "rlnImageSize": [int(box)], "rlnImageDimensionality": [2]})
    table = pd.DataFrame({IMAGE_NAME: list(image_names), OPTICS_GROUP: np.ones(n, dtype=np.int64)})
    if ctf is not None:
        for key, label in (("defocus_u", "rlnDefocusU"), ("defocus_v", "rlnDefocusV"), ("defocus_angle", "rlnDefocusAngle"),
                           ("phase_shift", "rlnPhaseShift"), ("bfactor", "rlnCtfBfactor"), ("scale", "rlnCtfScalefactor")):
            if key in ctf:
                table[label] = np.broadcast_to(np.asarray(ctf[key], dtype=np.float64), (n,))
    if rotations is not None:
        rot, tilt, psi = poses.rotations_to_euler(_check_len(rotations, n, "rotations"))
        table["rlnAngleRot"], table["rlnAngleTilt"], table["rlnAnglePsi"] = rot, tilt, psi
    if shifts is not None:
        origin = poses.shift_to_origin_angst(_check_len(shifts, n, "shifts"), np.full(n, float(apix)))
        table["rlnOriginXAngst"], table["rlnOriginYAngst"] = origin[:, 0], origin[:, 1]
    for label, values in (extra_columns or {}).items():
        table[label] = _check_len(values, n, label)
    _write_star_blocks(path, {"optics": optics, "particles": table})


def _check_len(a, n: int, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.shape[0] != n:
        raise ValueError(f"{what} has {a.shape[0]} rows for {n} particles")
    return a


def _write_star_blocks(path: str | Path, blocks: dict[str, pd.DataFrame]) -> None:
    with atomic_output(path) as tmp:
        starfile.write(blocks, tmp, float_format="%.6f")
        text = tmp.read_text()
        # RELION writes "# version 30001" above each block; keep files looking like RELION's own.
        text = re.sub(r"^(data_\w*)", r"# version 30001\n\n\1", text, flags=re.M)
        tmp.write_text(text)


def _relion31_tables(particles: ParticleSet) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Copies of the particle and optics tables in RELION 3.1 layout (converted from 3.0 or .cs if needed)."""
    if particles.source_format == "relion31":
        table, optics = particles.table.copy(), particles.optics.copy()
        if any(c in table.columns for c in ORIGINS_PX):
            table = table.drop(columns=[c for c in ORIGINS_PX if c in table.columns])
            if particles.shifts is not None and not all(c in table.columns for c in ORIGINS_ANGST):
                origin = poses.shift_to_origin_angst(particles.shifts, particles.apix)
                table["rlnOriginXAngst"], table["rlnOriginYAngst"] = origin[:, 0], origin[:, 1]
        return table, optics
    if particles.source_format == "relion30":
        return _from_relion30(particles)
    return dataset_to_relion31(particles)


def _from_relion30(particles: ParticleSet) -> tuple[pd.DataFrame, pd.DataFrame]:
    table = particles.table.copy().reset_index(drop=True)
    moved = [c for c in OPTICS_LABELS_30 if c in table.columns and c != "rlnImagePixelSize"]
    keys = table[moved].copy()
    keys["rlnImagePixelSize"] = particles.apix
    group, optics = build_optics(keys, particles.box)
    table = table.drop(columns=[c for c in (*moved, "rlnImagePixelSize") if c in table.columns])
    table[OPTICS_GROUP] = group
    if any(c in table.columns for c in ORIGINS_PX):
        table = table.drop(columns=[c for c in ORIGINS_PX if c in table.columns])
        if not all(c in table.columns for c in ORIGINS_ANGST) and particles.shifts is not None:
            origin = poses.shift_to_origin_angst(particles.shifts, particles.apix)
            table["rlnOriginXAngst"], table["rlnOriginYAngst"] = origin[:, 0], origin[:, 1]
    return table, optics
