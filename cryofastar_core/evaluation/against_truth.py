"""Evaluation against the ground truth: compare predicted poses (and optionally a map) with the ground truth.

Particles of ``--pred`` and ``--truth`` (RELION ``.star`` or CryoSPARC ``.cs``) are matched by image
(stack file and slice, i.e. ``rlnImageName``); particles found in only one file are ignored with a
warning. Rotation errors are measured after the best global rotation and hand (an ab initio frame and hand
are arbitrary):
median and mean geodesic angle, mean ``||R_true - G R_pred||_F``; translation error in pixels; and the
same allowing one 180°-type mate of the frame (``metrics.mate_errors``: a pseudo-symmetric structure can
split its particles between a pose and its mate, and the plain median then says how they split); and the
shift error once the frame's origin, as free as its orientation, is aligned too.
With ``--map`` and ``--truth-map`` the map is moved into the truth frame with the same ``G`` and the
FSC resolution against the truth map is reported (0.5 and 0.143 thresholds).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from cryofastar_core.runtime.errors import InputError


log = logging.getLogger(__name__)


def _image_keys(ps) -> list[tuple[str, int]]:
    files = [str(Path(f).resolve()) for f in ps.image_files]
    return [(files[int(f)], int(s)) for f, s in zip(ps.file_index, ps.slice_index)]


def match_particles(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(i_pred, i_truth)`` of the particles present in both sets, matched by image."""
    where = {k: i for i, k in enumerate(_image_keys(truth))}
    ip, it = [], []
    for i, k in enumerate(_image_keys(pred)):
        j = where.get(k)
        if j is not None:
            ip.append(i)
            it.append(j)
    return np.asarray(ip, dtype=np.int64), np.asarray(it, dtype=np.int64)


def evaluate(pred_path: Path, truth_path: Path, map_path: Path | None = None, truth_map_path: Path | None = None,
             allow_mirror: bool = True, project_dir: Path | None = None) -> dict:
    """All metrics as a JSON-ready dict (see module docstring)."""
    from cryofastar_core.evaluation import metrics
    from cryofastar_core.io.mrc import read_map
    from cryofastar_core.io.particles import read_particles

    if (map_path is None) != (truth_map_path is None):
        raise InputError(map_path or truth_map_path, None, "--map and --truth-map go together",
                         "give both maps, or neither")
    pred = read_particles(pred_path, project_dir)
    truth = read_particles(truth_path, project_dir)
    for ps, path in ((pred, pred_path), (truth, truth_path)):
        if ps.rotations is None:
            raise InputError(path, "rlnAngleRot/rlnAngleTilt/rlnAnglePsi", "the file carries no poses",
                             "give a particle file with orientations (e.g. from cryofastar or Refine3D)")
    ip, it = match_particles(pred, truth)
    if len(ip) == 0:
        raise InputError(pred_path, "rlnImageName", f"no particle matches an image of {truth_path}",
                         "compare files that describe the same particle images")
    if len(ip) < len(pred) or len(it) < len(truth):
        log.warning("evaluating %d particles found in both files (%d predicted, %d true)", len(ip), len(pred), len(truth))
    rot = metrics.rotation_errors(pred.rotations[ip], truth.rotations[it], allow_mirror=allow_mirror)
    result = {"n_particles": int(len(ip)), "rotation": rot,
              "rotation_mate": metrics.mate_errors(pred.rotations[ip], truth.rotations[it], allow_mirror=allow_mirror),
              "translation": metrics.translation_errors(pred.shifts[ip], truth.shifts[it]),
              "translation_origin_aligned": metrics.translation_errors_origin_aligned(pred.shifts[ip], truth.shifts[it],
                                                                                      truth.rotations[it])}
    if map_path is not None:
        vol, apix_map = read_map(map_path)
        truth_vol, apix = read_map(truth_map_path)
        if vol.shape != truth_vol.shape:
            raise InputError(map_path, "nx/ny/nz", f"box {vol.shape[0]} differs from the truth map's {truth_vol.shape[0]}",
                             "resample one map to the other's box (e.g. relion_image_handler --new_box)")
        if abs(apix_map - apix) > 1e-3 * apix:
            log.warning("pixel sizes differ (map %.4f, truth %.4f Å/px); using the truth map's", apix_map, apix)
        result["map"] = _map_block(metrics, vol, truth_vol, apix, rot)
    return result


def _map_block(metrics, vol, truth_vol, apix: float, rot: dict) -> dict:
    out = {"apix": apix}
    for t in (0.5, 0.143):
        out[f"resolution_fsc{t}"] = metrics.map_resolution(vol, truth_vol, apix, t, G=rot["G"],
                                                           mirrored=rot["mirrored"], try_mirror=False)
    return out


def format_report(r: dict) -> str:
    rot, tr = r["rotation"], r["translation"]
    lines = [f"particles compared      {r['n_particles']}",
             f"rotation error (deg)    median {rot['median_deg']:.3f}   mean {rot['mean_deg']:.3f}",
             f"rotation F-norm         mean {rot['mean_fnorm']:.4f}   median {rot['median_fnorm']:.4f}",
             f"hand                    {'mirrored (poses compared as F R F)' if rot['mirrored'] else 'same as truth'}",
             f"translation error (px)  median {tr['median_px']:.3f}   mean {tr['mean_px']:.3f}"]
    if "translation_origin_aligned" in r:
        oa = r["translation_origin_aligned"]
        lines.append(f"  origin aligned (px)   median {oa['median_px']:.3f}   mean {oa['mean_px']:.3f}   "
                     f"(frame origin {oa['origin_offset_px']:.2f} px from the truth's)")
    mate = r.get("rotation_mate", {})
    if mate.get("mate_angle_deg") is not None:
        label = f"at a {mate['mate_angle_deg']:.0f}° mate"
        lines.insert(3, f"{label:<24}{100 * mate['mate_fraction']:.1f} % of the particles "
                        f"(a pseudo-symmetry?); error to the nearer of pose and mate: median "
                        f"{mate['median_deg_modulo_mate']:.3f}")
    if "map" in r:
        m = r["map"]
        lines.append(f"map vs truth FSC        {m['resolution_fsc0.5']:.2f} Å at 0.5, {m['resolution_fsc0.143']:.2f} Å "
                     f"at 0.143 (apix {m['apix']:.3f})")
    return "\n".join(lines)


def finite_or_none(x):
    """Strict JSON: infinite resolutions (FSC never above threshold) become null."""
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite_or_none(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x
