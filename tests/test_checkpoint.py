import json

import pytest
import torch

from nasty.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from nasty.errors import NastyError
from nasty.models import create_model


def _save(tmp_path, name="resnet20:width=0.25"):
    torch.manual_seed(0)
    m = create_model(name, 10, 1, 8)
    m(torch.randn(4, 1, 8, 8))  # populate BatchNorm statistics
    save_checkpoint(tmp_path, m, classes=[str(i) for i in range(10)], input_shape=(1, 8, 8), mean=[0.1], std=[0.2],
                    dataset="digits", config={"a": 1}, metrics={"test": {"accuracy": 50.0}})
    return m


def test_round_trip_is_exact(tmp_path):
    m = _save(tmp_path)
    m2, side = load_checkpoint(tmp_path)
    s1, s2 = m.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]) and s1[k].dtype == s2[k].dtype, k
    x = torch.randn(3, 1, 8, 8)
    m.eval()
    assert torch.equal(m(x), m2(x))
    assert side["model"] == {"name": "resnet20", "kwargs": {"width": 0.25}}
    assert side["classes"][3] == "3" and side["normalization"]["mean"] == [0.1]
    assert "torch" in side["versions"]


def test_tampered_weights_are_refused(tmp_path):
    _save(tmp_path)
    p = tmp_path / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(NastyError, match="SHA-256|truncated"):
        load_checkpoint(tmp_path)


def test_sidecar_lying_about_classes_is_refused(tmp_path):
    _save(tmp_path)
    side = json.loads((tmp_path / "model.json").read_text())
    side["num_classes"] = 3
    side["classes"] = ["a", "b", "c"]
    (tmp_path / "model.json").write_text(json.dumps(side))
    with pytest.raises(NastyError, match="do not fit|is \\("):
        load_checkpoint(tmp_path)


def test_pickle_files_are_refused(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(NastyError, match="pickle"):
        load_checkpoint(tmp_path / "model.pt")


def test_check_compatible(digits, tmp_path):
    _save(tmp_path)
    _, side = load_checkpoint(tmp_path)
    check_compatible(side, digits)
    side = {**side, "num_classes": 9}
    with pytest.raises(NastyError, match="classes"):
        check_compatible(side, digits)
