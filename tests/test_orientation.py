"""The orientation diagnostic (sampling compensation factor) and the equal-area viewing-direction map."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryofastar_core.evaluation.orientation import ANISOTROPIC_SCF, fourier_sampling, orientation_report, shell_directions
from cryofastar_core.evaluation.plots import equal_area_cells, viewing_directions
from cryofastar_core.geometry import random_rotations, rotations_within_tilt


def _preferred(n: int, fraction: float, tilt_deg: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = int(round(fraction * n))
    return torch.cat([rotations_within_tilt(k, tilt_deg, generator=g, dtype=torch.float64),
                      random_rotations(n - k, generator=g, dtype=torch.float64)])


@pytest.mark.parametrize("n", [200, 2000])
def test_uniform_directions_read_near_one(n):
    report = orientation_report(_preferred(n, 0.0, 25.0), box=64)
    print(f"uniform N = {n}: SCF {report.scf:.3f} on shell {report.shell_px}")
    assert report.scf > 0.98 and not report.anisotropic


@pytest.mark.parametrize("fraction", [0.5, 0.7])
def test_preferred_orientation_is_reported(fraction):
    report = orientation_report(_preferred(2000, fraction, 25.0), box=64)
    print(f"{fraction:.0%} within 25 deg: SCF {report.scf:.3f}, worst direction {report.worst_direction}")
    assert report.scf < ANISOTROPIC_SCF and report.anisotropic
    assert "anisotropic" in report.sentence
    # The least-sampled Fourier directions are those no central section of the preferred views reaches:
    # within 65 degrees of the preferred axis.
    assert abs(report.worst_direction[2]) > math.cos(math.radians(65))
    more = orientation_report(_preferred(2000, 0.9, 25.0), box=64)
    assert more.scf < report.scf


def test_a_missing_cone_reads_zero():
    top_views = torch.eye(3, dtype=torch.float64).expand(500, 3, 3)
    assert orientation_report(top_views, box=64).scf == 0.0
    assert orientation_report(_preferred(500, 1.0, 30.0), box=64).scf == 0.0  # tilts up to 30 deg only


def test_sampling_counts_the_central_sections_through_a_direction():
    # One view along z fills the plane z = 0: the equator's directions, not the poles.
    u = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], dtype=torch.float64)
    S = fourier_sampling(torch.eye(3, dtype=torch.float64)[None], 16.0, u)
    assert S.tolist() == [1.0, 1.0, 0.0]
    d = shell_directions(500)
    assert torch.allclose(d.norm(dim=-1), torch.ones(500, dtype=torch.float64))
    assert abs(float(d.mean(0).norm())) < 0.01


def test_viewing_direction_cells_have_equal_area_and_a_uniform_set_is_flat():
    n = 30000
    az, el = viewing_directions(random_rotations(n, generator=torch.Generator().manual_seed(1)))
    n_az, n_el = equal_area_cells(n)
    assert (n_az, n_el) == (72, 36)
    counts, _, _ = np.histogram2d(az, el, bins=(np.linspace(-math.pi, math.pi, n_az + 1),
                                                np.arcsin(np.linspace(-1, 1, n_el + 1))))
    ratio = counts / (n / (n_az * n_el))
    # Poisson scatter only (about 11.6 per cell): the polar rows are no denser than the equator's.
    assert abs(ratio[:, 0].mean() - 1) < 0.2 and abs(ratio[:, -1].mean() - 1) < 0.2
    assert abs(ratio[:, n_el // 2].mean() - 1) < 0.2
    assert equal_area_cells(1000) == (14, 7) and equal_area_cells(10) == (12, 6)
