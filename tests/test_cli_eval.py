"""``cryofastar eval`` on small synthetic STAR pairs (real STAR and MRC files, no mocks)."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from conftest import make_asymmetric_map
from cryofastar_core.evaluation import against_truth as eval_lib
from cryofastar_core.cli import eval as eval_cli
from cryofastar_core.runtime.errors import InputError
from cryofastar_core.geometry import mirror_rotations, random_rotations, rotvec_to_matrix
from cryofastar_core.io import new_star, write_map, write_stack
from cryofastar_core.evaluation.metrics import map_resolution, resample_volume

N, BOX, APIX = 24, 8, 2.0


def _star(path, names, R, shifts):
    new_star(path, names, apix=APIX, box=BOX, voltage=300.0, cs=2.7, amplitude_contrast=0.1, ctf=None,
             rotations=np.asarray(R), shifts=np.asarray(shifts))


@pytest.fixture()
def pair(tmp_path):
    """A truth STAR and a prediction STAR (other frame, other hand, 3 degree errors, shuffled order)."""
    write_stack(tmp_path / "parts.mrcs", np.random.default_rng(0).normal(size=(N, BOX, BOX)), APIX)
    names = [f"{i + 1}@parts.mrcs" for i in range(N)]
    g = torch.Generator().manual_seed(0)
    R_true = random_rotations(N, g, dtype=torch.float64)
    t_true = np.random.default_rng(1).uniform(-3, 3, (N, 2))
    G0 = random_rotations(1, g, dtype=torch.float64)[0]
    axes = torch.nn.functional.normalize(torch.randn(N, 3, generator=g, dtype=torch.float64), dim=-1)
    R_pred = mirror_rotations(G0.T @ R_true @ rotvec_to_matrix(axes * math.radians(3.0)))
    t_pred = t_true + np.array([0.5, 0.0])
    order = np.random.default_rng(2).permutation(N)
    _star(tmp_path / "truth.star", names, R_true.numpy(), t_true)
    _star(tmp_path / "pred.star", [names[i] for i in order], R_pred.numpy()[order], t_pred[order])
    return tmp_path, G0


def test_evaluate_matches_by_image_and_aligns_frame_and_hand(pair, monkeypatch):
    d, _ = pair
    monkeypatch.chdir(d)
    r = eval_lib.evaluate(d / "pred.star", d / "truth.star")
    assert r["n_particles"] == N
    assert r["rotation"]["mirrored"] is True
    assert r["rotation"]["median_deg"] == pytest.approx(3.0, abs=0.3)
    assert r["translation"]["mean_px"] == pytest.approx(0.5, abs=1e-4)
    assert r["translation"]["median_px"] == pytest.approx(0.5, abs=1e-4)
    r_nm = eval_lib.evaluate(d / "pred.star", d / "truth.star", allow_mirror=False)
    assert r_nm["rotation"]["median_deg"] > 20


def test_cli_prints_and_writes_json_with_maps(pair, monkeypatch, capsys):
    d, G0 = pair
    monkeypatch.chdir(d)
    truth = make_asymmetric_map(24, seed=4)
    F = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    # The map the predicted (mirrored, other-frame) poses would reconstruct: V_true(G0 F y).
    pred_map = resample_volume(torch.from_numpy(truth).double(), G0 @ F).numpy()
    write_map(d / "truth.mrc", truth, 3.0)
    write_map(d / "pred.mrc", pred_map, 3.0)
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers())
    args = parser.parse_args(["eval", "--pred", "pred.star", "--truth", "truth.star", "--map", "pred.mrc",
                              "--truth-map", "truth.mrc", "--json", "out.json"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "rotation error (deg)" in out and "mirrored" in out and "map vs truth FSC" in out
    r = json.loads((d / "out.json").read_text())
    assert r["rotation"]["median_deg"] == pytest.approx(3.0, abs=0.3)
    # The pose-derived G is 3-degree-noisy, so the map agrees to well below the unaligned level.
    assert r["map"]["resolution_fsc0.5"] < 12.0
    # Scored without the pose alignment, the same map is much worse.
    assert map_resolution(pred_map, truth, 3.0, 0.5, try_mirror=True) > 1.5 * r["map"]["resolution_fsc0.5"]


def test_bad_inputs_are_input_errors(pair, tmp_path, monkeypatch):
    d, _ = pair
    monkeypatch.chdir(d)
    new_star(d / "noposes.star", [f"{i + 1}@parts.mrcs" for i in range(N)], apix=APIX, box=BOX, voltage=300.0,
             cs=2.7, amplitude_contrast=0.1, ctf=None, rotations=None, shifts=None)
    with pytest.raises(InputError, match="no poses"):
        eval_lib.evaluate(d / "noposes.star", d / "truth.star")
    write_map(d / "truth.mrc", make_asymmetric_map(16), 3.0)
    with pytest.raises(InputError, match="go together"):
        eval_lib.evaluate(d / "pred.star", d / "truth.star", truth_map_path=d / "truth.mrc")
    write_map(d / "small.mrc", make_asymmetric_map(12), 3.0)
    with pytest.raises(InputError, match="box"):
        eval_lib.evaluate(d / "pred.star", d / "truth.star", d / "small.mrc", d / "truth.mrc")
