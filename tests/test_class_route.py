"""The class-average route on real RELION 3.1 Class2D output (tests/_class2d.py: a simulated set of a
few viewing directions at random in-plane angles and shifts, classified by relion_refine).

Known answers: (1) the composition convention, against the simulated truth: the class pose each
member implies is the same for all members of a class only with the right convention; (2) the job
gives every particle exactly its class's pose composed with its own 2D alignment."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cryofastar_core.evaluation.metrics import chordal_mean
from cryofastar_core.geometry import compose_class_pose, relion_euler_to_matrix, rotation_angle_deg
from cryofastar_core.io import read_particles
from cryofastar_core.io.class2d import averages_star_for, find_class_averages
from cryofastar_core.job.class_route import estimate_from_class_averages
from cryofastar_core.job.config import JobConfig
from cryofastar_core.runtime.errors import InputError

from _class2d import discrete_view_particles, run_class2d

pytestmark = pytest.mark.relion
PER_VIEW = 16


@pytest.fixture(scope="module")
def classified(tmp_path_factory, relion) -> tuple[Path, Path]:
    """``(Class2D run_it008_data.star, truth.star)``: 10 views x 16 particles, box 32, SNR 3, K = 10."""
    root = tmp_path_factory.mktemp("class2d")
    _, truth = discrete_view_particles(root, n_views=10, per_view=PER_VIEW, box=32, snr=3.0)
    return run_class2d(root, classes=10, iterations=8, diameter_angst=90), truth


def _spread_deg(implied: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Per class, the median angle of its members' implied class rotations from their chordal mean."""
    out = []
    for k in np.unique(member):
        r = torch.from_numpy(implied[member == k])
        mean = chordal_mean(r)
        out.append(float(rotation_angle_deg(r, mean.expand_as(r)).median()))
    return np.array(out)


def test_relion_class2d_output_is_found_beside_the_particles(classified):
    data_star, _ = classified
    assert averages_star_for(data_star) == data_star.with_name("run_it008_model.star")
    particles = read_particles(data_star)
    classes = find_class_averages(particles)
    assert classes is not None and classes.images.shape[1:] == (32, 32)
    assert len(classes.member) == len(particles) and classes.member.max() < len(classes.numbers)
    assert find_class_averages(read_particles(data_star.parent.parent / "particles.star")) is None  # no 2D classes


def test_composition_convention_against_the_truth(classified):
    """Members of a class that holds one viewing direction imply one class pose (a degree or two of
    Class2D error); the transposed in-plane convention scatters them by tens of degrees."""
    data_star, truth_star = classified
    particles, truth = read_particles(data_star), read_particles(truth_star)
    classes = find_class_averages(particles)
    view = np.arange(len(particles)) // PER_VIEW
    pure = np.array([len(np.unique(view[classes.member == k])) == 1 for k in range(len(classes.numbers))])
    assert pure.sum() >= 6, "Class2D should separate most of the ten directions"
    in_plane = particles.rotations  # (0, 0, psi) as read
    right = _spread_deg(truth.rotations @ np.transpose(in_plane, (0, 2, 1)), classes.member)[pure]
    wrong = _spread_deg(truth.rotations @ in_plane, classes.member)[pure]
    assert np.median(right) < 3.0 and np.median(wrong) > 20.0
    # shifts: s = s2 + R2ᵀ[:2, :2] s_c, so R2[:2, :2] (s - s2) is one s_c per class
    implied = np.einsum("nab,nb->na", in_plane[:, :2, :2], truth.shifts - particles.shifts)
    spread = [np.median(np.linalg.norm(implied[classes.member == k] - np.median(implied[classes.member == k], 0), axis=1))
              for k in np.flatnonzero(pure)]
    assert np.median(spread) < 0.5
    # and compose_class_pose undoes what the implied pose was built from
    k = classes.member
    class_rot = torch.from_numpy(truth.rotations @ np.transpose(in_plane, (0, 2, 1)))
    rot, _ = compose_class_pose(class_rot, torch.zeros(len(k), 2, dtype=torch.float64), torch.from_numpy(in_plane),
                                torch.zeros(len(k), 2, dtype=torch.float64))
    assert float(rotation_angle_deg(rot, torch.from_numpy(truth.rotations)).max()) < 1e-4  # arccos near 1


def test_the_routes_ceiling_is_near_zero_on_pure_classes_and_far_off_when_they_mix(classified):
    """bench/class_average_benchmark.class_pose_ceiling: each class at the pose its members' truths imply. On
    Class2D that separates the views most particles get within a few degrees; with the class numbers dealt at
    random (every class mixing views) the best class poses are tens of degrees off."""
    import starfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.class_average_benchmark import class_pose_ceiling

    data_star, truth_star = classified
    ceiling = class_pose_ceiling(data_star, truth_star)
    blocks = starfile.read(data_star, always_dict=True)
    numbers = blocks["particles"]["rlnClassNumber"].to_numpy()
    blocks["particles"]["rlnClassNumber"] = np.random.default_rng(0).permutation(numbers)
    mixed_star = data_star.with_name("mixed_it008_data.star")  # with a copy of the averages' STAR beside it
    starfile.write(blocks, mixed_star, overwrite=True)
    mixed_star.with_name("mixed_it008_model.star").write_text(data_star.with_name("run_it008_model.star").read_text())
    mixed = class_pose_ceiling(mixed_star, truth_star)
    print(ceiling, mixed)
    assert ceiling["median_rotation_deg"] < 5.0 and ceiling["pure_classes"] >= 6
    assert mixed["median_rotation_deg"] > 30.0 and mixed["pure_classes"] < ceiling["pure_classes"]


def test_route_gives_each_particle_its_class_pose_turned_by_its_own_alignment(classified, tmp_path):
    data_star, _ = classified
    particles = read_particles(data_star)
    classes = find_class_averages(particles)
    cfg = JobConfig(particles=data_star, out_dir=tmp_path / "out")
    est = estimate_from_class_averages(cfg, particles, classes, torch.device("cpu"))
    psi = particles.table["rlnAnglePsi"].to_numpy(dtype=np.float64)
    zeros = torch.zeros(len(psi), dtype=torch.float64)
    r2 = relion_euler_to_matrix(zeros, zeros, torch.tensor(psi)).numpy()
    m = classes.member
    expected = est["class_rotations"][m] @ r2
    assert np.allclose(est["rotations"], expected, atol=1e-9)
    turned = np.einsum("nba,nb->na", r2[:, :2, :2], est["class_shifts"][m])  # R2ᵀ[:2, :2] s_c
    assert np.allclose(est["shifts"], particles.shifts + turned, atol=1e-9)
    assert all(np.ptp(est["confidence"][m == k]) == 0 for k in np.unique(m))  # a class's confidence, shared


def test_too_few_classes_is_one_clear_error(classified, tmp_path):
    data_star, _ = classified
    particles = read_particles(data_star)
    classes = find_class_averages(particles)
    few = replace(classes, numbers=classes.numbers[:3], images=classes.images[:3], member=classes.member % 3)
    with pytest.raises(InputError, match="class averages have particles"):
        estimate_from_class_averages(JobConfig(particles=data_star, out_dir=tmp_path), particles, few, torch.device("cpu"))


def test_cryofastar_run_takes_the_class2d_star_and_says_so(classified, tmp_path, run_cli):
    """The whole job on the Class2D output: the route is taken, recorded, and the warning names common lines."""
    import json

    data_star, _ = classified
    out = tmp_path / "run"
    done = run_cli("run", "--particles", data_star, "--o", out, "--refine-iters", "0", "--threads", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    n_classes = len(find_class_averages(read_particles(data_star)).numbers)
    summary = report["class_averages"]
    assert {k: summary[k] for k in ("source", "n_classes", "posed_by")} == {
        "source": str(data_star.with_name("run_it008_model.star")), "n_classes": n_classes, "posed_by": "common-lines"}
    assert 0 <= summary["median_support"] <= 1
    assert report["pose_warning"].startswith("FEED-FORWARD POSES FROM CLASSICAL COMMON LINES")
    off = run_cli("run", "--particles", data_star, "--o", tmp_path / "off", "--refine-iters", "0", "--threads", "1",
                  "--class-averages", "off", "--views", "16", "--candidates", "2")
    assert off.returncode == 0, off.stderr[-2000:]
    assert json.loads((tmp_path / "off" / "report.json").read_text())["class_averages"] == {}


def _as_cryosparc(data_star: Path, job: Path, alignment_binning: float = 2.0) -> Path:
    """RELION's Class2D output written as a CryoSPARC 2D classification would hold it (``job`` inside the same
    project folder): ``J9_008_particles.cs`` (blob slot and ``alignments2D``, classes from 0, shifts in pixels
    of an alignment box ``alignment_binning`` times coarser) and ``J9_008_class_averages.cs`` (class ``k`` at
    slice ``k`` of RELION's classes stack), by the conventions of :mod:`cryofastar_core.io.cs_class2d`."""
    from cryosparc.dataset import Dataset

    particles = read_particles(data_star)
    n, apix = len(particles), float(particles.apix[0])
    project = data_star.parent.parent
    ds = Dataset.allocate(n, [("blob/path", "O"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
                              ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("alignments2D/class", "<u4"),
                              ("alignments2D/pose", "<f4"), ("alignments2D/shift", "<f4", (2,)),
                              ("alignments2D/psize_A", "<f4")])
    ds["blob/path"] = np.array([str(p.relative_to(project)) for p in particles.image_files], dtype=object)[
        particles.file_index]
    ds["blob/idx"] = particles.slice_index.astype(np.uint32)
    ds["blob/shape"], ds["blob/psize_A"], ds["blob/sign"] = particles.box, apix, 1.0
    ds["alignments2D/class"] = particles.table["rlnClassNumber"].to_numpy() - 1
    ds["alignments2D/pose"] = np.radians(particles.table["rlnAnglePsi"].to_numpy(dtype=np.float64))
    ds["alignments2D/shift"] = particles.shifts / alignment_binning
    ds["alignments2D/psize_A"] = apix * alignment_binning
    job.mkdir(parents=True, exist_ok=True)
    ds.save(job / "J9_008_particles.cs")
    k = int(particles.table["rlnClassNumber"].max())
    averages = Dataset.allocate(k, [("blob/path", "O"), ("blob/idx", "<u4"), ("blob/psize_A", "<f4")])
    averages["blob/path"] = np.array([">" + str(data_star.with_name("run_it008_classes.mrcs").relative_to(project))] * k,
                                     dtype=object)
    averages["blob/idx"] = np.arange(k, dtype=np.uint32)
    averages["blob/psize_A"] = apix
    averages.save(job / "J9_008_class_averages.cs")
    return job / "J9_008_particles.cs"


def test_cryosparc_2d_classification_gives_what_relions_gives(classified):
    """The same classification read from CryoSPARC's files: the same averages, members and 2D alignments (class
    numbers from 0 instead of 1); a .cs without its averages beside it has none."""
    data_star, _ = classified
    relion = find_class_averages(read_particles(data_star))
    cs_file = _as_cryosparc(data_star, data_star.parent.parent / "J9")
    cs = find_class_averages(read_particles(cs_file))
    assert cs is not None and cs.source == cs_file.with_name("J9_008_class_averages.cs")
    np.testing.assert_array_equal(cs.numbers, relion.numbers - 1)
    np.testing.assert_array_equal(cs.images, relion.images)
    np.testing.assert_array_equal(cs.member, relion.member)
    np.testing.assert_allclose(cs.in_plane, relion.in_plane, atol=1e-6)   # float32 angles in the .cs
    np.testing.assert_allclose(cs.shifts, relion.shifts, atol=1e-5)
    lone = cs_file.with_name("J9_lone_particles.cs")
    lone.write_bytes(cs_file.read_bytes())
    assert find_class_averages(read_particles(lone)) is None


def test_cryofastar_run_takes_a_cryosparc_2d_classification(classified, tmp_path, run_cli):
    import json

    data_star, _ = classified
    cs_file = _as_cryosparc(data_star, data_star.parent.parent / "J9")
    out = tmp_path / "run"
    done = run_cli("run", "--particles", cs_file, "--o", out, "--refine-iters", "0", "--threads", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "report.json").read_text())["class_averages"]
    assert summary["source"] == str(cs_file.with_name("J9_008_class_averages.cs"))
    assert summary["n_classes"] == len(find_class_averages(read_particles(data_star)).numbers)


class _ClassificationServer:
    """The CryoSPARC seam for a project holding one 2D classification job (``J9``: ``particles`` and
    ``class_averages``), built on tests/test_plugin.py's recording fake."""

    def __new__(cls, project: Path, particles_cs: Path, server_root: Path):
        from cryosparc.dataset import Dataset
        from plugin.server import JobInfo
        from test_plugin import FakeServer

        class Fake(FakeServer):
            def find_job(self, project_uid, job):
                self._rec("find_job", project=project_uid, job=job)
                return JobInfo(uid=job, type="class_2D", status="completed", outputs=("particles", "class_averages"))

            def load_output(self, project_uid, job, output, slots="all"):
                self._rec("load_output", project=project_uid, job=job, output=output, slots=slots)
                name = "J9_008_particles.cs" if output == "particles" else "J9_008_class_averages.cs"
                return Dataset.load(particles_cs.with_name(name))

        return Fake(project, particles_cs, server_root)


def test_connector_brings_the_class_averages_of_a_cryosparc_2d_classification(classified, tmp_path):
    """Server mode: with --class-averages-from the connector loads the averages (blob slot), puts them beside its
    input copy of the particles, and the engine takes the class-average route; asked for averages of particles
    that carry no 2D classification, it fails before creating anything on the server."""
    import json

    from plugin import run_in_cryosparc
    from plugin.connector import CLASS_AVERAGES_FLAG

    data_star, _ = classified
    project = data_star.parent.parent
    cs_file = _as_cryosparc(data_star, project / "J9")
    fake = _ClassificationServer(project, cs_file, tmp_path / "server")
    out = tmp_path / "work"
    result = run_in_cryosparc(fake, "P3", "W1", "J9.particles", class_averages="J9.class_averages", out_dir=out,
                              refine_iters=0, threads=1)
    loads = [kw for name, kw in fake.calls if name == "load_output"]
    assert [(c["output"], c["slots"]) for c in loads] == [("particles", "all"), ("class_averages", ["blob"])]
    summary = json.loads((out / "report.json").read_text())["class_averages"]
    assert summary["source"] == str(out / "cryosparc_input" / "class_averages.cs")
    assert summary["n_classes"] == len(find_class_averages(read_particles(data_star)).numbers)
    assert result.n_particles_saved == len(read_particles(data_star))

    plain = _ClassificationServer(project, cs_file, tmp_path / "server2")
    without = read_particles(cs_file).dataset.copy()
    without.drop_fields(["alignments2D/class"])
    without.save(project / "J9" / "J9_008_particles.cs")
    try:
        with pytest.raises(InputError, match="no 2D classification") as err:
            run_in_cryosparc(plain, "P3", "W1", "J9.particles", class_averages="J9.class_averages",
                             out_dir=tmp_path / "work2", refine_iters=0, threads=1)
        assert CLASS_AVERAGES_FLAG in str(err.value) and "create_external_job" not in plain.names()
    finally:
        _as_cryosparc(data_star, project / "J9")
