"""The checkpoint sidecar's limits at their exact bounds (issue 15: mutmut found them untested): the last value
allowed loads, the first one past it is refused with one line."""

from __future__ import annotations

import json

import pytest
import torch

from nasty.checkpoint import MAX_CLASSES, MAX_INPUT_DIM, MAX_SIDECAR_BYTES, read_sidecar, save_checkpoint
from nasty.errors import NastyError
from nasty.models import create_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    save_checkpoint(out, create_model("mlp:hidden=8", 10, 1, (8, 8)), classes=[str(i) for i in range(10)],
                    input_shape=(1, 8, 8), mean=[0.1], std=[0.2], dataset="digits")
    return out


def _with(saved, tmp_path, **changes):
    side = json.loads((saved / "model.json").read_text())
    side.update(changes)
    (tmp_path / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    (tmp_path / "model.json").write_text(json.dumps(side))
    return tmp_path


@pytest.mark.parametrize("n,ok", [(1, False), (2, True), (MAX_CLASSES, True), (MAX_CLASSES + 1, False)])
def test_num_classes_bounds(saved, tmp_path, n, ok):
    path = _with(saved, tmp_path, num_classes=n, classes=[f"c{i}" for i in range(n)])
    if ok:
        assert read_sidecar(path)[1]["num_classes"] == n
    else:
        with pytest.raises(NastyError, match=f"num_classes {n} is outside 2..{MAX_CLASSES}"):
            read_sidecar(path)


@pytest.mark.parametrize("shape,ok", [([1, 1, 1], True), ([1, MAX_INPUT_DIM, 8], True), ([1, 0, 8], False),
                                      ([1, MAX_INPUT_DIM + 1, 8], False), ([1, 8], False)])
def test_input_shape_bounds(saved, tmp_path, shape, ok):
    path = _with(saved, tmp_path, input_shape=shape)
    if ok:
        assert read_sidecar(path)[1]["input_shape"] == shape
    else:
        with pytest.raises(NastyError, match=f"input_shape must be three integers in 1..{MAX_INPUT_DIM}"):
            read_sidecar(path)


def test_sidecar_size_bound_is_inclusive(saved, tmp_path):
    side = (saved / "model.json").read_text()
    (tmp_path / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    exact = side.rstrip() + " " * (MAX_SIDECAR_BYTES - len(side.rstrip().encode()))  # JSON allows trailing blanks
    assert len(exact.encode()) == MAX_SIDECAR_BYTES
    (tmp_path / "model.json").write_text(exact)
    read_sidecar(tmp_path)
    (tmp_path / "model.json").write_text(exact + " ")
    with pytest.raises(NastyError, match=f"sidecar is {MAX_SIDECAR_BYTES + 1} bytes, more than the {MAX_SIDECAR_BYTES}"):
        read_sidecar(tmp_path)


def test_messages_name_the_field(saved, tmp_path):
    path = _with(saved, tmp_path, normalization={"mean": [0.1, 0.2], "std": [0.2]})
    with pytest.raises(NastyError, match=r"model.json: normalization.mean must be 1 finite numbers"):
        read_sidecar(path)
    path = _with(saved, tmp_path, weights_sha256="0" * 63 + "g")
    with pytest.raises(NastyError, match="weights_sha256 is not a SHA-256 hex digest"):
        read_sidecar(path)
    path = _with(saved, tmp_path, dataset=3)
    with pytest.raises(NastyError, match="dataset"):
        read_sidecar(path)
