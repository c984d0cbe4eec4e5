"""Every bad-input case fails with an InputError that names the file and the field (and writes nothing)."""
from __future__ import annotations

import mrcfile
import numpy as np
import pytest
from cryosparc.dataset import Dataset

from cryofastar_core.runtime.errors import InputError
from cryofastar_core.io import read_particles
from _io_fixtures import make_stack, write_text

OPTICS = """data_optics
loop_
_rlnOpticsGroup
_rlnOpticsGroupName
_rlnVoltage
_rlnSphericalAberration
_rlnAmplitudeContrast
_rlnImagePixelSize
_rlnImageSize
_rlnImageDimensionality
1 og1 300 2.7 0.1 1.5 16 2

"""


def particles_block(rows: list[str], cols=("rlnImageName", "rlnOpticsGroup")) -> str:
    return "data_particles\nloop_\n" + "".join(f"_{c}\n" for c in cols) + "\n".join(rows) + "\n"


def expect_error(path, field: str | None, *words: str, project_dir=None) -> InputError:
    with pytest.raises(InputError) as e:
        read_particles(path, project_dir=project_dir)
    msg = str(e.value)
    assert str(e.value.path) in msg and "Fix:" in msg
    if field is not None:
        assert e.value.field == field, msg
    for w in words:
        assert w in msg, msg
    return e.value


@pytest.fixture
def proj(tmp_path, monkeypatch):
    make_stack(tmp_path / "s.mrcs", 3)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_missing_image_name_column(proj):
    star = write_text(proj / "p.star", OPTICS + particles_block(["1"], cols=("rlnOpticsGroup",)))
    expect_error(star, "rlnImageName", "missing")


def test_undefined_optics_group(proj):
    star = write_text(proj / "p.star", OPTICS + particles_block(["000001@s.mrcs 1", "000002@s.mrcs 3"]))
    expect_error(star, "rlnOpticsGroup", "[3]")


def test_particles_without_optics_group_column(proj):
    star = write_text(proj / "p.star", OPTICS + particles_block(["000001@s.mrcs"], cols=("rlnImageName",)))
    expect_error(star, "rlnOpticsGroup")


def test_missing_stack_file(proj):
    star = write_text(proj / "p.star", OPTICS + particles_block(["000001@nothere.mrcs 1"]))
    expect_error(star, "rlnImageName", "nothere.mrcs")


def test_index_past_end_of_stack(proj):
    star = write_text(proj / "p.star", OPTICS + particles_block(["000001@s.mrcs 1", "000004@s.mrcs 1"]))
    expect_error(star, "rlnImageName", "slice 4", "holds 3 images")


def test_bad_image_name(proj):
    star = write_text(proj / "p.star", OPTICS + particles_block(["0@s.mrcs 1"]))
    expect_error(star, "rlnImageName", "counted from 1")


def test_non_square_images(proj):
    with mrcfile.new(proj / "rect.mrcs") as m:
        m.set_data(np.zeros((2, 16, 20), np.float32))
    star = write_text(proj / "p.star", OPTICS + particles_block(["000001@rect.mrcs 1"]))
    err = expect_error(star, "nx/ny", "not square")
    assert err.path.name == "rect.mrcs"


def test_mismatched_box_between_stacks(proj):
    make_stack(proj / "big.mrcs", 2, box=24)
    star = write_text(proj / "p.star", OPTICS + particles_block(["000001@s.mrcs 1", "000001@big.mrcs 1"]))
    expect_error(star, "nx", "24")


def test_optics_box_differs_from_stacks(proj):
    star = write_text(proj / "p.star", OPTICS.replace(" 16 2", " 32 2") + particles_block(["000001@s.mrcs 1"]))
    expect_error(star, "rlnImageSize", "16")


def test_nan_image_detected_on_read(proj):
    data = make_stack(proj / "nan.mrcs", 4)
    data[2, 3, 3] = np.nan
    with mrcfile.open(proj / "nan.mrcs", "r+") as m:
        m.data[:] = data
    star = write_text(proj / "p.star", OPTICS + particles_block([f"{i:06d}@nan.mrcs 1" for i in range(1, 5)]))
    p = read_particles(star)
    p.read_images([0, 1, 3])  # clean slices read fine
    with pytest.raises(InputError) as e:
        p.read_images([1, 2])
    assert e.value.path.name == "nan.mrcs" and e.value.field == "slice 3" and "NaN" in str(e.value)


def test_missing_pixel_size(proj):
    no_apix = OPTICS.replace("_rlnImagePixelSize\n", "").replace(" 1.5 16", " 16")
    star = write_text(proj / "p.star", no_apix + particles_block(["000001@s.mrcs 1"]))
    expect_error(star, "rlnImagePixelSize", "no pixel size")
    star30 = write_text(proj / "p30.star", "data_\nloop_\n_rlnImageName\n_rlnVoltage\n000001@s.mrcs 300\n")
    expect_error(star30, "rlnImagePixelSize", "rlnMagnification")


def test_empty_star(proj):
    star = write_text(proj / "p.star", OPTICS + "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n")
    expect_error(star, None, "no particles")


def test_relion31_pixel_only_origins(proj):
    star = write_text(proj / "p.star", OPTICS + particles_block(
        ["000001@s.mrcs 1 10 20 30 1.5 -2.0", "000002@s.mrcs 1 10 20 30 0 0"],
        cols=("rlnImageName", "rlnOpticsGroup", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY")))
    expect_error(star, "rlnOriginX", "rlnOriginXAngst")


def test_defocus_without_voltage(proj):
    no_kv = OPTICS.replace("_rlnVoltage\n", "").replace("og1 300 ", "og1 ")
    star = write_text(proj / "p.star", no_kv + particles_block(["000001@s.mrcs 1 10000"],
                                                              cols=("rlnImageName", "rlnOpticsGroup", "rlnDefocusU")))
    expect_error(star, "rlnVoltage")


def test_no_defocus_means_no_ctf(proj):
    p = read_particles(write_text(proj / "p.star", OPTICS + particles_block(["000001@s.mrcs 1"])))
    assert p.ctf is None and p.rotations is None and p.shifts is None
    with pytest.raises(InputError):
        p.ctf_params()


def test_cs_errors(proj):
    ds = Dataset.allocate(2, [("blob/idx", "<u4"), ("blob/psize_A", "<f4")])
    ds.save(proj / "noblob.cs")
    expect_error(proj / "noblob.cs", "blob/path")
    Dataset.allocate(0, [("blob/path", "O"), ("blob/idx", "<u4")]).save(proj / "empty.cs")
    expect_error(proj / "empty.cs", None, "no particles")
    (proj / "junk.cs").write_bytes(b"not a dataset")
    expect_error(proj / "junk.cs", None, "not a readable")
    expect_error(proj / "x.txt", None, "not found")


def test_stack_given_as_particles_points_to_its_star(proj):
    (proj / "Extract").mkdir()
    make_stack(proj / "Extract" / "s.mrcs", 3)
    write_text(proj / "other.star", OPTICS + particles_block(["000001@Extract/t.mrcs 1"]))
    star = write_text(proj / "particles.star", OPTICS + particles_block(["000001@Extract/s.mrcs 1"]))
    err = expect_error(proj / "Extract" / "s.mrcs", None, "image stack", f"--particles {star}")
    assert "other.star" not in str(err)
    make_stack(proj / "lonely.mrcs", 2)
    expect_error(proj / "lonely.mrcs", None, "image stack", ".star (or CryoSPARC .cs) file that lists")
