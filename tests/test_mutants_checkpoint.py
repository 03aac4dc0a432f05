"""The checkpoint sidecar's limits at their exact bounds (issue 15: mutmut found them untested): the last value
allowed loads, the first one past it is refused with one line."""

from __future__ import annotations

import json
import math

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


# ---- issue 15, mutmut triage of nasty/checkpoint.py: each test below pins a behaviour a survivor broke silently

import errno
import hashlib
import os
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

from safetensors.torch import save

from nasty.checkpoint import (SIDECAR, WEIGHTS, atomic_write_files, atomic_write_json, check_compatible,
                              load_checkpoint, load_legacy_state, load_state_file, read_legacy_state_dict,
                              save_state_file, split_settings, versions)


def _raw(path: Path, header, data: bytes = b"") -> Path:
    """A safetensors-like file: 8-byte little-endian header length, the header, the data."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def _copy(saved, folder: Path, weights_name: str = WEIGHTS, sidecar_name: str = SIDECAR) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / weights_name).write_bytes((saved / WEIGHTS).read_bytes())
    (folder / sidecar_name).write_bytes((saved / SIDECAR).read_bytes())
    return folder / weights_name


def _resign(folder: Path, blob: bytes, side_name: str = SIDECAR) -> None:
    side = json.loads((folder / side_name).read_text())
    side["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    (folder / side_name).write_text(json.dumps(side))


# -- where a checkpoint is looked for


@pytest.mark.parametrize("sub", ["defended", "student"])
def test_run_folder_resolves_to_its_defended_or_student_model(saved, tmp_path, sub):
    _copy(saved, tmp_path / sub)
    weights, _ = read_sidecar(tmp_path)
    assert weights == tmp_path / sub / WEIGHTS


def test_folder_without_weights_names_the_training_state_it_holds(tmp_path):
    with pytest.raises(NastyError) as e:
        read_sidecar(tmp_path)
    assert str(e.value) == f"no {WEIGHTS} in {tmp_path}"  # an empty folder: no hint
    for step in ("0007", "0003"):
        save_state_file(tmp_path / f"train_state-{step}.safetensors", {"w": torch.zeros(1)}, {})
    with pytest.raises(NastyError) as e:
        read_sidecar(tmp_path)
    assert str(e.value) == (f"no {WEIGHTS} in {tmp_path} (it holds only the training state train_state-0003.safetensors: "
                            "finish the run with --resume)")


def test_sidecar_path_or_any_name_pair_resolves(saved, tmp_path):
    _copy(saved, tmp_path / "a")
    assert read_sidecar(tmp_path / "a" / SIDECAR)[0] == tmp_path / "a" / WEIGHTS
    assert read_sidecar(tmp_path / "a" / WEIGHTS)[0] == tmp_path / "a" / WEIGHTS
    _copy(saved, tmp_path / "b", "teacher.safetensors", "teacher.json")  # any name: weights + same-stem sidecar
    for given in ("teacher.json", "teacher.safetensors"):
        weights, side = read_sidecar(tmp_path / "b" / given)
        assert weights == tmp_path / "b" / "teacher.safetensors" and side["num_classes"] == 10
    model, _ = load_checkpoint(tmp_path / "b" / "teacher.safetensors")
    assert isinstance(model, torch.nn.Module)


def test_missing_checkpoint_message_names_the_path(tmp_path):
    for given, looked in ((tmp_path / "nope.safetensors", tmp_path / "nope.safetensors"),
                          (tmp_path / "nope.json", tmp_path / "nope.safetensors")):
        with pytest.raises(NastyError) as e:
            read_sidecar(given)
        assert str(e.value) == f"checkpoint not found: {looked}"


def test_training_state_under_any_name_is_refused_as_such(saved, tmp_path):
    """Even beside a model's own sidecar: a state file is judged by its own (absent) same-stem sidecar."""
    _copy(saved, tmp_path)
    save_state_file(tmp_path / "progress.safetensors", {"w": torch.zeros(3)}, {"epoch": 2})
    with pytest.raises(NastyError) as e:
        read_sidecar(tmp_path / "progress.safetensors")
    assert str(e.value) == (f"{tmp_path / 'progress.safetensors'} is a training state (the resumable progress of a run, "
                            f"for --resume), not a model checkpoint; pass the run folder {tmp_path} or the {WEIGHTS} in it")


def test_model_named_like_a_training_state_is_still_refused(saved, tmp_path):
    """The name alone marks a training state, even with a sidecar beside it (a run folder's naming rule)."""
    _copy(saved, tmp_path, "train_state-0001.safetensors", "train_state-0001.json")
    with pytest.raises(NastyError, match="is a training state"):
        read_sidecar(tmp_path / "train_state-0001.safetensors")


@pytest.mark.parametrize("case", ["model-without-sidecar", "short-file", "garbage-header", "huge-header-length",
                                  "marker-in-data-only"])
def test_not_mistaken_for_a_training_state(saved, tmp_path, case):
    """Only a file whose safetensors header carries the training-state marker is called a training state; anything
    else without its sidecar is reported as a checkpoint whose sidecar is missing."""
    f = tmp_path / "x.safetensors"
    if case == "model-without-sidecar":
        f.write_bytes((saved / WEIGHTS).read_bytes())
    elif case == "short-file":
        f.write_bytes(b"\x01\x02")
    elif case == "garbage-header":
        _raw(f, b"\xff\xfe" * 16)
    elif case == "huge-header-length":  # a header length with the top bit set is not a length to trust
        blob = save({"w": torch.zeros(1)}, metadata={"nasty": json.dumps({"format": "nasty-train-state"})})
        f.write_bytes(b"\xff" * 8 + blob[8:])
    else:  # the marker appears in the tensor data, not in the header
        marker = b'"nasty-train-state'
        _raw(f, {"w": {"dtype": "U8", "shape": [len(marker)], "data_offsets": [0, len(marker)]}}, marker)
    with pytest.raises(NastyError) as e:
        read_sidecar(f)
    assert str(e.value) == f"{f}: sidecar x.json missing; cannot rebuild the model"


def test_training_state_header_length_bound_is_inclusive(tmp_path):
    """The marker is trusted in a header of exactly the largest size safetensors allows (only its start is read)."""
    from nasty.checkpoint import MAX_HEADER_BYTES

    head = json.dumps({"__metadata__": {"nasty": json.dumps({"format": "nasty-train-state"})}}).encode()
    f = tmp_path / "s.safetensors"
    f.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES) + head)
    with pytest.raises(NastyError, match="is a training state"):
        read_sidecar(f)
    f.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + head)
    with pytest.raises(NastyError, match="sidecar s.json missing"):
        read_sidecar(f)


# -- the weights file against its own header (before hashing)


def _weights_case(saved, tmp_path, header, data: bytes = b"") -> Path:
    folder = tmp_path / "w"
    _copy(saved, folder)
    _raw(folder / WEIGHTS, header, data)
    _resign(folder, (folder / WEIGHTS).read_bytes())
    return folder


@pytest.mark.parametrize("header,data,needle", [
    (b"\xff" * 10, b"", "not a readable safetensors file (unreadable header)"),
    ([1, 2], b"", "not a readable safetensors file (header is not a table)"),
    ({"w": 5}, b"", "not a readable safetensors file (tensor 'w' has no valid data_offsets)"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, b"\0" * 8, "tensor 'w' has no valid data_offsets"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 4]}}, b"\0" * 4, "tensor 'w' has no valid data_offsets"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}, b"\0" * 4, "tensor 'w' has no valid data_offsets"),
])
def test_malformed_weights_header_is_named(saved, tmp_path, header, data, needle):
    folder = _weights_case(saved, tmp_path, header, data)
    with pytest.raises(NastyError) as e:
        load_checkpoint(folder)
    assert str(e.value) == f"{folder / WEIGHTS}: {needle}" or (needle in str(e.value) and str(e.value).startswith(str(folder)))


def test_weights_size_message_gives_both_sizes(saved, tmp_path):
    folder = tmp_path / "t"
    w = _copy(saved, folder)
    blob = w.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    w.write_bytes(blob[:-100])
    with pytest.raises(NastyError) as e:
        load_checkpoint(folder)
    assert str(e.value) == (f"{w}: not a readable safetensors file ({len(blob) - 100} bytes, but its header describes "
                            f"{len(blob)}: truncated, padded or altered)")
    assert len(blob) == 8 + n + max(v["data_offsets"][1] for v in json.loads(blob[8:8 + n]).values())
    w.write_bytes(struct.pack("<Q", 1000) + b"{}" + b" " * 90)  # a header longer than the file
    with pytest.raises(NastyError) as e:
        load_checkpoint(folder)
    assert str(e.value) == f"{w}: not a readable safetensors file (header of 1000 bytes in a file of 100)"
    w.write_bytes(b"\xff" * 8 + blob[8:])  # a length with the top bit set: unsigned, so far too large
    with pytest.raises(NastyError) as e:
        load_checkpoint(folder)
    assert str(e.value) == f"{w}: not a readable safetensors file (header of {2 ** 64 - 1} bytes in a file of {len(blob)})"


def test_header_only_weights_file_is_judged_on_its_tensors(saved, tmp_path):
    """A well-formed safetensors file with no tensors passes the size check (8 + header bytes exactly) and is refused
    for what it is: weights that do not fit the model."""
    folder = _weights_case(saved, tmp_path, {"__metadata__": {"a": "b"}})
    with pytest.raises(NastyError, match=r"weights do not fit mlp \(missing fc0.0.bias; 4 missing, 0 unexpected\)"):
        load_checkpoint(folder)


def test_weights_with_metadata_load(saved, tmp_path):
    """A safetensors metadata block (written by other tools) is not a tensor: such weights load."""
    folder = tmp_path / "m"
    _copy(saved, folder)
    from safetensors.torch import load_file

    blob = save(load_file(str(saved / WEIGHTS)), metadata={"producer": "elsewhere"})
    (folder / WEIGHTS).write_bytes(blob)
    _resign(folder, blob)
    model, _ = load_checkpoint(folder)
    assert torch.equal(model.state_dict()["head.bias"], load_file(str(saved / WEIGHTS))["head.bias"])


def test_unknown_dtype_is_refused_with_the_librarys_reason(saved, tmp_path):
    folder = _weights_case(saved, tmp_path, {"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(NastyError) as e:
        load_checkpoint(folder)
    head = f"{folder / WEIGHTS}: not a readable safetensors file ("
    msg = str(e.value)
    assert msg.startswith(head) and "\n" not in msg
    assert "F99" in msg[len(head):]  # the library's own first line, not just an exception name


def test_io_error_on_the_weights_is_one_line_with_the_reason(saved, tmp_path, monkeypatch):
    import builtins

    w = _copy(saved, tmp_path)
    real = builtins.open

    def failing(file, *a, **k):
        if Path(file) == w:
            raise OSError(errno.EIO, "Input/output error")
        return real(file, *a, **k)

    monkeypatch.setattr(builtins, "open", failing)
    with pytest.raises(NastyError) as e:
        load_checkpoint(tmp_path)
    assert str(e.value) == f"{w}: Input/output error"


# -- the sidecar's fields


@pytest.mark.parametrize("field", ["format_version", "model", "num_classes", "classes", "input_shape", "normalization",
                                   "dataset", "weights_sha256"])
def test_missing_sidecar_field_is_named_with_the_file(saved, tmp_path, field):
    side = json.loads((saved / SIDECAR).read_text())
    del side[field]
    _copy(saved, tmp_path)
    (tmp_path / SIDECAR).write_text(json.dumps(side))
    with pytest.raises(NastyError) as e:
        read_sidecar(tmp_path)
    assert str(e.value) == f"{tmp_path / SIDECAR}: missing field {field!r}"


@pytest.mark.parametrize("field", ["name", "kwargs"])
def test_missing_model_field_is_named_with_the_file(saved, tmp_path, field):
    side = json.loads((saved / SIDECAR).read_text())
    del side["model"][field]
    _copy(saved, tmp_path)
    (tmp_path / SIDECAR).write_text(json.dumps(side))
    with pytest.raises(NastyError) as e:
        read_sidecar(tmp_path)
    assert str(e.value) == f"{tmp_path / SIDECAR} model: missing field {field!r}"


@pytest.mark.parametrize("digest", ["X" * 64, "A" * 64, "0" * 63, "0" * 65])
def test_digest_must_be_64_lowercase_hex_digits(saved, tmp_path, digest):
    with pytest.raises(NastyError, match="weights_sha256 is not a SHA-256 hex digest"):
        read_sidecar(_with(saved, tmp_path, weights_sha256=digest))


@pytest.mark.parametrize("value,ok", [([8] * 64, True), ([8] * 65, False), ([[8]], False), ([{"a": 1}], False),
                                      ([float("nan")], False), ([8, "x", None, 0.5, True], True)])
def test_model_option_lists(saved, tmp_path, value, ok):
    """A model option may be a list of at most 64 plain scalars (no nesting, no tables, no NaN)."""
    side = json.loads((saved / SIDECAR).read_text())
    side["model"]["kwargs"] = {"hidden": value}
    _copy(saved, tmp_path)
    (tmp_path / SIDECAR).write_text(json.dumps(side))
    if ok:
        assert read_sidecar(tmp_path)[1]["model"]["kwargs"]["hidden"] == value
    else:
        with pytest.raises(NastyError, match="model option 'hidden' is not a plain number, string or list"):
            read_sidecar(tmp_path)


def test_saved_sidecar_layout_and_contents(tmp_path):
    """The sidecar is indented JSON in its documented key order, ends with a newline, and keeps the run's config,
    metrics and package versions."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path, create_model("mlp:hidden=8", 3, 1, (4, 4)), classes=["a", "b", "c"], input_shape=(1, 4, 4),
                    mean=[0.5], std=[0.25], dataset="npz:x", config={"data": {"split_seed": 3}}, metrics={"acc": 91.5})
    text = (tmp_path / SIDECAR).read_text()
    assert text.startswith('{\n  "format": "nasty-checkpoint",\n  "format_version": 1,\n  "model": {\n    "name": "mlp"')
    assert text.endswith("\n}\n")
    side = json.loads(text)
    assert side["config"] == {"data": {"split_seed": 3}} and side["metrics"] == {"acc": 91.5}
    assert side["versions"] == versions()
    import numpy
    import platform
    import safetensors

    assert versions() == {"nasty": __import__("nasty").__version__, "torch": torch.__version__,
                          "numpy": numpy.__version__, "safetensors": safetensors.__version__,
                          "python": platform.python_version()}
    save_checkpoint(tmp_path / "d", create_model("mlp:hidden=8", 3, 1, (4, 4)), classes=["a", "b", "c"],
                    input_shape=(1, 4, 4), mean=[0.5], std=[0.25], dataset="npz:x")
    side = json.loads((tmp_path / "d" / SIDECAR).read_text())
    assert side["config"] == {} and side["metrics"] == {}


def test_atomic_json_layout(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "m.json").read_text() == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'


# -- the run's split settings


@pytest.mark.parametrize("config", [None, [1], {"data": 5}, {"data": {}}])
def test_split_settings_defaults(config, saved):
    side = json.loads((saved / SIDECAR).read_text())
    side["config"] = config
    assert split_settings(side) == {"data_root": None, "val_fraction": 0.1, "split_seed": 0}


def test_split_settings_read_and_bounds(saved):
    side = json.loads((saved / SIDECAR).read_text())
    side["config"] = {"data": {"data_root": "/data", "val_fraction": 0.999, "split_seed": 7}}
    assert split_settings(side) == {"data_root": "/data", "val_fraction": 0.999, "split_seed": 7}
    for vf in (0, 0.0, 1, 1.0, 1.5, True):
        side["config"] = {"data": {"val_fraction": vf}}
        with pytest.raises(NastyError) as e:
            split_settings(side)
        assert str(e.value) == f"checkpoint sidecar: config.data.val_fraction must be a number in (0, 1), got {vf!r}"
    side["config"] = {"data": {"data_root": 5}}
    with pytest.raises(NastyError) as e:
        split_settings(side)
    assert str(e.value) == "checkpoint sidecar: config.data.data_root must be a string"


# -- checkpoint against dataset


def _data(classes, shape=(1, 8, 8), name="ds"):
    return SimpleNamespace(name=name, num_classes=len(classes), classes=list(classes), in_channels=shape[0],
                           image_size=tuple(shape[1:]))


def _side(classes, shape=(1, 8, 8)):
    return {"num_classes": len(classes), "classes": list(classes), "input_shape": list(shape)}


def test_check_compatible_names_the_first_differing_class():
    with pytest.raises(NastyError) as e:
        check_compatible(_side(["a", "b", "c"]), _data(["a", "c", "b"]))
    assert str(e.value) == ("checkpoint orders its classes differently from dataset ds "
                            "(class 1 is 'b' in the checkpoint, 'c' in the dataset)")
    with pytest.raises(NastyError) as e:
        check_compatible(_side(["a", "b", "c"]), _data(["a", "b", "x"]), what="teacher")
    assert str(e.value) == ("teacher was trained on other classes than dataset ds "
                            "(class 2 is 'c' in the checkpoint, 'x' in the dataset)")
    with pytest.raises(NastyError) as e:
        check_compatible(_side(["a", "b"]), _data(["a", "b", "c"]))
    assert str(e.value) == "checkpoint has 2 classes but dataset ds has 3"
    with pytest.raises(NastyError) as e:
        check_compatible(_side(["a", "b"], (3, 8, 8)), _data(["a", "b"]))
    assert str(e.value) == "checkpoint expects input (3, 8, 8) but dataset ds gives (1, 8, 8)"


def test_check_compatible_default_names_match_any():
    """Default names 0..C-1 on either side (an npz without class names) are compatible with real names."""
    check_compatible(_side(["0", "1", "2"]), _data(["cat", "dog", "owl"]))
    check_compatible(_side(["cat", "dog", "owl"]), _data([0, 1, 2]))
    check_compatible(_side(["cat", "dog"]), _data(["cat", "dog"]))


# -- legacy (pickle) state dicts


def _mlp():
    torch.manual_seed(0)
    return create_model("mlp:hidden=8", 10, 1, (8, 8)).eval()


@pytest.mark.parametrize("wrap", ["state_dict", "model_state_dict", "model", "net"])
def test_legacy_nested_state_dict_is_found(tmp_path, wrap):
    sd = _mlp().state_dict()
    torch.save({"epoch": 3, wrap: sd}, tmp_path / "x.pt")
    got = read_legacy_state_dict(tmp_path / "x.pt")
    assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_legacy_key_picks_the_entry_and_names_the_choices(tmp_path):
    sd = _mlp().state_dict()
    torch.save({"ema": sd, **{f"k{i}": i for i in range(10)}}, tmp_path / "x.pt")
    got = read_legacy_state_dict(tmp_path / "x.pt", key="ema")
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    with pytest.raises(NastyError) as e:
        read_legacy_state_dict(tmp_path / "x.pt", key="best")
    assert str(e.value) == f"{tmp_path / 'x.pt'}: no entry 'best' (top-level entries: ema, k0, k1, k2, k3, k4, k5, k6)"
    torch.save([sd], tmp_path / "l.pt")
    with pytest.raises(NastyError) as e:
        read_legacy_state_dict(tmp_path / "l.pt", key="ema")
    assert str(e.value) == f"{tmp_path / 'l.pt'}: no entry 'ema' (top-level entries: list)"


class _RunsShell:
    def __reduce__(self):
        return (os.system, ("true",))


def test_legacy_refusal_names_the_refused_global(tmp_path):
    f = tmp_path / "evil.pt"
    f.write_bytes(pickle.dumps(_RunsShell(), protocol=2))
    with pytest.raises(NastyError) as e:
        read_legacy_state_dict(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: refused by torch.load(weights_only=True), nothing in it was run (UnpicklingError: ")
    assert "GLOBAL" in msg and "system" in msg and "Please file an issue" not in msg and "\n" not in msg


def test_legacy_refusal_names_the_unsupported_opcode(tmp_path):
    f = tmp_path / "evil5.pt"
    f.write_bytes(pickle.dumps(_RunsShell(), protocol=5))
    with pytest.raises(NastyError) as e:
        read_legacy_state_dict(f)
    assert str(e.value).startswith(f"{f}: refused by torch.load(weights_only=True), nothing in it was run (UnpicklingError: ")
    assert str(e.value).endswith("Unsupported operand 149)")


def test_legacy_refusal_of_broken_files(tmp_path):
    f = tmp_path / "empty.pt"
    f.write_bytes(b"")
    with pytest.raises(NastyError) as e:
        read_legacy_state_dict(f)
    assert str(e.value) == f"{f}: refused by torch.load(weights_only=True), nothing in it was run (EOFError: )"
    torch.save({"w": torch.zeros(100)}, tmp_path / "t.pt")
    f = tmp_path / "t.pt"
    f.write_bytes(f.read_bytes()[:-50])
    with pytest.raises(NastyError) as e:
        read_legacy_state_dict(f)
    head = f"{f}: refused by torch.load(weights_only=True), nothing in it was run (RuntimeError: "
    msg = str(e.value)
    assert msg.startswith(head) and msg.endswith(")") and len(msg) - len(head) - 1 == 200  # torch's reason, cut at 200


def test_legacy_state_is_cast_checked_and_named(tmp_path):
    model = _mlp()
    src = tmp_path / "x.pt"
    src.write_bytes(b"legacy bytes")
    sd64 = {k: v.double() * 2 for k, v in model.state_dict().items()}  # float64 weights: cast to the model's float32
    facts = load_legacy_state(model, sd64, src)
    assert facts == {"source": str(src), "source_sha256": hashlib.sha256(b"legacy bytes").hexdigest(),
                     "loader": "torch.load(weights_only=True)"}
    assert all(v.dtype == torch.float32 and torch.equal(v, sd64[k].float()) for k, v in model.state_dict().items())
    with pytest.raises(NastyError) as e:
        load_legacy_state(_mlp(), {**sd64, "extra": torch.zeros(1)}, src)
    assert str(e.value) == f"{src}: weights do not fit mlp (unexpected extra; 0 missing, 1 unexpected)"
    with pytest.raises(NastyError) as e:
        load_legacy_state(_mlp(), {**sd64, "head.bias": torch.arange(10)}, src)  # integers are not cast to floats
    assert str(e.value) == f"{src}: tensor head.bias is (10,) I64, model needs (10,) F32"
    with pytest.raises(NastyError) as e:
        load_legacy_state(_mlp(), {**sd64, "head.bias": torch.zeros(10, dtype=torch.complex64)}, src)
    assert str(e.value) == f"{src}: tensor head.bias is (10,) torch.complex64, model needs (10,) F32"
    with pytest.raises(NastyError) as e:
        load_legacy_state(_mlp(), {**sd64, "head.bias": torch.full((10,), float("nan"))}, src)
    assert str(e.value) == f"{src}: tensor head.bias holds NaN or inf"


def test_legacy_integer_buffers_keep_their_dtype(tmp_path):
    """Only floating tensors are cast: an int32 step counter where the model keeps int64 is refused."""
    model = create_model("cnn:width=0.25", 10, 1, (8, 8))
    sd = dict(model.state_dict())
    sd["block1.1.num_batches_tracked"] = sd["block1.1.num_batches_tracked"].int()
    with pytest.raises(NastyError, match=r"tensor block1.1.num_batches_tracked is \(\) I32, model needs \(\) I64"):
        load_legacy_state(model, sd, tmp_path / "x.pt")


def test_legacy_message_names_a_plain_module_by_its_class(tmp_path):
    with pytest.raises(NastyError) as e:
        load_legacy_state(torch.nn.Linear(2, 2), {"weight": torch.zeros(2, 2)}, tmp_path / "x.pt")
    assert str(e.value) == f"{tmp_path / 'x.pt'}: weights do not fit Linear (missing bias; 1 missing, 0 unexpected)"


# -- messages of load_checkpoint name the weights file


def test_load_messages_start_with_the_weights_path(saved, tmp_path):
    folder = tmp_path / "c"
    _copy(saved, folder)
    side = json.loads((folder / SIDECAR).read_text())
    side["model"]["name"] = "evil"
    (folder / SIDECAR).write_text(json.dumps(side))
    with pytest.raises(NastyError) as e:
        load_checkpoint(folder)
    assert str(e.value).startswith(f"{folder / WEIGHTS}: unknown model 'evil'")
    side["model"] = {"name": "mlp", "kwargs": {"hidden": 16}}
    (folder / SIDECAR).write_text(json.dumps(side))
    with pytest.raises(NastyError) as e:
        load_checkpoint(folder)
    assert str(e.value) == f"{folder / WEIGHTS}: tensor fc0.0.weight is (8, 64) F32, model needs (16, 64) F32"


# -- training state files


def test_training_state_round_trips_nan(tmp_path):
    save_state_file(tmp_path / "s.safetensors", {"w": torch.ones(2)}, {"best_val_loss": float("nan"), "epoch": 1})
    tensors, meta = load_state_file(tmp_path / "s.safetensors")
    assert math.isnan(meta["best_val_loss"]) and meta["epoch"] == 1 and torch.equal(tensors["w"], torch.ones(2))


@pytest.mark.parametrize("metadata,needle", [
    (None, "not a nasty training state"),
    ({"nasty": json.dumps({"format": "other", "format_version": 1})}, "not a nasty training state"),
    ({"nasty": "[1]"}, "not a nasty training state"),
    ({"nasty": json.dumps({"format": "nasty-train-state", "format_version": 99})}, "training state version 99 is not understood"),
    ({"nasty": json.dumps({"format": "nasty-train-state", "format_version": "1"})}, "training state version '1' is not understood"),
])
def test_foreign_training_state_is_refused(tmp_path, metadata, needle):
    f = tmp_path / "s.safetensors"
    f.write_bytes(save({"w": torch.zeros(1)}, metadata=metadata))
    with pytest.raises(NastyError) as e:
        load_state_file(f)
    assert str(e.value) == f"{f}: {needle}"


def test_unreadable_training_state_names_the_reason(tmp_path):
    f = tmp_path / "s.safetensors"
    f.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(NastyError) as e:
        load_state_file(f)
    head = f"{f}: unreadable training state ("
    msg = str(e.value)
    assert msg.startswith(head) and "\n" not in msg
    assert "header" in msg[len(head):]  # the library's own first line ("Error while deserializing header: ...")


# -- atomic writes


def test_temporary_files_lie_beside_their_targets(tmp_path, monkeypatch):
    """Each file is staged as a hidden ``.nasty-tmp-*.tmp`` in the target's own folder (so the rename is atomic), and a
    missing folder is created with its parents."""
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append((Path(a), Path(b))), real(a, b))[1])
    target = tmp_path / "a" / "b" / "m.json"
    atomic_write_files([(target, b"1"), (tmp_path / "c.bin", b"2")])
    assert target.read_bytes() == b"1" and (tmp_path / "c.bin").read_bytes() == b"2"
    assert [(s.parent, s.name.startswith(".nasty-tmp-"), s.suffix) for s, d in seen] == [
        (target.parent, True, ".tmp"), (tmp_path, True, ".tmp")]


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_write_failure_messages_give_the_reason(tmp_path, monkeypatch):
    from nasty.checkpoint import WriteFailed

    import tempfile
    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", _enospc)
        with pytest.raises(WriteFailed) as e:
            atomic_write_files([(tmp_path / "x", b"1")])
    assert str(e.value) == f"cannot write {tmp_path / 'x'}: No space left on device; the previous file is unchanged"
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", _enospc)
        with pytest.raises(WriteFailed) as e:
            atomic_write_files([(tmp_path / "x", b"1")])
    assert str(e.value) == f"cannot write {tmp_path / 'x'}: No space left on device; the previous file is unchanged"
    with monkeypatch.context() as m:
        m.setattr(os, "replace", _enospc)
        with pytest.raises(WriteFailed) as e:
            atomic_write_files([(tmp_path / "x", b"1")])
    assert str(e.value) == f"cannot write {tmp_path / 'x'}: No space left on device; the previous files are unchanged"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left behind


def test_failed_staging_of_a_later_file_removes_the_earlier_ones(tmp_path, monkeypatch):
    import tempfile

    calls = []
    real = tempfile.mkstemp

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            _enospc()
        return real(*a, **k)

    monkeypatch.setattr(tempfile, "mkstemp", second_fails)
    with pytest.raises(NastyError):
        atomic_write_files([(tmp_path / "a", b"1"), (tmp_path / "b", b"2")])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("hard_links", [True, False])
def test_failed_second_rename_restores_the_first_file(tmp_path, monkeypatch, hard_links):
    """Both or neither: when the second rename fails, the first target is restored from its backup (a copy where
    the file system has no hard links), or removed when it did not exist before."""
    (tmp_path / "a").write_bytes(b"old")
    real = os.replace
    calls = []

    def second_fails(a, b):
        calls.append(b)
        if len(calls) == 2:
            _enospc()
        return real(a, b)

    monkeypatch.setattr(os, "replace", second_fails)
    if not hard_links:
        monkeypatch.setattr(os, "link", _enospc)
    with pytest.raises(NastyError, match="cannot write .*b: No space left on device; the previous files are unchanged"):
        atomic_write_files([(tmp_path / "a", b"new"), (tmp_path / "b", b"2")])
    assert (tmp_path / "a").read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    (tmp_path / "a").unlink()
    calls.clear()
    with pytest.raises(NastyError):
        atomic_write_files([(tmp_path / "a", b"new"), (tmp_path / "b", b"2")])
    assert list(tmp_path.iterdir()) == []  # the first file was new: removed again
