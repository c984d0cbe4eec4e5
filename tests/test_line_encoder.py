"""The learned common-lines encoder (cryofastar_core.commonlines.learned): its truth is the geometry the
classical detector finds, it starts as the classical estimator, its loss rewards the true common line,
its weights file round-trips and is refused when it is something else, and `cryofastar train-lines`
trains, checkpoints and resumes exactly."""
from __future__ import annotations

import math

import pytest
import torch

from cryofastar_core.cli.main import main as cli_main
from cryofastar_core.commonlines import CommonLinesConfig, CommonLinesPoser, estimate_rotations
from cryofastar_core.commonlines.detect import CommonLines, detect_common_lines
from cryofastar_core.commonlines.learned import LineEncoder, common_line_loss, true_common_lines
from cryofastar_core.commonlines.poser import encode_lines, most_consistent, prepare_views, shift_ramps
from cryofastar_core.commonlines.sync import vote_dihedral_angles
from cryofastar_core.commonlines.weights import load_line_encoder, save_line_encoder
from cryofastar_core.geometry import random_rotations, rotation_angle_deg
from cryofastar_core.inference.pose_model import load_pose_model, pose_model_identity
from cryofastar_core.inference.preprocess import to_model_input
from cryofastar_core.io import read_map
from cryofastar_core.physics.projection import project
from cryofastar_core.runtime.errors import InputError, WeightsError
from cryofastar_core.training.line_encoder import LineTrainConfig, train_line_encoder
from cryofastar_core.training.volumes import VolumeLibrary

from _class2d import DEMO_MAP


def _clean_views(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    vol, _ = read_map(DEMO_MAP)
    R = random_rotations(n, torch.Generator().manual_seed(seed))
    images = to_model_input(project(torch.from_numpy(vol).float(), R), 64)
    return images, R


def _wrapped_deg(a: torch.Tensor) -> torch.Tensor:
    return ((a + math.pi) % (2 * math.pi) - math.pi).abs().rad2deg()


def test_true_common_lines_are_what_the_detector_finds_on_clean_projections():
    images, R = _clean_views(10, seed=4)
    cfg = CommonLinesConfig()
    prepared = prepare_views(images, cfg)
    found = detect_common_lines(encode_lines(prepared.masked, prepared.mask, cfg), shift_ramps(cfg))
    truth = true_common_lines(R)
    # a consistent pair is found as itself or as its conjugate (both angles + π): the same common line
    same = torch.maximum(_wrapped_deg(found.angles - truth), _wrapped_deg(found.angles.T - truth.T))
    conj = torch.maximum(_wrapped_deg(found.angles - truth - math.pi), _wrapped_deg(found.angles.T - truth.T - math.pi))
    err = torch.minimum(same, conj)[~torch.eye(10, dtype=torch.bool)]
    assert float(err.median()) < 2.0
    assert float((err < 5).double().mean()) > 0.9
    # the transposed convention (rotations map -> image) is far off: the test can fail
    assert float(_wrapped_deg(found.angles - true_common_lines(R.transpose(1, 2))).median()) > 20


def test_the_untrained_encoder_is_the_classical_estimator():
    images, _ = _clean_views(12, seed=5)
    cfg = CommonLinesConfig()
    encoder = LineEncoder(len(cfg.radii))
    with torch.no_grad():
        learned = estimate_rotations(images, cfg, encoder)
    classical = estimate_rotations(images, cfg)
    # the same rotations up to the global rotation no estimator can fix (the eigenvectors' gauge) and the
    # float rounding of W = I, which 30 sweeps of the robust refinement carry to a few hundredths of a degree
    rel = [e.rotations[:1].transpose(-1, -2) @ e.rotations for e in (learned, classical)]
    assert float(rotation_angle_deg(rel[0], rel[1]).max()) < 0.1
    assert torch.allclose(learned.support, classical.support, atol=0.02)  # a vote at the kernel's edge may flip
    prepared = prepare_views(images, cfg)
    with torch.no_grad():
        same = [detect_common_lines(encode_lines(prepared.masked, prepared.mask, cfg, e), shift_ramps(cfg)).angles
                for e in (encoder, None)]
    assert torch.allclose(same[0], same[1], atol=2e-3)  # radians: the sub-step parabola on rounded scores


def _line_error_deg(found: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per pair, the larger of the two angles' errors, a pair found as its conjugate counting as itself."""
    same = torch.maximum(_wrapped_deg(found - reference), _wrapped_deg(found.T - reference.T))
    conj = torch.maximum(_wrapped_deg(found - reference - math.pi), _wrapped_deg(found.T - reference.T - math.pi))
    return torch.minimum(same, conj)[~torch.eye(len(found), dtype=torch.bool)]


def test_proposals_limit_the_classical_search_to_their_neighbourhood():
    images, R = _clean_views(10, seed=6)
    cfg = CommonLinesConfig()
    prepared = prepare_views(images, cfg)
    classical, ramps = encode_lines(prepared.masked, prepared.mask, cfg), shift_ramps(cfg)
    free = detect_common_lines(classical, ramps)
    # proposals at the free detection: the classical scores place each line exactly where they did alone
    placed = detect_common_lines(classical, ramps, prior=free.angles, window=3)
    assert torch.allclose(placed.angles, free.angles, atol=1e-9)
    # proposals 20° off the truth: every line stays within the window (3 steps + the sub-step parabola)
    off = true_common_lines(R) + math.radians(20.0)
    held = detect_common_lines(classical, ramps, prior=off, window=3)
    assert float(_line_error_deg(held.angles, off).max()) <= 4.0 + 1e-6
    assert float(_line_error_deg(free.angles, off).median()) > 15.0  # alone they go back to the truth


def test_the_estimator_keeps_the_common_lines_whose_triangles_agree():
    images, _ = _clean_views(12, seed=7)
    cfg = CommonLinesConfig()
    prepared = prepare_views(images, cfg)
    right = detect_common_lines(encode_lines(prepared.masked, prepared.mask, cfg), shift_ramps(cfg))
    g = torch.Generator().manual_seed(0)
    wrong = CommonLines(angles=torch.rand(12, 12, generator=g, dtype=torch.float64) * 2 * math.pi, score=right.score)
    for candidates in ([right, wrong], [wrong, right]):
        kept, _, weight = most_consistent(candidates, cfg.vote_sigma_deg)
        assert kept is right and float(weight.mean()) > 0.5
    assert float(vote_dihedral_angles(wrong.angles)[1].mean()) < 0.2  # the other set's triangles disagree


def test_an_encoder_without_a_cnn_is_the_line_metric_alone(tmp_path):
    cfg = CommonLinesConfig()
    encoder = LineEncoder(len(cfg.radii), depth=0)
    images = torch.randn(3, 64, 64)
    assert encoder.cnn is None and torch.equal(encoder.denoise(images), images)
    save_line_encoder(tmp_path / "enc.pt", encoder, cfg, {})
    assert load_line_encoder(tmp_path / "enc.pt")[0].cnn is None
    with pytest.raises(ValueError, match="depth"):
        LineEncoder(len(cfg.radii), depth=1)


def test_loss_rewards_the_true_common_line():
    g = torch.Generator().manual_seed(0)
    R = random_rotations(6, g, dtype=torch.float64)
    angles = true_common_lines(R)
    n_lines, half = 36, 18
    step = 2 * math.pi / n_lines
    right = torch.zeros(6, 6, n_lines, half)
    for i in range(6):
        for j in range(6):
            a, b = int(round(float(angles[i, j]) / step)) % n_lines, int(round(float(angles[j, i]) / step)) % n_lines
            if b >= half:
                a, b = (a + half) % n_lines, b - half
            right[i, j, a, b] = 1.0
    tau = torch.tensor(math.log(0.05))
    loss_right, hit_right = common_line_loss(right, angles, tau)
    wrong = torch.roll(right, shifts=9, dims=2)  # every peak 90° off in view i
    loss_wrong, hit_wrong = common_line_loss(wrong, angles, tau)
    assert float(hit_right) == 1.0 and float(hit_wrong) == 0.0
    assert float(loss_right) < 0.1 < float(loss_wrong)


def test_weights_file_round_trips_and_is_refused_when_it_is_a_network(tmp_path, tiny_weights):
    cfg = CommonLinesConfig()
    encoder = LineEncoder(len(cfg.radii), channels=4, depth=3)
    with torch.no_grad():
        encoder.metric_im.add_(0.01)
    path = tmp_path / "enc.pt"
    save_line_encoder(path, encoder, cfg, {"trained_steps": 0})
    loaded, loaded_cfg, extra = load_line_encoder(path)
    assert loaded_cfg == cfg and extra["trained_steps"] == 0
    assert torch.allclose(loaded.metric_im, encoder.metric_im, atol=1e-3)
    model = load_pose_model(path)
    assert isinstance(model, CommonLinesPoser) and model.encoder is not None
    assert pose_model_identity(path, model)["provenance"]["method"] == "common-lines-learned"
    with pytest.raises(WeightsError, match=r"format tag .*train-lines"):
        load_line_encoder(tiny_weights)


def test_train_lines_checkpoints_and_resumes_exactly(tmp_path):
    kw = dict(batch_size=1, views=6, train_lines=36, channels=4, depth=3, n_pseudo=2, include_real=False,
              cache_dir=str(tmp_path / "cache"), checkpoint_every=2, val_every=2, val_samples=1, val_snrs=(1.0,))
    for split in ("train", "heldout"):  # volumes built once: a run reads the cached ones (rounded when stored)
        lib = VolumeLibrary(box=64, split=split, cache_dir=kw["cache_dir"], n_pseudo=2, include_real=False)
        [lib[i] for i in range(len(lib))]
    straight = train_line_encoder(LineTrainConfig(steps=4, **kw), tmp_path / "a")
    train_line_encoder(LineTrainConfig(steps=4, **kw), tmp_path / "b", max_steps=2)  # stopped after 2 steps ...
    resumed = train_line_encoder(LineTrainConfig(steps=4, **kw), tmp_path / "b", resume=True)  # ... and resumed
    for name, value in straight.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[name], atol=1e-6), name
    assert not torch.equal(straight.metric_re, torch.eye(straight.n_radii))  # it trained
    encoder, _, extra = load_line_encoder(tmp_path / "a" / "line_encoder.pt")
    assert extra["trained_steps"] == 4
    metrics = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 3 and "identity" in metrics[0]


def test_train_lines_cli_refuses_a_bad_step_count(tmp_path, capsys):
    assert cli_main(["train-lines", "--o", str(tmp_path / "r"), "--steps", "0"]) != 0
    assert "--steps" in capsys.readouterr().err
    assert cli_main(["train-lines", "--o", str(tmp_path / "r"), "--depth", "1"]) != 0
    assert "--depth" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_resuming_with_another_cnn_depth_is_refused(tmp_path):
    kw = dict(batch_size=1, views=6, train_lines=36, channels=4, n_pseudo=2, include_real=False,
              cache_dir=str(tmp_path / "cache"), checkpoint_every=1, val_every=100, val_samples=1, val_snrs=(1.0,))
    train_line_encoder(LineTrainConfig(steps=2, depth=3, **kw), tmp_path / "r", max_steps=1)
    with pytest.raises(InputError, match=r"checkpoint.pt, field 'depth'.*--depth 3"):
        train_line_encoder(LineTrainConfig(steps=2, depth=0, **kw), tmp_path / "r", resume=True)
