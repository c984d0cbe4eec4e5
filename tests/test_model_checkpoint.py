"""Weights files: round trip, and refusal of anything that is not ours."""
import pickle

import pytest
import torch

from cryofastar_core.runtime.errors import WeightsError
from cryofastar_core.model import CryoFastAR, load_weights, model_config, save_weights


def _model():
    torch.manual_seed(0)
    model = CryoFastAR(model_config("XS", 16)).eval()
    with torch.no_grad():
        model.ref_head.out.weight.normal_(std=0.02)
        model.aux_head.out.weight.normal_(std=0.02)
    return model


def test_round_trip(tmp_path):
    model = _model()
    path = tmp_path / "w.pt"
    save_weights(model, path, extra={"step": 12, "data": ["a", 1.5], "note": None})
    loaded = load_weights(path)
    images = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        a, b = model(images), loaded(images)
    assert torch.equal(a.xyz, b.xyz) and torch.equal(a.conf, b.conf)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "cryofastar-weights" and payload["extra"]["step"] == 12
    assert payload["config"]["box"] == 16
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]  # no temp file left behind

    save_weights(model, tmp_path / "h.pt", half=True)
    assert torch.load(tmp_path / "h.pt", weights_only=True)["state_dict"]["decoder.embed.weight"].dtype == torch.float16
    half = load_weights(tmp_path / "h.pt")
    with torch.no_grad():
        c = half(images)
    torch.testing.assert_close(c.xyz, a.xyz, atol=1e-2, rtol=1e-2)



def test_older_patch_files_load_and_removed_options_are_refused(tmp_path):
    """Files written before ``arch`` existed (with the removed options at their neutral values, like the
    first shipped weights) load as patch models; a file trained with a removed option is refused."""
    torch.manual_seed(0)
    model = CryoFastAR(model_config("XS", 16)).eval()
    with torch.no_grad():
        model.aux_head.out.weight.normal_(std=0.02)
    path = tmp_path / "old.pt"
    save_weights(model, path)
    payload = torch.load(path, weights_only=True)
    for key in ("arch", "n_lines", "line_samples", "line_radii", "ctf_correction"):
        del payload["config"][key]
    payload["config"].update(head="linear", abs_pos=False, ref_channel=False, stem="patch")
    torch.save(payload, path)
    loaded = load_weights(path)
    assert isinstance(loaded, CryoFastAR) and loaded.cfg.arch == "patch" and loaded.cfg.ctf_correction == "none"
    images = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images).xyz, model(images).xyz)
    payload["config"].update(head="affine", stem="conv")
    torch.save(payload, path)
    with pytest.raises(WeightsError, match=r"head='affine', stem='conv'.*dead ends"):
        load_weights(path)


def test_extra_must_be_plain(tmp_path):
    with pytest.raises(TypeError):
        save_weights(_model(), tmp_path / "w.pt", extra={"obj": object()})
    assert not list(tmp_path.iterdir())


def _payload(tmp_path):
    model = _model()
    save_weights(model, tmp_path / "ok.pt")
    return torch.load(tmp_path / "ok.pt", weights_only=True)


@pytest.mark.parametrize("case,message", [
    ("random_dict", "format tag"),
    ("wrong_tag", "format tag"),
    ("wrong_version", "format version"),
    ("unknown_key", "unknown model configuration"),
    ("missing_tensor", "do not match"),
    ("pickled_object", "not a loadable"),
    ("not_torch", "not a loadable"),
    ("missing", "no such file"),
])
def test_refuses_foreign_files(tmp_path, case, message):
    path = tmp_path / "bad.pt"
    if case == "random_dict":
        torch.save({"weight": torch.randn(3), "step": 1}, path)
    elif case == "wrong_tag":
        p = _payload(tmp_path); p["format"] = "dust3r"; torch.save(p, path)
    elif case == "wrong_version":
        p = _payload(tmp_path); p["format_version"] = 99; torch.save(p, path)
    elif case == "unknown_key":
        p = _payload(tmp_path); p["config"]["fancy_layer"] = 3; torch.save(p, path)
    elif case == "missing_tensor":
        p = _payload(tmp_path); p["state_dict"].pop("decoder.embed.weight"); torch.save(p, path)
    elif case == "pickled_object":
        torch.save({"format": "cryofastar-weights", "obj": pickle.PickleError("x")}, path)
    elif case == "not_torch":
        path.write_text("hello")
    with pytest.raises(WeightsError, match=message) as err:
        load_weights(path)
    assert str(path) in str(err.value) and "Fix:" in str(err.value)
