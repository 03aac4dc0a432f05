"""The one checkpoint format: ``model.safetensors`` (weights) + ``model.json`` (everything needed to
rebuild the model). Loading never unpickles: a checkpoint may come from someone hostile.

The sidecar holds the architecture and its arguments, classes, input shape, normalisation,
dataset, config, metrics, package versions and the SHA-256 of the weights file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import NastyError

FORMAT = "nasty-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
SIDECAR = "model.json"


def versions() -> dict[str, str]:
    import numpy
    import safetensors

    from . import __version__

    return {"nasty": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename: a crash leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _resolve(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        for cand in (p / WEIGHTS, p / "defended" / WEIGHTS, p / "student" / WEIGHTS):
            if cand.is_file():
                return cand, cand.with_name(SIDECAR)
        raise NastyError(f"no {WEIGHTS} in {p}")
    if p.suffix in (".pt", ".pth", ".pkl", ".bin", ".ckpt"):
        raise NastyError(f"{p} is a pickle-based file; nasty loads safetensors only (convert it with `nasty convert`)")
    if p.suffix == ".json":
        p = p.with_name(WEIGHTS) if p.name == SIDECAR else p.with_suffix(".safetensors")
    if not p.is_file():
        raise NastyError(f"checkpoint not found: {p}")
    side = p.with_name(SIDECAR) if p.name == WEIGHTS else p.with_suffix(".json")
    return p, side


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(out_dir: str | Path, model: nn.Module, *, classes: list[str], input_shape: tuple[int, int, int],
                    mean: list[float], std: list[float], dataset: str, config: dict | None = None,
                    metrics: dict | None = None, extra: dict | None = None) -> Path:
    """Write weights and sidecar atomically into ``out_dir``; return the weights path."""
    from safetensors.torch import save

    from .models import model_spec

    out = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(state)
    atomic_write_bytes(out / WEIGHTS, blob)
    side = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_spec(model),
        "num_classes": len(classes),
        "classes": list(classes),
        "input_shape": list(input_shape),
        "normalization": {"mean": list(mean), "std": list(std)},
        "dataset": dataset,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "config": config or {},
        "metrics": metrics or {},
        "versions": versions(),
        **(extra or {}),
    }
    atomic_write_json(out / SIDECAR, side)
    return out / WEIGHTS


def _check_type(side: dict, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in side:
        raise NastyError(f"{where}: missing field {key!r}")
    v = side[key]
    if not isinstance(v, typ) or isinstance(v, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise NastyError(f"{where}: field {key!r} has type {type(v).__name__}")
    return v


def read_sidecar(path: str | Path) -> tuple[Path, dict]:
    """Validate and return the sidecar of a checkpoint (no weights loaded)."""
    weights, side_path = _resolve(path)
    if not side_path.is_file():
        raise NastyError(f"{weights}: sidecar {side_path.name} missing; cannot rebuild the model")
    try:
        side = json.loads(side_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NastyError(f"{side_path}: not valid JSON ({e})") from None
    where = str(side_path)
    if not isinstance(side, dict) or side.get("format") != FORMAT:
        raise NastyError(f"{where}: not a nasty checkpoint sidecar")
    if _check_type(side, "format_version", int, where) > FORMAT_VERSION:
        raise NastyError(f"{where}: format version {side['format_version']} is newer than this nasty understands")
    model = _check_type(side, "model", dict, where)
    _check_type(model, "name", str, where + " model")
    _check_type(model, "kwargs", dict, where + " model")
    n = _check_type(side, "num_classes", int, where)
    classes = _check_type(side, "classes", list, where)
    if n < 2 or len(classes) != n or not all(isinstance(c, str) for c in classes):
        raise NastyError(f"{where}: classes ({len(classes)}) disagree with num_classes ({n})")
    shape = _check_type(side, "input_shape", list, where)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise NastyError(f"{where}: input_shape must be three positive integers")
    norm = _check_type(side, "normalization", dict, where)
    for k in ("mean", "std"):
        v = norm.get(k)
        if not isinstance(v, list) or len(v) != shape[0] or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in v):
            raise NastyError(f"{where}: normalization.{k} must be {shape[0]} numbers")
    _check_type(side, "weights_sha256", str, where)
    return weights, side


def load_checkpoint(path: str | Path, *, map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from the sidecar and load the weights with strict key/shape/dtype checks."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import create_model

    weights, side = read_sidecar(path)
    if sha256_file(weights) != side["weights_sha256"]:
        raise NastyError(f"{weights}: SHA-256 does not match its sidecar (truncated or altered file)")
    try:
        state = load_file(str(weights), device=map_location)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise NastyError(f"{weights}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    c, h, w = side["input_shape"]
    model = create_model(side["model"]["name"], side["num_classes"], c, (h, w), **side["model"]["kwargs"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise NastyError(f"{weights}: weights do not fit {side['model']['name']} ({what}; {len(missing)} missing, {len(unexpected)} unexpected)")
    for k, v in expected.items():
        if state[k].shape != v.shape or state[k].dtype != v.dtype:
            raise NastyError(f"{weights}: tensor {k} is {tuple(state[k].shape)} {state[k].dtype}, model needs {tuple(v.shape)} {v.dtype}")
        if v.is_floating_point() and not torch.isfinite(state[k]).all():
            raise NastyError(f"{weights}: tensor {k} holds NaN or inf")
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, side


def check_compatible(side: dict, data, what: str = "checkpoint") -> None:
    """Refuse a checkpoint whose classes or input shape do not match the dataset."""
    if side["num_classes"] != data.num_classes:
        raise NastyError(f"{what} has {side['num_classes']} classes but dataset {data.name} has {data.num_classes}")
    shape = [data.in_channels, *data.image_size]
    if list(side["input_shape"]) != shape:
        raise NastyError(f"{what} expects input {tuple(side['input_shape'])} but dataset {data.name} gives {tuple(shape)}")
