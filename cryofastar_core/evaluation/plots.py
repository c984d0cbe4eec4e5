"""Diagnostic figures: FSC curves, viewing directions, confidence histogram, loss curves.

Each function takes plain arrays and an output path, draws with matplotlib's Agg backend
(no display needed) and writes the file atomically (temp name, then rename), so a crash
never leaves a half-written figure. The figure format follows the path's suffix (.png, .pdf, .svg).
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cryofastar_core.io import atomic_output  # noqa: E402

__all__ = ["fsc_plot", "viewing_directions", "viewing_direction_plot", "confidence_histogram", "junk_histogram",
           "loss_curves"]


def _save(fig: "plt.Figure", path: str | os.PathLike) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def fsc_crossings(freq, curve, apix: float, thresholds: Sequence[float] = (0.5, 0.143)) -> dict[float, float]:
    """Resolution in Å where ``curve`` ``(S,)`` first drops below each threshold, by the same rule as
    the reported resolution (:func:`cryofastar_core.reconstruct.resolution_at`; Nyquist if never)."""
    from cryofastar_core.reconstruct import resolution_at

    f = torch.as_tensor(_to_numpy(freq), dtype=torch.float64)
    c = torch.as_tensor(_to_numpy(curve), dtype=torch.float64)
    return {float(t): resolution_at(f, c, float(apix), float(t)) for t in thresholds}


def fsc_plot(freq, curves: Mapping[str, object], apix: float, path: str | os.PathLike,
             thresholds: Sequence[float] = (0.5, 0.143), title: str | None = None,
             mark_crossings: bool = True) -> Path:
    """Plot FSC curves against spatial frequency, with each threshold and where each curve crosses it.

    Args:
        freq: ``(S,)`` shell frequencies in cycles/pixel (0 .. 0.5), shared by all curves.
        curves: label -> ``(S,)`` FSC values.
        apix: pixel size in Å, to label the axis in 1/Å and resolution in Å.
        path: output image path.
        thresholds: horizontal reference lines (0.5 and the gold-standard 0.143 by default).
        mark_crossings: a dotted vertical line and the resolution at each curve's first crossing;
            off when the poses failed and no number may read as a resolution.
    """
    f = _to_numpy(freq) / float(apix)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in curves.items():
        line, = ax.plot(f, _to_numpy(values), label=str(label), lw=1.5)
        if not mark_crossings or not f.size:
            continue
        for k, (t, res) in enumerate(fsc_crossings(freq, values, apix, thresholds).items()):
            x = 1.0 / res if res > 0 and np.isfinite(res) else f.max()
            ax.axvline(x, color=line.get_color(), ls=":", lw=0.8)
            ax.annotate(f"{res:.1f} Å", (x, t), xytext=(3, 4 + 10 * k), textcoords="offset points", fontsize=7,
                        color=line.get_color())
    for t in thresholds:
        ax.axhline(t, color="grey", ls="--", lw=0.8)
        ax.text(f.max() if f.size else 0.0, t, f" {t:g}", va="center", ha="left", fontsize=8, color="grey")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    if f.size:
        ax.set_xlim(0, f.max())
    ax.grid(alpha=0.3)
    # A secondary axis in Å is what users read resolutions from.
    sec = ax.secondary_xaxis("top", functions=(lambda x: 1.0 / np.maximum(x, 1e-9),
                                               lambda r: 1.0 / np.maximum(r, 1e-9)))
    if f.size and f.max() > 0:
        ticks = np.linspace(f.max() / 5, f.max(), 5)
        sec.set_xticks(1.0 / ticks)
        sec.set_xticklabels([f"{1 / t:.1f}" for t in ticks])
    sec.set_xlabel("resolution (Å)")
    if curves:
        ax.legend(fontsize=8, loc="lower left")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def viewing_directions(rotations) -> tuple[np.ndarray, np.ndarray]:
    """Projection directions of internal rotations as (azimuth, elevation) in radians.

    With the internal convention the image is the integral along the image z axis of the map
    sampled at ``R @ (x, y, z)``, so the projection axis in map coordinates is ``R @ (0, 0, 1)``,
    the third column of ``R`` (= third row of RELION's ``A``, RELION's viewing direction
    ``(sin tilt cos rot, sin tilt sin rot, cos tilt)``).

    Args:
        rotations: ``(N, 3, 3)``.
    Returns:
        azimuth ``(N,)`` in (-pi, pi] (= RELION rot), elevation ``(N,)`` in [-pi/2, pi/2] (= 90° - tilt).
    """
    R = _to_numpy(rotations).reshape(-1, 3, 3)
    d = R[:, :, 2]
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    azimuth = np.arctan2(d[:, 1], d[:, 0])
    elevation = np.arcsin(np.clip(d[:, 2], -1.0, 1.0))
    return azimuth, elevation


def equal_area_cells(n_particles: int, per_cell: float = 10.0) -> tuple[int, int]:
    """``(n_azimuth, n_elevation)`` cells for a viewing-direction map: about ``per_cell`` particles per cell
    for a uniform set (fewer cells make counts of a few particles read as structure), at least 12 x 6 and
    at most 72 x 36; twice as many azimuth as elevation cells, so the cells are about square on the map."""
    n_el = int(np.clip(round(math.sqrt(max(n_particles, 1) / per_cell / 2)), 6, 36))
    return 2 * n_el, n_el


def viewing_direction_plot(rotations, path: str | os.PathLike, bins: tuple[int, int] | None = None,
                           title: str | None = None) -> Path:
    """Mollweide map of projection directions on equal-area cells, coloured by particles per cell over
    what a uniform set would put there (1 everywhere for uniform directions).

    Cells are equal in azimuth and in ``sin(elevation)``, so each covers the same solid angle: a uniform
    set looks flat, with no bright specks at the poles (thin polar bins divided by their small solid angle
    did that). ``bins`` = ``(n_azimuth, n_elevation)``; default :func:`equal_area_cells`.
    """
    az, el = viewing_directions(rotations)
    n_az, n_el = bins or equal_area_cells(az.size)
    az_edges = np.linspace(-math.pi, math.pi, n_az + 1)
    el_edges = np.arcsin(np.linspace(-1.0, 1.0, n_el + 1))
    counts, _, _ = np.histogram2d(az, el, bins=(az_edges, el_edges))
    expected = max(az.size, 1) / (n_az * n_el)
    ratio = counts / expected
    fig = plt.figure(figsize=(7, 4.4), layout="constrained")
    ax = fig.add_subplot(111, projection="mollweide")
    vmax = max(2.0, float(np.quantile(ratio, 0.99))) if ratio.size else 2.0
    mesh = ax.pcolormesh(az_edges, el_edges, ratio.T, cmap="viridis", shading="flat", vmin=0.0, vmax=vmax)
    cb = fig.colorbar(mesh, ax=ax, orientation="horizontal", shrink=0.6, aspect=30, pad=0.02,
                      label=f"particles per cell / uniform expectation ({expected:.1f} per cell; equal-area cells)")
    cb.ax.xaxis.set_major_locator(MaxNLocator(5))
    cb.ax.tick_params(labelsize=8)
    # The default 30°/15° grid crowds its labels into each other and into the title: label every
    # 60° of azimuth (drawn along the equator, over the data: white with a dark outline) and every
    # 30° of elevation (outside the map, on the left).
    ax.set_longitude_grid(60)
    ax.set_latitude_grid(30)
    ax.tick_params(axis="both", labelsize=8)
    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    for label in ax.get_xticklabels():
        label.set_color("white")
        label.set_path_effects(outline)
    ax.grid(alpha=0.4)
    ax.set_xlabel("azimuth (RELION rot)", fontsize=9)
    ax.set_ylabel("elevation (90° − tilt)", fontsize=9)
    ax.set_title(title or f"viewing directions (N = {az.size})", fontsize=10, pad=8)
    return _save(fig, path)


def junk_histogram(scores, flagged, path: str | os.PathLike, null_score: float | None = None,
                   bins: int = 60, title: str | None = None) -> Path:
    """Histogram of the particles' evidence scores (``rlnParticleSelectZScore``: log-evidence in SDs of the
    good particles'), the ones set apart as junk in another colour, and where structureless images score
    (``null_score``, the phase-randomised copies' median on the same scale)."""
    s = _to_numpy(scores).ravel()
    f = _to_numpy(flagged).ravel().astype(bool)
    ok = np.isfinite(s)
    s, f = s[ok], f[ok]
    edges = np.histogram_bin_edges(s, bins=bins) if s.size else np.linspace(-1, 1, bins + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(s[~f], bins=edges, color="tab:blue", alpha=0.8, label=f"kept ({int((~f).sum())})")
    if f.any():
        ax.hist(s[f], bins=edges, color="tab:red", alpha=0.8, label=f"junk: no evidence for any pose ({int(f.sum())})")
    if null_score is not None and math.isfinite(null_score):
        ax.axvline(null_score, color="black", ls="--", lw=1.2, label="structureless images (median)")
    ax.set_xlabel("evidence for the pose (SDs from the good particles' mean, log scale)")
    ax.set_ylabel("particles")
    ax.legend(fontsize=8)
    ax.set_title(title or f"junk detection (N = {s.size})", fontsize=10)
    return _save(fig, path)


def confidence_histogram(values, path: str | os.PathLike, threshold: float | None = None,
                         bins: int = 50, title: str | None = None) -> Path:
    """Histogram of per-particle confidences, with an optional vertical cut-off line."""
    v = _to_numpy(values).ravel()
    v = v[np.isfinite(v)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(v, bins=bins, color="tab:blue", alpha=0.8)
    if threshold is not None:
        kept = int((v >= threshold).sum())
        ax.axvline(threshold, color="tab:red", ls="--", lw=1.2,
                   label=f"threshold {threshold:g}: {kept}/{v.size} kept")
        ax.legend(fontsize=8)
    ax.set_xlabel("confidence (0-1, as in the STAR column and --min-confidence)")
    ax.set_ylabel("particles")
    ax.set_title(title or f"confidence (N = {v.size})", fontsize=10)
    return _save(fig, path)


_X_KEYS = ("step", "iteration", "iter", "epoch")


def _read_loss_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    out: dict[str, list[float]] = {k: [] for k in rows[0]}
    for row in rows:
        for k in out:
            try:
                out[k].append(float(row[k]))
            except (TypeError, ValueError):
                out[k].append(math.nan)
    return {k: np.asarray(v) for k, v in out.items() if not np.all(np.isnan(v))}


def loss_curves(source: str | os.PathLike | Mapping[str, object], path: str | os.PathLike,
                log_y: bool = True, title: str | None = None) -> Path:
    """Plot training curves from a CSV file (header row) or a dict of column -> values.

    A column named ``step``/``iteration``/``iter``/``epoch`` (the first one present) is the x axis;
    every other numeric column is drawn as one curve (NaN gaps allowed, e.g. a validation loss
    logged less often). Non-positive values are dropped on a log axis.
    """
    if isinstance(source, Mapping):
        cols = {k: _to_numpy(v).ravel() for k, v in source.items()}
    else:
        cols = _read_loss_csv(Path(source))
    x_key = next((k for k in _X_KEYS if k in cols), None)
    n = max((c.size for c in cols.values()), default=0)
    x = cols[x_key] if x_key else np.arange(n, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, y in cols.items():
        if k == x_key or k in _X_KEYS:
            continue
        xx = x[: y.size]
        ok = np.isfinite(y) & (y > 0 if log_y else True)
        if ok.any():
            ax.plot(xx[ok], y[ok], label=k, lw=1.2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(x_key or "step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
