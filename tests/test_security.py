"""Hostile files: nasty must never run code from a file and must refuse malformed checkpoints with a
one-line reason (exit code 2), never a traceback. Every hostile file here is real: the pickle's
``__reduce__`` does run a command when unpickled the unsafe way (checked first)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from nasty.checkpoint import SIDECAR, WEIGHTS, load_checkpoint, read_sidecar, save_checkpoint, split_settings
from nasty.errors import NastyError
from nasty.models import create_model

SPEC = "cnn:width=0.25"


class RunsCommand:
    """A pickle payload: unpickling it calls ``os.system`` (creates the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_line_error(rc: int, err: str, *needles: str, code: int = 2) -> None:
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err and "internal error" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory, digits):
    """A valid (untrained) digits checkpoint."""
    torch.manual_seed(0)
    model = create_model(SPEC, digits.num_classes, digits.in_channels, digits.image_size)
    out = tmp_path_factory.mktemp("good")
    save_checkpoint(out, model, classes=digits.classes, input_shape=(1, 8, 8), mean=digits.mean, std=digits.std, dataset="digits",
                    config={"data": {"dataset": "digits", "val_fraction": 0.1, "split_seed": 0}})
    return out


def copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, SIDECAR):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def edit_sidecar(folder: Path, fn) -> None:
    side = json.loads((folder / SIDECAR).read_text())
    fn(side)
    (folder / SIDECAR).write_text(json.dumps(side))


def write_weights(folder: Path, state: dict, update_sha: bool = True) -> None:
    blob = save(state)
    (folder / WEIGHTS).write_bytes(blob)
    if update_sha:  # an attacker can always recompute the digest; the checks must not rely on it
        edit_sidecar(folder, lambda s: s.update(weights_sha256=hashlib.sha256(blob).hexdigest()))


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "a hostile pickle ran code"


def test_payload_is_real(tmp_path):
    """The payload used below really runs its command when unpickled unsafely."""
    m = tmp_path / "ran"
    pickle.loads(pickle.dumps(RunsCommand(m)))
    assert m.exists()


def test_valid_checkpoint_evaluates(run_cli, good_ckpt):
    rc, out, err = run_cli("eval", good_ckpt, "--json")
    assert rc == 0, err
    assert json.loads(out)["n"] == 359  # the digits test split


# ---- pickles, whatever they are called


def test_pickle_as_pt_refused_by_eval(run_cli, tmp_path, marker):
    f = tmp_path / "teacher.pt"
    f.write_bytes(pickle.dumps({"state_dict": RunsCommand(marker)}))
    one_line_error(*run_cli("eval", f)[::2], "pickle-based", "nasty convert")


@pytest.mark.parametrize("fmt", ["torch-zip", "raw-pickle"])
def test_pickle_refused_by_convert(run_cli, tmp_path, marker, fmt):
    f = tmp_path / "teacher.pt"
    payload = {"state_dict": {"head.weight": torch.zeros(2)}, "evil": RunsCommand(marker)}
    if fmt == "torch-zip":
        torch.save(payload, f)
    else:
        f.write_bytes(pickle.dumps(payload))
    rc, out, err = run_cli("convert", f, "--model", SPEC, "--dataset", "digits", "--out", tmp_path / "conv")
    one_line_error(rc, err, "refused by torch.load(weights_only=True)")
    assert not (tmp_path / "conv").exists()


def test_pickle_renamed_safetensors_refused(run_cli, tmp_path, marker, good_ckpt):
    # without a sidecar
    f = tmp_path / "teacher.safetensors"
    f.write_bytes(pickle.dumps(RunsCommand(marker)))
    one_line_error(*run_cli("eval", f)[::2], "sidecar", "missing")
    # with a forged sidecar whose digest matches the pickle bytes
    folder = copy_ckpt(good_ckpt, tmp_path / "forged")
    (folder / WEIGHTS).write_bytes(f.read_bytes())
    edit_sidecar(folder, lambda s: s.update(weights_sha256=hashlib.sha256(f.read_bytes()).hexdigest()))
    one_line_error(*run_cli("eval", folder)[::2], "not a readable safetensors file")
    # and as a teacher / adversary of the other commands
    one_line_error(*run_cli("attack", "--teacher", folder, "--epochs", "1", "--out", tmp_path / "a")[::2], "not a readable safetensors")
    one_line_error(*run_cli("train-defended", "--adversary", tmp_path / "x.pth", "--out", tmp_path / "d")[::2], "pickle-based")


# ---- malformed safetensors and lying sidecars


def _truncate(folder: Path, update_sha: bool) -> None:
    blob = (folder / WEIGHTS).read_bytes()[:-100]
    (folder / WEIGHTS).write_bytes(blob)
    if update_sha:
        edit_sidecar(folder, lambda s: s.update(weights_sha256=hashlib.sha256(blob).hexdigest()))


def _state(folder: Path) -> dict:
    return load_file(str(folder / WEIGHTS))


def _set(folder: Path, key: str, value) -> None:
    edit_sidecar(folder, lambda s: s.update({key: value}))


CASES = {
    # name: (mutation of a copy of the good checkpoint, expected words in the one-line error)
    "truncated": (lambda f: _truncate(f, False), "truncated, padded or altered"),  # size against header, before hashing
    "truncated-resigned": (lambda f: _truncate(f, True), "not a readable safetensors file"),
    "empty-weights": (lambda f: (f / WEIGHTS).write_bytes(b""), "not a readable safetensors file"),
    "lies-architecture": (lambda f: edit_sidecar(f, lambda s: s["model"].update(name="mlp", kwargs={})), "do not fit mlp"),
    "lies-width": (lambda f: edit_sidecar(f, lambda s: s["model"].update(kwargs={"width": 0.5})), "model needs"),
    "lies-class-count": (lambda f: edit_sidecar(f, lambda s: s.update(num_classes=5, classes=list("abcde"))), "head.weight"),
    "classes-disagree": (lambda f: edit_sidecar(f, lambda s: s.update(num_classes=9)), "disagree with num_classes"),
    "lies-channels": (lambda f: _set(f, "input_shape", [3, 8, 8]) or edit_sidecar(
        f, lambda s: s["normalization"].update(mean=[0, 0, 0], std=[1, 1, 1])), "block1.0.weight"),
    "wrong-shape": (lambda f: write_weights(f, {**_state(f), "head.weight": torch.zeros(10, 7)}), "head.weight is (10, 7)"),
    "wrong-dtype": (lambda f: write_weights(f, {k: v.double() if v.is_floating_point() else v for k, v in _state(f).items()}), "F64"),
    "extra-tensor": (lambda f: write_weights(f, {**_state(f), "backdoor": torch.zeros(1)}), "unexpected backdoor"),
    "missing-tensor": (lambda f: write_weights(f, {k: v for k, v in _state(f).items() if k != "head.bias"}), "missing head.bias"),
    "nan-weights": (lambda f: write_weights(f, {**_state(f), "head.bias": torch.full((10,), float("nan"))}), "NaN or inf"),
    "inf-weights": (lambda f: write_weights(f, {**_state(f), "head.weight": torch.full((10, 32), float("inf"))}), "NaN or inf"),
    "num-classes-string": (lambda f: _set(f, "num_classes", "10"), "'num_classes' has type str"),
    "num-classes-bool": (lambda f: _set(f, "num_classes", True), "'num_classes' has type bool"),
    "num-classes-float": (lambda f: _set(f, "num_classes", 10.0), "'num_classes' has type float"),
    "num-classes-huge": (lambda f: _set(f, "num_classes", 10**30), "outside 2..100000"),
    "input-shape-strings": (lambda f: _set(f, "input_shape", ["1", "8", "8"]), "input_shape"),
    "input-shape-huge": (lambda f: _set(f, "input_shape", [1, 10**9, 10**9]), "input_shape"),
    "input-shape-short": (lambda f: _set(f, "input_shape", [8, 8]), "input_shape"),
    "mean-nan": (lambda f: edit_sidecar(f, lambda s: s["normalization"].update(mean=[float("nan")])), "finite numbers"),
    "std-string": (lambda f: edit_sidecar(f, lambda s: s["normalization"].update(std=["1"])), "finite numbers"),
    "std-zero": (lambda f: edit_sidecar(f, lambda s: s["normalization"].update(std=[0.0])), "std must be positive"),
    "normalization-list": (lambda f: _set(f, "normalization", [0, 1]), "'normalization' has type list"),
    "model-not-dict": (lambda f: _set(f, "model", "cnn"), "'model' has type str"),
    "model-kwargs-table": (lambda f: edit_sidecar(f, lambda s: s["model"].update(kwargs={"width": {"__class__": "os.system"}})), "not a plain"),
    "model-kwargs-string": (lambda f: edit_sidecar(f, lambda s: s["model"].update(kwargs={"width": "wide"})), "model cnn"),
    "model-kwargs-unknown": (lambda f: edit_sidecar(f, lambda s: s["model"].update(kwargs={"depth": 3})), "has no option depth"),
    "model-kwargs-nan": (lambda f: edit_sidecar(f, lambda s: s["model"].update(kwargs={"width": float("nan")})), "not a plain"),
    "model-unknown": (lambda f: edit_sidecar(f, lambda s: s["model"].update(name="evil")), "unknown model 'evil'"),
    "huge-declared-model": (lambda f: edit_sidecar(f, lambda s: s["model"].update(kwargs={"width": 1e6})), "model needs"),
    "dataset-int": (lambda f: _set(f, "dataset", 7), "'dataset' has type int"),
    "split-string": (lambda f: _set(f, "config", {"data": {"val_fraction": "0.1"}}), "val_fraction"),
    "split-seed-negative": (lambda f: _set(f, "config", {"data": {"split_seed": -1}}), "split_seed"),
    "sha-not-hex": (lambda f: _set(f, "weights_sha256", "x" * 64), "not a SHA-256"),
    "format-version-future": (lambda f: _set(f, "format_version", 99), "newer"),
    "format-version-string": (lambda f: _set(f, "format_version", "1"), "'format_version' has type str"),
    "not-a-sidecar": (lambda f: (f / SIDECAR).write_text("[1, 2, 3]"), "not a nasty checkpoint sidecar"),
    "sidecar-binary": (lambda f: (f / SIDECAR).write_bytes(b"\x80\x04\x95garbage"), "not valid JSON"),
    "sidecar-deep": (lambda f: (f / SIDECAR).write_text("[" * 200_000 + "]" * 200_000), "not valid JSON"),
    "sidecar-missing": (lambda f: (f / SIDECAR).unlink(), "sidecar model.json missing"),
    "sidecar-huge": (lambda f: (f / SIDECAR).write_bytes(b" " * (17 << 20)), "more than"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_checkpoint_refused(run_cli, tmp_path, good_ckpt, case):
    mutate, needle = CASES[case]
    folder = copy_ckpt(good_ckpt, tmp_path / case)
    mutate(folder)
    t0 = time.perf_counter()
    rc, out, err = run_cli("eval", folder)
    one_line_error(rc, err, needle)
    assert out == ""
    assert time.perf_counter() - t0 < 10  # nothing huge was allocated or parsed
    with pytest.raises(NastyError):  # the library refuses it too, not only the CLI
        if case.startswith("split"):  # the run's split settings are read by `nasty eval` only
            split_settings(read_sidecar(folder)[1])
        else:
            load_checkpoint(folder)


def test_dataset_mismatch_refused(run_cli, tmp_path, good_ckpt):
    """A checkpoint evaluated on a dataset with other classes or another input shape."""
    import numpy as np

    rng = np.random.default_rng(0)
    for name, x, classes in (("three-classes", rng.random((30, 1, 8, 8)), 3), ("rgb", rng.random((30, 3, 8, 8)), 10),
                             ("bigger", rng.random((30, 1, 16, 16)), 10)):
        y = np.arange(30) % classes
        f = tmp_path / f"{name}.npz"
        np.savez(f, x_train=x.astype(np.float32), y_train=y, x_test=x.astype(np.float32), y_test=y)
        rc, out, err = run_cli("eval", good_ckpt, "--dataset", f"npz:{f}")
        one_line_error(rc, err)
        assert any(w in err for w in ("classes", "expects input", "channels")), err


# ---- nasty convert: the one door for legacy files


def test_convert_roundtrip(run_cli, tmp_path, digits):
    torch.manual_seed(1)
    model = create_model(SPEC, 10, 1, (8, 8)).eval()
    f = tmp_path / "legacy.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, f)
    rc, out, err = run_cli("convert", f, "--model", SPEC, "--dataset", "digits", "--out", tmp_path / "conv", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["loader"] == "torch.load(weights_only=True)"
    assert res["source_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    loaded, side = load_checkpoint(tmp_path / "conv")
    assert side["converted"]["source"] == str(f)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # the converted checkpoint evaluates like any other
    rc, out, err = run_cli("eval", tmp_path / "conv", "--json")
    assert rc == 0 and json.loads(out)["accuracy"] == pytest.approx(res["accuracy"])
    # no overwrite without --force
    one_line_error(*run_cli("convert", f, "--model", SPEC, "--out", tmp_path / "conv")[::2], "--force")


@pytest.mark.parametrize("payload,needle", [
    ({"a": "not a tensor"}, "not a state dict of named tensors"),
    ({"head.weight": torch.zeros(3)}, "do not fit"),
    ([torch.zeros(1)], "not a state dict"),
])
def test_convert_refuses_non_state_dicts(run_cli, tmp_path, payload, needle):
    f = tmp_path / "x.pt"
    torch.save(payload, f)
    one_line_error(*run_cli("convert", f, "--model", SPEC, "--out", tmp_path / "o")[::2], needle)


def test_convert_refuses_truncated_and_missing(run_cli, tmp_path):
    f = tmp_path / "x.pt"
    torch.save({"w": torch.zeros(100)}, f)
    f.write_bytes(f.read_bytes()[:-50])
    one_line_error(*run_cli("convert", f, "--model", SPEC, "--out", tmp_path / "o")[::2], "refused")
    one_line_error(*run_cli("convert", tmp_path / "nope.pt", "--model", SPEC, "--out", tmp_path / "o")[::2], "not found")


def test_no_unsafe_deserialisation_in_package():
    """Regression guard: the package never unpickles (torch.load only with weights_only=True, in convert)."""
    import re

    import nasty

    root = Path(nasty.__file__).parent
    for f in root.rglob("*.py"):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{f}: {m.group(0)}"
        assert not re.search(r"\bpickle\.loads?\(|allow_pickle\s*=\s*True|(?<![\w.])eval\(|(?<![\w.])exec\(", text), f
