"""Plots: files are real images, written atomically; viewing directions follow the pose convention."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg
from matplotlib.transforms import Affine2D

from cryofastar_core.evaluation import plots
from cryofastar_core.geometry import relion_euler_to_matrix, random_rotations


def _is_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img


def _no_temp_files(folder):
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_fsc_plot(tmp_path):
    freq = np.arange(17) / 32
    curves = {"a": np.clip(1.2 - 2 * freq, -0.1, 1), "b": torch.linspace(1, 0, 17)}
    out = plots.fsc_plot(freq, curves, apix=2.0, path=tmp_path / "fsc.png")
    assert out == tmp_path / "fsc.png"
    _is_png(out)
    _no_temp_files(tmp_path)


def test_fsc_crossings_follow_the_reported_resolution():
    from cryofastar_core.reconstruct import resolution_at

    freq = np.arange(17) / 32
    curve = np.clip(1.2 - 2 * freq, -0.1, 1)  # 0.5 at 0.35 cycles/px, 0.143 at 0.5285 (never: Nyquist)
    got = plots.fsc_crossings(freq, curve, apix=2.0)
    assert got[0.5] == pytest.approx(2.0 / 0.35, rel=1e-6)
    assert got[0.143] == pytest.approx(4.0)  # never below 0.143 within Nyquist
    assert got[0.5] == resolution_at(torch.as_tensor(freq), torch.as_tensor(curve), 2.0, 0.5)


def test_viewing_directions_match_relion_direction():
    # RELION's viewing direction (sin t cos r, sin t sin r, cos t); our projection axis is R @ e_z.
    rot, tilt, psi = np.array([30.0, -120.0, 75.0]), np.array([50.0, 100.0, 10.0]), np.array([70.0, 5.0, -33.0])
    R = relion_euler_to_matrix(torch.tensor(rot), torch.tensor(tilt), torch.tensor(psi))
    az, el = plots.viewing_directions(R)
    np.testing.assert_allclose(np.rad2deg(az), rot, atol=1e-9)
    np.testing.assert_allclose(90.0 - np.rad2deg(el), tilt, atol=1e-9)
    # psi spins the image about the projection axis: it must not move the direction.
    R2 = relion_euler_to_matrix(torch.tensor(rot), torch.tensor(tilt), torch.tensor(psi + 40.0))
    np.testing.assert_allclose(np.stack(plots.viewing_directions(R2)), np.stack([az, el]), atol=1e-9)


def test_viewing_direction_plot_uniform_and_concentrated(tmp_path):
    g = torch.Generator().manual_seed(0)
    R = random_rotations(2000, generator=g)
    az, el = plots.viewing_directions(R)
    # Haar-uniform rotations give uniform directions: sin(elevation) is uniform on [-1, 1].
    assert abs(np.mean(np.sin(el))) < 0.05 and abs(np.mean(np.sin(el) ** 2) - 1 / 3) < 0.03
    _is_png(plots.viewing_direction_plot(R, tmp_path / "dirs.png"))
    top = relion_euler_to_matrix(torch.zeros(50), torch.zeros(50), torch.linspace(0, 300, 50))
    _is_png(plots.viewing_direction_plot(top, tmp_path / "top.png"))
    _no_temp_files(tmp_path)


def _drawn_text_boxes(fig):
    """Every text the figure draws (titles, axis and tick labels, colour bar): (text, extent in
    points, font size in points, horizontal)."""
    import matplotlib.text

    drawn, original = [], matplotlib.text.Text.draw

    def record(self, renderer):
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)
        return original(self, renderer)

    matplotlib.text.Text.draw = record
    try:
        fig.canvas.draw()
    finally:
        matplotlib.text.Text.draw = original
    renderer, to_pt = fig.canvas.get_renderer(), 72.0 / fig.dpi
    return [(t.get_text(), t.get_window_extent(renderer).transformed(Affine2D().scale(to_pt)),
             t.get_fontsize(), t.get_rotation() % 180 == 0) for t in drawn]


def _text_clashes(boxes):
    """Pairs of texts that overlap, or that sit side by side on one line less than one em apart
    (they read as one run, e.g. tick labels "-150°-120°")."""
    clashes = []
    for i, (ta, a, fa, ha) in enumerate(boxes):
        for tb, b, fb, hb in boxes[i + 1:]:
            w = min(a.x1, b.x1) - max(a.x0, b.x0)  # > 0: overlap along x, < 0: horizontal gap
            h = min(a.y1, b.y1) - max(a.y0, b.y0)
            if (w > 0.5 and h > 0.5) or (ha and hb and h > 0.5 and -w < max(fa, fb)):
                clashes.append((ta, tb))
    return clashes


@pytest.mark.parametrize("poses", ["uniform", "collapsed", "pole"])
def test_viewing_direction_plot_text_does_not_overlap(tmp_path, monkeypatch, poses):
    # Realistic pose sets: 2,000 Haar-random rotations; 2,000 within a few degrees of one direction
    # (a collapsed model); 50,000 around the pole (the top of the map).
    # The old layout failed on all three: azimuth labels every 30° ran together ("-150°-120°").
    g = torch.Generator().manual_seed(1)
    n = {"uniform": 2000, "collapsed": 2000, "pole": 50000}[poses]
    if poses == "uniform":
        R = random_rotations(n, generator=g)
    else:
        rot = 100.0 + 3.0 * torch.randn(n, generator=g, dtype=torch.float64)
        tilt = (110.0 if poses == "collapsed" else 0.0) + 3.0 * torch.randn(n, generator=g, dtype=torch.float64)
        R = relion_euler_to_matrix(rot, tilt, 360.0 * torch.rand(n, generator=g, dtype=torch.float64))
    boxes, save = [], plots._save

    def capture(fig, path):
        boxes.extend(_drawn_text_boxes(fig))
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    _is_png(plots.viewing_direction_plot(R, tmp_path / "dirs.png"))
    texts = [b[0] for b in boxes]
    assert f"viewing directions (N = {n})" in texts and "azimuth (RELION rot)" in texts
    assert any(t.startswith("particles per cell / uniform expectation") for t in texts)
    assert len(boxes) > 10  # the tick labels are among them
    clashes = _text_clashes(boxes)
    assert not clashes, f"overlapping text in the viewing-direction plot: {clashes}"


def test_confidence_histogram(tmp_path):
    v = np.random.default_rng(0).uniform(0, 1, 500)
    v[3] = np.nan  # ignored, not a crash
    _is_png(plots.confidence_histogram(v, tmp_path / "conf.png", threshold=0.3))
    _is_png(plots.confidence_histogram(v, tmp_path / "conf2.png"))


def test_loss_curves_from_csv_and_dict(tmp_path):
    csv = tmp_path / "loss.csv"
    csv.write_text("step,train_loss,val_loss\n0,1.0,\n1,0.5,0.7\n2,0.25,\n3,0.2,0.3\n")
    _is_png(plots.loss_curves(csv, tmp_path / "loss.png"))
    _is_png(plots.loss_curves({"epoch": [1, 2, 3], "loss": [3.0, 2.0, 1.0]}, tmp_path / "loss2.png"))
    pdf = plots.loss_curves({"loss": [3.0, 2.0, 1.0]}, tmp_path / "loss.pdf", log_y=False)
    assert pdf.read_bytes()[:4] == b"%PDF"


def test_failed_write_leaves_nothing(tmp_path):
    # An unknown format fails inside savefig: no file, no leftover temporary.
    with pytest.raises(ValueError):
        plots.confidence_histogram([0.1, 0.2], tmp_path / "conf.notaformat")
    assert list(tmp_path.iterdir()) == []
