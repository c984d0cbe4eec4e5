"""Several classes in one ab initio (cryofastar_core/refine/classes.py, cryofastar_core/job/classes.py): two
conformations of one small volume (the same blobs, two of them gone in the second) separate into two
classes, through the engine and through the whole job."""
from __future__ import annotations

import json

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from _volumes import blob_volume

from cryofastar_core.evaluation.metrics import rotation_errors
from cryofastar_core.geometry import random_rotations, rotvec_to_matrix
from cryofastar_core.io import read_particles, write_map
from cryofastar_core.job import JobConfig, run
from cryofastar_core.refine.classes import _best_permutation, classify_poses, dealt_labels, ranked_labels, seeded_labels
from cryofastar_core.refine.driver import RefineConfig
from cryofastar_core.simulation.particle_sets import SimulateConfig, simulate

BOX, APIX, PER_CLASS = 32, 3.0, 300


def _conformations() -> list[torch.Tensor]:
    """Twelve blobs, and the same first eight: one frame, a change of a third of the mass."""
    return [blob_volume(BOX, n_blobs=12, seed=0), blob_volume(BOX, n_blobs=8, seed=0)]


def _accuracy(labels: np.ndarray, truth: np.ndarray) -> float:
    """Share of particles in the right class, under the better naming of the two classes."""
    a = float((labels == truth).mean())
    return max(a, 1 - a)


def test_classes_are_dealt_evenly_and_matched_by_correlation():
    half = np.array([1] * 9 + [2] * 7)
    labels = dealt_labels(half, 3, seed=1)
    for k in (1, 2):
        counts = np.bincount(labels[torch.as_tensor(half == k)].numpy(), minlength=3)
        assert counts.max() - counts.min() <= 1
    assert torch.equal(labels, dealt_labels(half, 3, seed=1))  # every rank deals the same
    corr = np.array([[0.1, 0.9, 0.0], [0.2, 0.1, 0.8], [0.7, 0.3, 0.1]])
    assert _best_permutation(corr) == [1, 2, 0]


def test_classes_start_ranked_by_fit_within_each_half():
    half = np.array([1, 2] * 6)
    fit = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 3.0, 2.0, 4.0, 1.0, 5.0, 0.0, 6.0])
    labels = ranked_labels(fit, half, 3).numpy()
    # half 1 holds fits 5, 4, 3, 2, 1, 0 in that order, half 2 holds 1, 2, 3, 4, 5, 6: best two in class 0
    assert labels[half == 1].tolist() == [0, 0, 1, 1, 2, 2]
    assert labels[half == 2].tolist() == [2, 2, 1, 1, 0, 0]


def test_the_worst_fitting_particles_seed_the_other_classes():
    half = np.array([1, 2] * 10)
    fit = torch.arange(20.0).flip(0)  # half 1 holds fits 19, 17, ..., 1; half 2 holds 18, 16, ..., 0
    labels = seeded_labels(fit, half, 2, 0.2).numpy()
    # In each half the worst-fitting fifth (2 of 10, the last two rows) starts class 1, the rest class 0.
    assert labels[half == 1].tolist() == [0] * 8 + [1] * 2
    assert labels[half == 2].tolist() == [0] * 8 + [1] * 2
    labels = seeded_labels(fit, half, 3, 0.2).numpy()
    assert labels[half == 1].tolist() == [0] * 6 + [1] * 2 + [2] * 2  # the worst into the last class
    # With many classes each seeds at most 1/K of a half: class 0 keeps some.
    labels = seeded_labels(fit, half, 5, 0.3).numpy()
    assert np.bincount(labels[half == 2], minlength=5).tolist() == [2, 2, 2, 2, 2]


def test_peak_over_spread_tells_the_maps_structure_from_another():
    """Views of the map's own structure stand out at one rotation; views of another structure do not."""
    from cryofastar_core.physics.fourier import fft2c, fourier_crop_volume
    from cryofastar_core.physics.projection import prepare_volume, project
    from cryofastar_core.refine.global_pass import grid_projections, peak_over_spread, so3_grid
    from cryofastar_core.refine.matching import FourierBand

    g = torch.Generator().manual_seed(5)
    own, other = blob_volume(BOX, n_blobs=12, seed=0), blob_volume(BOX, n_blobs=12, seed=7)
    n = 60
    R = random_rotations(n, g, dtype=torch.float64).float()
    views = torch.cat([project(own, R[:n // 2]), project(other, R[n // 2:])])
    views = views / views.std(dim=(-2, -1), keepdim=True) + torch.randn(n, BOX, BOX, generator=g)   # SNR 1
    band = FourierBand(BOX, 8.0, torch.device("cpu"))
    X = fft2c(views).reshape(n, -1)[:, band.idx_full]
    proj = grid_projections(prepare_volume(fourier_crop_volume(own, band.crop)), band, so3_grid(15.0))
    z = peak_over_spread(proj, band, X, torch.zeros(n, 2, dtype=torch.float64), torch.zeros(1, 2),
                         torch.ones(X.shape[1]), None, APIX)
    mine, theirs = z[:n // 2], z[n // 2:]
    auc = float((mine[:, None] > theirs[None, :]).double().mean())
    print(f"peak over spread: own median {float(mine.median()):.2f}, other {float(theirs.median()):.2f}, AUC {auc:.2f}")
    assert auc > 0.9


@pytest.fixture(scope="module")
def two_conformations():
    """``PER_CLASS`` views of each conformation (SNR 1, CTF, shifts), shuffled together; poses 3-6 degrees
    from the truth, as the job's one-class consensus leaves them."""
    from cryofastar_core.physics.ctf import CTFParams
    from cryofastar_core.physics.projection import prepare_volume
    from cryofastar_core.simulation.images import simulate_images

    g = torch.Generator().manual_seed(3)
    n = 2 * PER_CLASS
    R = random_rotations(n, g, dtype=torch.float64)
    s = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * 2
    dfu = 4000 + 6000 * torch.rand(n, generator=g, dtype=torch.float64)
    ctf = CTFParams.from_arrays(dict(defocus_u=dfu, defocus_v=dfu - 300, defocus_angle=torch.rand(n, generator=g) * 180,
                                     voltage=300.0, cs=2.7, amplitude_contrast=0.1))
    truth = torch.randperm(n, generator=g) % 2
    images = torch.empty(n, BOX, BOX)
    for c, vol in enumerate(_conformations()):
        m = torch.nonzero(truth == c).flatten()
        _, images[m] = simulate_images(prepare_volume(vol), R[m].float(), s[m].float(), ctf.index(m), APIX, snr=1.0,
                                       generator=g)
    axis = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)
    R0 = R @ rotvec_to_matrix(axis * torch.deg2rad(3 + 3 * torch.rand(n, 1, generator=g, dtype=torch.float64)))
    return dict(images=images, ctf=ctf, R=R, s=s, R0=R0, truth=truth.numpy(), half=np.arange(n) % 2 + 1)


def test_two_conformations_separate_into_two_classes(two_conformations):
    data = two_conformations
    images = data["images"]
    cfg = RefineConfig(chunk_size=200, global_passes=8)
    out = classify_poses(lambda idx: images[torch.as_tensor(idx)], data["ctf"], APIX, data["R0"], data["s"],
                         data["half"], 2, cfg)
    labels = out.labels.numpy()
    acc = _accuracy(labels, data["truth"])
    print(f"right class {acc:.3f}; per pass {[h['fraction_changed_class'] for h in out.history]}")
    assert acc >= 0.9
    assert all(h["stage"] == "classes" and len(h["classes"]) == 2 for h in out.history)
    # Each class's poses stay near the truth (the grid's spacing is 15 degrees), in both halves.
    for c in (0, 1):
        m = torch.as_tensor(labels == c)
        assert rotation_errors(out.rotations[m], data["R"][m])["median_deg"] < 10
    # Each class's map is its own conformation's: it correlates better with that truth than with the other.
    own = np.bincount(data["truth"][labels == 0], minlength=2).argmax()
    truths = _conformations()
    for c, t in ((0, own), (1, 1 - own)):
        full = out.maps[c][0] + out.maps[c][1]
        corr = [float(torch.corrcoef(torch.stack([full.flatten(), v.flatten()]))[0, 1]) for v in truths]
        assert corr[t] > corr[1 - t], (c, corr)


def test_refining_needs_global_passes_for_classes(tmp_path):
    from cryofastar_core.runtime.errors import InputError

    with pytest.raises(InputError) as err:
        JobConfig(particles=tmp_path / "p", out_dir=tmp_path / "o", classes=2, refine_iters=0).validate()
    assert err.value.field == "classes"
    with pytest.raises(ValueError):
        classify_poses(lambda idx: torch.zeros(len(idx), 8, 8), None, 1.0, torch.eye(3)[None].repeat(4, 1, 1),
                       torch.zeros(4, 2), np.array([1, 2, 1, 2]), 1)


@pytest.fixture(scope="module")
def mixed_star(tmp_path_factory):
    """A STAR of both conformations simulated by the project's simulator (SNR 1, CTF, shifts), one after the
    other in the table (each row's image name says which)."""
    return _mixture_star(tmp_path_factory.mktemp("classes"), "conf", _conformations(), (PER_CLASS, PER_CLASS), 11)


def _mixture_star(root, name: str, volumes: list[torch.Tensor], counts: tuple[int, ...], seed: int):
    """``root/particles.star``: ``counts[c]`` views of each volume ``c`` (the project's simulator: SNR 1, CTF,
    shifts), in ``root/<name><c>/``, one volume after the other in the table (each image name says which)."""
    tables = []
    for c, (vol, n) in enumerate(zip(volumes, counts)):
        write_map(root / f"{name}{c}.mrc", vol.numpy(), APIX)
        star = simulate(SimulateConfig(out_dir=root / f"{name}{c}", n=n, box=BOX, snr=1.0, seed=seed + c,
                                       map_path=root / f"{name}{c}.mrc", ctf=True, max_shift=1.5))
        t = starfile.read(star, always_dict=True)
        t["particles"]["rlnImageName"] = [f"{image.split('@')[0]}@{name}{c}/{image.split('@')[1]}"
                                          for image in t["particles"]["rlnImageName"]]
        tables.append(t)
    both = {"optics": tables[0]["optics"], "particles": pd.concat([t["particles"] for t in tables], ignore_index=True)}
    starfile.write(both, root / "particles.star", overwrite=True)
    return root / "particles.star"


@pytest.fixture(scope="module")
def two_class_job(mixed_star, tmp_path_factory):
    """The job with ``classes 2`` on both conformations: its report and output folder."""
    out = tmp_path_factory.mktemp("two_classes") / "job"
    report = run(JobConfig(particles=mixed_star, out_dir=out, views=16, candidates=3, anchors=4, device="cpu",
                           refine_iters=1, classes=2))
    return report, out


def test_job_with_two_classes(mixed_star, two_class_job):
    """``classes 2`` through the whole job: every particle gets a class (rlnClassNumber), each class its maps,
    FSC and verdict; the two conformations land in different classes. The shipped weights start it (their
    poses are near chance here, but spread over the sphere, which the consensus needs: untrained weights
    give every view almost the same pose)."""
    star = mixed_star
    report, out = two_class_job
    data = json.loads((out / "report.json").read_text())
    classes = data["classes"]
    assert [c["number"] for c in classes] == [1, 2] and classes[0]["particles"] >= classes[1]["particles"]
    assert classes[1]["files"] == ["class002_map.mrc", "class002_half1.mrc", "class002_half2.mrc", "class002_fsc.tsv"]
    for name in classes[1]["files"]:
        assert (out / name).exists()
    assert mrcfile.read(out / "class002_map.mrc").shape == (BOX, BOX, BOX)
    rows = starfile.read(out / "particles.star", always_dict=True)["particles"]
    posed = read_particles(out / "particles.star", star.parent)
    assert set(rows["rlnClassNumber"]) <= {1, 2} and len(rows) == report.n_kept
    # particles.star keeps the input's order: its image names say which conformation each row is.
    conf = np.array([1 if "conf1/" in name else 0 for name in rows["rlnImageName"]])
    acc = _accuracy(rows["rlnClassNumber"].to_numpy() - 1, conf)
    print(f"job: right class {acc:.3f}; classes {classes}")
    assert acc >= 0.9
    assert len(posed) == len(rows)


def test_a_one_class_run_says_when_its_particles_split_in_two(mixed_star, tmp_path):
    """The one-class job's split test (cryofastar_core/evaluation/heterogeneity.py), told to keep one class:
    on both conformations the verdict is not ``ok`` and says to run two classes; on one conformation alone it
    finds no split."""
    figures = {}
    for name, star in (("mixed", mixed_star), ("one", mixed_star.parent / "conf0" / "particles.star")):
        run(JobConfig(particles=star, out_dir=tmp_path / name, views=16, candidates=3, anchors=4, device="cpu",
                      refine_iters=1, split_mixed=False))
        data = json.loads((tmp_path / name / "report.json").read_text())
        figures[name] = (data["quality"], data["timings_s"]["heterogeneity"])
    print({k: (q["verdict"], q["heterogeneity"]) for k, (q, _) in figures.items()})
    mixed, one = figures["mixed"][0], figures["one"][0]
    assert mixed["heterogeneity"]["heterogeneous"] and mixed["verdict"] != "ok"
    assert "--classes 2" in " ".join(mixed["reasons"])
    assert one["heterogeneity"]["shells"] >= 3 and not one["heterogeneity"]["heterogeneous"]
    assert not any("--classes 2" in r for r in one["reasons"])


def test_a_one_class_run_whose_particles_split_goes_on_as_two_classes(mixed_star, two_class_job, tmp_path):
    """With one class asked (the default) and the split test finding two structures, the job refines the
    particles again as two classes (cryofastar_core/job/driver.py, ``_split_into_classes``), exactly as
    ``classes 2`` does: each conformation gets its own class and maps (every particle in the same class as in
    the ``classes 2`` run), and class 1's verdict says why the run has classes."""
    out = tmp_path / "job"
    run(JobConfig(particles=mixed_star, out_dir=out, views=16, candidates=3, anchors=4, device="cpu", refine_iters=1))
    data = json.loads((out / "report.json").read_text())
    assert data["settings"]["classes"] == 1 and [c["number"] for c in data["classes"]] == [1, 2]
    assert data["quality"]["heterogeneity"]["heterogeneous"] and "refine_classes" in data["timings_s"]
    assert any("refined as two classes" in r for r in data["quality"]["reasons"])
    assert (out / "class002_map.mrc").exists()
    rows = starfile.read(out / "particles.star", always_dict=True)["particles"]
    conf = np.array([1 if "conf1/" in name else 0 for name in rows["rlnImageName"]])
    acc = _accuracy(rows["rlnClassNumber"].to_numpy() - 1, conf)
    print(f"split into classes: right class {acc:.3f}; classes {data['classes']}")
    assert acc >= 0.9
    asked = starfile.read(two_class_job[1] / "particles.star", always_dict=True)["particles"]
    assert list(asked["rlnImageName"]) == list(rows["rlnImageName"])
    assert (asked["rlnClassNumber"].to_numpy() == rows["rlnClassNumber"].to_numpy()).all()


def test_a_class_stuck_on_wrong_maps_is_refined_afresh(mixed_star):
    """A class whose local refinement starts from maps of another volume and random poses cannot leave them
    (its verdict is not ``ok``); the class step then runs a one-class ab initio of its particles, judges both
    and keeps the ab initio's poses, which are near the truth."""
    from dataclasses import replace

    from cryofastar_core.job.classes import _refine_class
    from cryofastar_core.job.refine_at import refine_at
    from cryofastar_core.job.work_scale import plan_work
    from cryofastar_core.reconstruct import half_sets

    particles = read_particles(mixed_star, mixed_star.parent)
    members = np.arange(PER_CLASS)  # the first conformation's rows
    half = half_sets(particles.half_set, len(particles), str(mixed_star))
    scale = plan_work(particles.box, APIX, half[members], None, 0, 0)
    g = torch.Generator().manual_seed(8)
    start = random_rotations(PER_CLASS, g, dtype=torch.float64).numpy()
    other = blob_volume(BOX, n_blobs=12, seed=5)
    wrong = tuple(other + 0.01 * torch.randn(other.shape, generator=g) for _ in range(2))
    rcfg = RefineConfig(iterations=3)
    result, note = _refine_class(particles, members, scale, start, np.zeros((PER_CLASS, 2)), half, APIX, rcfg,
                                 wrong, 2, 0, torch.device("cpu"), None, None)
    truth = torch.as_tensor(particles.rotations[members])
    err = rotation_errors(torch.as_tensor(result.rotations), truth)["median_deg"]
    stuck = refine_at(particles, members, BOX, start, np.zeros((PER_CLASS, 2)), half[members], APIX,
                      replace(rcfg, global_step_deg=None), wrong, torch.device("cpu"), None, None)
    err_stuck = rotation_errors(torch.as_tensor(stuck.rotations), truth)["median_deg"]
    print(f"afresh note {note!r}; median error {err:.1f} deg (from the wrong maps alone {err_stuck:.1f} deg)")
    assert note == ", afresh"
    assert err < 15.0 < 30.0 < err_stuck  # 15°: what the verdict calls ready for local refinement


def test_another_structure_seeds_its_own_class_from_random_poses(tmp_path, monkeypatch, caplog):
    """The class step's seeded start (cryofastar_core/job/classes.py, ``_seeded_start``) on a set where a
    fifth is another structure, at poses a consensus would leave (the truth for the main structure, noise
    for the other): the particles the consensus fits worst seed class 2, mostly the other structure; their
    consensus poses are judged not ``ok``, so the seed is posed afresh from random poses; the rest keep
    their consensus poses. (Whether such an ab initio converges is measured at the benchmark's sizes,
    bench/results/2026-12-06-classes.md: 100 particles at box 32 are too few.)"""
    import logging

    from cryofastar_core.job import classes as job_classes
    from cryofastar_core.job.work_scale import plan_work
    from cryofastar_core.reconstruct import half_sets

    counts = (400, 100)
    volumes = [blob_volume(BOX, n_blobs=12, seed=seed) for seed in (0, 7)]
    particles = read_particles(_mixture_star(tmp_path, "vol", volumes, counts, 21), tmp_path)
    other = np.arange(len(particles)) >= counts[0]
    start = np.asarray(particles.rotations).copy()
    start[other] = random_rotations(int(other.sum()), torch.Generator().manual_seed(3), dtype=torch.float64).numpy()
    half = half_sets(particles.half_set, len(particles), "particles.star")
    # A fifth of each half (50 particles) is the seed here: the floor of 250 per half is for real sets.
    monkeypatch.setattr(job_classes, "SEED_PARTICLES_PER_HALF", 0)
    monkeypatch.setattr(job_classes, "RESTARTS", 1)
    cfg = JobConfig(particles=tmp_path / "particles.star", out_dir=tmp_path / "out", classes=2)
    with caplog.at_level(logging.INFO, logger="cryofastar_core.job.classes"):
        labels, R, _ = job_classes._seeded_start(particles, np.arange(len(particles)), plan_work(BOX, APIX, half, None, 0, 0),
                                                 start, np.asarray(particles.shifts), half, APIX, RefineConfig(), cfg,
                                                 torch.device("cpu"), None, None)
    seed = labels.numpy() == 1
    print(f"seed {seed.sum()} particles, {other[seed].mean():.2f} of them the other structure")
    assert seed.sum() == 100 and other[seed].mean() >= 0.7
    assert "an ab initio from random poses" in caplog.text
    assert np.allclose(R[~seed], start[~seed])  # the rest keep their consensus poses
    assert not np.allclose(R[seed], start[seed])
