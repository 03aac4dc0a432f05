"""The one checkpoint format: ``model.safetensors`` (weights) + ``model.json`` (everything needed to
rebuild the model). Loading never unpickles: a checkpoint may come from someone hostile.

The sidecar holds the architecture and its arguments, classes, input shape, normalisation,
dataset, config, metrics, package versions and the SHA-256 of the weights file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import stat
import struct
import tempfile  # noqa: F401  (tests patch checkpoint.tempfile)
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy
import safetensors
import torch
import torch.nn as nn

from . import __version__, safe_io
from .errors import NastyError
from .models import create_model, model_spec

FORMAT = "nasty-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
SIDECAR = "model.json"


def versions() -> dict[str, str]:
    return {"nasty": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


# Every write goes through nasty.safe_io (no link followed, no special file replaced, temporary file
# then rename); the names below are kept for the callers of this module.
WriteFailed = safe_io.WriteFailed
_FILE_MODE = safe_io.FILE_MODE
atomic_write_files = safe_io.write_files
atomic_write_bytes = safe_io.write_bytes
atomic_write_json = safe_io.write_json


def _resolve(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        for cand in (p / WEIGHTS, p / "defended" / WEIGHTS, p / "student" / WEIGHTS):
            if cand.is_file():
                return cand, cand.with_name(SIDECAR)
        states = sorted(p.glob("train_state-*.safetensors"))
        hint = f" (it holds only the training state {states[0].name}: finish the run with --resume)" if states else ""
        raise NastyError(f"no {WEIGHTS} in {p}{hint}")
    if p.suffix in LEGACY_SUFFIXES:
        raise NastyError(f"{p} is a pickle-based file; nasty loads safetensors only (convert it with `nasty convert`)")
    if p.suffix == ".json":
        p = p.with_name(WEIGHTS) if p.name == SIDECAR else p.with_suffix(".safetensors")
    if not p.is_file():
        raise NastyError(f"checkpoint not found: {p}")
    if p.name.startswith("train_state-") or _is_train_state(p):
        raise NastyError(f"{p} is a training state (the resumable progress of a run, for --resume), not a model checkpoint; "
                         f"pass the run folder {p.parent} or the {WEIGHTS} in it")
    side = p.with_name(SIDECAR) if p.name == WEIGHTS else p.with_suffix(".json")
    return p, side


def _is_train_state(p: Path) -> bool:
    """Whether ``p`` is a file written by :func:`save_state_file` (read from its header only)."""

    if p.suffix != ".safetensors" or (p.with_name(SIDECAR) if p.name == WEIGHTS else p.with_suffix(".json")).is_file():
        return False
    try:
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return n <= MAX_HEADER_BYTES and f'"{STATE_FORMAT}' in f.read(min(n, 1 << 16)).decode("utf-8", "replace").replace('\\"', '"')
    except (OSError, struct.error):
        return False


LEGACY_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar")
MAX_SIDECAR_BYTES = 16 << 20  # a sidecar is a few KB; refuse to parse anything huge
MAX_CLASSES = 100_000
MAX_INPUT_DIM = 4096


MAX_HEADER_BYTES = 100 << 20  # the limit of the safetensors library itself


def _check_weights_size(weights: Path) -> None:
    """Refuse a weights file that is not a regular file, or whose size differs from what its own
    safetensors header describes (8 bytes, the JSON header, the tensors' data), without reading it."""

    try:
        st = weights.stat()
        if not stat.S_ISREG(st.st_mode):
            raise NastyError(f"{weights} is not a regular file")
        with open(weights, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise NastyError(f"{weights}: not a readable safetensors file ({st.st_size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > st.st_size:
                raise NastyError(f"{weights}: not a readable safetensors file (header of {n} bytes in a file of {st.st_size})")
            meta = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise NastyError(f"{weights}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise NastyError(f"{weights}: not a readable safetensors file (unreadable header)") from None
    if not isinstance(meta, dict):
        raise NastyError(f"{weights}: not a readable safetensors file (header is not a table)")
    end = 0
    for k, v in meta.items():
        if k == "__metadata__":
            continue
        offs = v.get("data_offsets") if isinstance(v, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) and o >= 0 for o in offs)):
            raise NastyError(f"{weights}: not a readable safetensors file (tensor {k!r} has no valid data_offsets)")
        end = max(end, offs[1])
    if st.st_size != 8 + n + end:
        raise NastyError(f"{weights}: not a readable safetensors file ({st.st_size} bytes, but its header describes "
                         f"{8 + n + end}: truncated, padded or altered)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_bytes(model: nn.Module) -> bytes:
    from safetensors.torch import save

    # clone: safetensors refuses tensors that share storage (tied weights)
    return save({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()})


def save_checkpoint(out_dir: str | Path, model: nn.Module, *, classes: list[str], input_shape: tuple[int, int, int],
                    mean: list[float], std: list[float], dataset: str, config: dict | None = None,
                    metrics: dict | None = None, extra: dict | None = None) -> Path:
    """Write weights and sidecar into ``out_dir``, both or neither (see :func:`atomic_write_files`);
    return the weights path. A failed write raises :class:`WriteFailed` and keeps the old pair."""
    out = Path(out_dir)
    blob = _state_bytes(model)
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
    side_bytes = (json.dumps(side, indent=2, sort_keys=False) + "\n").encode()
    atomic_write_files([(out / WEIGHTS, blob), (out / SIDECAR, side_bytes)])
    return out / WEIGHTS


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_type(side: dict, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in side:
        raise NastyError(f"{where}: missing field {key!r}")
    v = side[key]
    if not isinstance(v, typ) or isinstance(v, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise NastyError(f"{where}: field {key!r} has type {type(v).__name__}")
    return v


def _plain_json(v: Any, depth: int = 0) -> bool:
    """Model options must be plain JSON scalars or short lists of them."""
    if v is None or isinstance(v, (bool, str)) or _is_int(v):
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list) and depth == 0 and len(v) <= 64:
        return all(_plain_json(a, 1) for a in v)
    return False


def read_sidecar(path: str | Path) -> tuple[Path, dict]:
    """Validate and return the sidecar of a checkpoint (no weights loaded). Every field another
    part of nasty reads is type- and range-checked: the sidecar may come from someone hostile."""
    weights, side_path = _resolve(path)
    if not side_path.is_file():
        raise NastyError(f"{weights}: sidecar {side_path.name} missing; cannot rebuild the model")
    where = str(side_path)
    size = side_path.stat().st_size
    if size > MAX_SIDECAR_BYTES:
        raise NastyError(f"{where}: sidecar is {size} bytes, more than the {MAX_SIDECAR_BYTES} a sidecar may have")
    try:
        side = json.loads(side_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NastyError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise NastyError(f"{where}: not valid JSON (nested too deeply)") from None
    if not isinstance(side, dict) or side.get("format") != FORMAT:
        raise NastyError(f"{where}: not a nasty checkpoint sidecar")
    if _check_type(side, "format_version", int, where) > FORMAT_VERSION:
        raise NastyError(f"{where}: format version {side['format_version']} is newer than this nasty understands")
    model = _check_type(side, "model", dict, where)
    _check_type(model, "name", str, where + " model")
    kwargs = _check_type(model, "kwargs", dict, where + " model")
    bad = [k for k, v in kwargs.items() if not _plain_json(v)]
    if bad:
        raise NastyError(f"{where}: model option {bad[0]!r} is not a plain number, string or list")
    n = _check_type(side, "num_classes", int, where)
    if not 2 <= n <= MAX_CLASSES:
        raise NastyError(f"{where}: num_classes {n} is outside 2..{MAX_CLASSES}")
    classes = _check_type(side, "classes", list, where)
    if len(classes) != n or not all(isinstance(c, str) for c in classes):
        raise NastyError(f"{where}: classes ({len(classes)}) disagree with num_classes ({n})")
    shape = _check_type(side, "input_shape", list, where)
    if len(shape) != 3 or not all(_is_int(s) and 0 < s <= MAX_INPUT_DIM for s in shape):
        raise NastyError(f"{where}: input_shape must be three integers in 1..{MAX_INPUT_DIM}")
    norm = _check_type(side, "normalization", dict, where)
    for k in ("mean", "std"):
        v = norm.get(k)
        if not isinstance(v, list) or len(v) != shape[0] or not all(_is_num(a) and math.isfinite(a) for a in v):
            raise NastyError(f"{where}: normalization.{k} must be {shape[0]} finite numbers")
    if not all(a > 0 for a in norm["std"]):
        raise NastyError(f"{where}: normalization.std must be positive")
    _check_type(side, "dataset", str, where)
    digest = _check_type(side, "weights_sha256", str, where)
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise NastyError(f"{where}: weights_sha256 is not a SHA-256 hex digest")
    return weights, side


def split_settings(side: dict) -> dict[str, Any]:
    """``data_root``, ``val_fraction`` and ``split_seed`` of the run that wrote a checkpoint, type-checked
    (the ``config`` of a sidecar is free-form and may be hostile); defaults where absent."""
    cfg = side.get("config")
    d = cfg.get("data") if isinstance(cfg, dict) else None
    d = d if isinstance(d, dict) else {}
    out = {"data_root": d.get("data_root"), "val_fraction": d.get("val_fraction", 0.1), "split_seed": d.get("split_seed", 0)}
    if out["data_root"] is not None and not isinstance(out["data_root"], str):
        raise NastyError("checkpoint sidecar: config.data.data_root must be a string")
    if not _is_num(out["val_fraction"]) or not 0 < out["val_fraction"] < 1:
        raise NastyError(f"checkpoint sidecar: config.data.val_fraction must be a number in (0, 1), got {out['val_fraction']!r}")
    if not _is_int(out["split_seed"]) or out["split_seed"] < 0:
        raise NastyError(f"checkpoint sidecar: config.data.split_seed must be a non-negative integer, got {out['split_seed']!r}")
    return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
           "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _header(weights: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor names, shapes and dtypes from a safetensors header, without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
            return out
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise NastyError(f"{weights}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in _DTYPES.items() if v == dtype), str(dtype))


def build_model(name: str, num_classes: int, input_shape, kwargs: dict, where: str, *, meta: bool = False) -> nn.Module:
    """``create_model`` for specs read from a file: any failure is a one-line :class:`NastyError`.
    ``meta=True`` builds on the meta device (no memory), to check shapes before allocating."""
    c, h, w = input_shape
    try:
        if meta:
            with torch.device("meta"):
                return create_model(name, num_classes, c, (h, w), **kwargs)
        return create_model(name, num_classes, c, (h, w), **kwargs)
    except NastyError as e:
        raise NastyError(f"{where}: {e}") from None
    except (Exception, RecursionError) as e:  # hostile options can break a constructor in many ways
        raise NastyError(f"{where}: cannot build model {name!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def check_state_fits(expected: dict[str, tuple[tuple[int, ...], str]], got: dict[str, tuple[tuple[int, ...], str]],
                     where: str, arch: str) -> None:
    """Refuse weights whose names, shapes or dtypes differ from the model's."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise NastyError(f"{where}: weights do not fit {arch} ({what}; {len(missing)} missing, {len(unexpected)} unexpected)")
    for k, (shape, dtype) in expected.items():
        if got[k] != (shape, dtype):
            raise NastyError(f"{where}: tensor {k} is {got[k][0]} {got[k][1]}, model needs {shape} {dtype}")


def _signature(state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), _dtype_name(v.dtype)) for k, v in state.items()}


def load_checkpoint(path: str | Path, *, map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from the sidecar and load the weights with strict key/shape/dtype checks.

    Order: sidecar checks, SHA-256 of the weights, the safetensors header against a model built on
    the meta device (so a sidecar declaring a huge model allocates nothing), then the tensors
    (refusing NaN/inf) into the real model. Never unpickles anything.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, side = read_sidecar(path)
    _check_weights_size(weights)  # before hashing: a sparse 200 GB file must not be read in full
    header = _header(weights)
    arch, kwargs = side["model"]["name"], side["model"]["kwargs"]
    meta = build_model(arch, side["num_classes"], side["input_shape"], kwargs, str(weights), meta=True)
    check_state_fits(_signature(meta.state_dict()), header, str(weights), arch)
    del meta
    if sha256_file(weights) != side["weights_sha256"]:  # the file now has exactly the model's size
        raise NastyError(f"{weights}: SHA-256 does not match its sidecar (truncated or altered file)")
    try:
        state = load_file(str(weights), device=map_location)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise NastyError(f"{weights}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise NastyError(f"{weights}: tensor {k} holds NaN or inf")
    model = build_model(arch, side["num_classes"], side["input_shape"], kwargs, str(weights))
    check_state_fits(_signature(model.state_dict()), _signature(state), str(weights), arch)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, side


def check_compatible(side: dict, data, what: str = "checkpoint") -> None:
    """Refuse a checkpoint whose classes (number, names, order) or input shape do not match the dataset.

    Class *names* are compared too: the same images with the classes in another order would give
    a plausible-looking wrong accuracy. Names differ legitimately only where one side has none
    (the default names ``0 .. C-1``, e.g. an npz without ``classes``)."""
    if side["num_classes"] != data.num_classes:
        raise NastyError(f"{what} has {side['num_classes']} classes but dataset {data.name} has {data.num_classes}")
    ours, theirs = [str(c) for c in side["classes"]], [str(c) for c in data.classes]
    unnamed = [str(i) for i in range(len(ours))]
    if ours != theirs:
        if sorted(ours) == sorted(theirs):
            i = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            raise NastyError(f"{what} orders its classes differently from dataset {data.name} "
                             f"(class {i} is {ours[i]!r} in the checkpoint, {theirs[i]!r} in the dataset)")
        if ours != unnamed and theirs != unnamed:
            i = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            raise NastyError(f"{what} was trained on other classes than dataset {data.name} "
                             f"(class {i} is {ours[i]!r} in the checkpoint, {theirs[i]!r} in the dataset)")
    shape = [data.in_channels, *data.image_size]
    if list(side["input_shape"]) != shape:
        raise NastyError(f"{what} expects input {tuple(side['input_shape'])} but dataset {data.name} gives {tuple(shape)}")


# ----------------------------------------------------------------------------------------------
# legacy (pickle) state dicts: only through `nasty convert`, only with torch.load(weights_only=True)


# What a legacy file may unpack to, beyond the model's own weights: a training state holds a few copies of
# them (optimizer moments, an EMA), plus its pickles.
LEGACY_COPIES = 8
LEGACY_SLACK_BYTES = 64 << 20
LEGACY_MAX_BYTES = 4 << 30  # without a model to size it by


def tensor_bytes(model: nn.Module) -> int:
    """The bytes of ``model``'s state dict (parameters and buffers); counted, not allocated, on the meta device."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def legacy_budget(model: nn.Module) -> int:
    """The most bytes a legacy file for ``model`` may unpack to (see :func:`read_legacy_state_dict`)."""
    return LEGACY_COPIES * tensor_bytes(model) + LEGACY_SLACK_BYTES


def _check_archive(p: Path, budget: int) -> bool:
    """Refuse a legacy file that would unpack to more than ``budget`` bytes, from its zip directory
    (the members' stated sizes), before anything is read or inflated. Returns whether it can be memory-
    mapped (a zip of stored, uncompressed members, as ``torch.save`` writes). The old non-zip format
    stores its tensors uncompressed, so its own size bounds what it holds."""
    try:
        size = p.stat().st_size
        if not zipfile.is_zipfile(p):
            if size > budget:
                raise NastyError(f"{p}: {size} bytes, more than the {budget} a state dict of this model can need; refused")
            return False
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise NastyError(f"{p}: not a readable PyTorch file ({type(e).__name__}: {str(e)[:200]})") from None
    total = sum(i.file_size for i in infos)
    if total > budget:
        raise NastyError(f"{p}: unpacks to {total} bytes, more than the {budget} a state dict of this model can need; "
                         "refused before reading it")
    return all(i.compress_type == zipfile.ZIP_STORED for i in infos)


def read_legacy_state_dict(path: str | Path, key: str | None = None, *, budget: int = LEGACY_MAX_BYTES) -> dict[str, torch.Tensor]:
    """Tensors of a legacy ``.pt/.pth`` state dict, read with ``torch.load(weights_only=True)``.

    ``weights_only`` unpickles tensors and plain containers only: a file whose pickle would call
    anything else (``os.system`` ...) is refused before any of it runs. Nothing is inflated beyond
    ``budget`` bytes (see :func:`legacy_budget`), and a plain zip is memory-mapped, so its tensors take
    no memory until they are checked against the model (:func:`load_legacy_state`). ``key`` picks a
    nested state dict (default: the file itself, else ``state_dict``/``model_state_dict``/``model``/``net``);
    a ``module.`` prefix (DataParallel) is stripped.
    """
    p = Path(path)
    if not p.is_file():
        raise NastyError(f"legacy checkpoint not found: {p}")
    mmap = _check_archive(p, budget)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the refusal below says enough
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # UnpicklingError for forbidden globals, RuntimeError/EOFError for broken files
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # torch's text suggests weights_only=False: never; keep only the line that names the refused content
        reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln), lines[0] if lines else "")
        reason = reason.replace("Please file an issue with the following so that we can make `weights_only=True` compatible with your use case: ", "")
        raise NastyError(f"{p}: refused by torch.load(weights_only=True), nothing in it was run ({type(e).__name__}: {reason[:200]})") from None

    def tensors_only(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            raise NastyError(f"{p}: no entry {key!r} (top-level entries: {', '.join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__})")
        obj = obj[key]
    elif isinstance(obj, dict) and not tensors_only(obj):
        for cand in ("state_dict", "model_state_dict", "model", "net"):
            if tensors_only(obj.get(cand)):
                obj = obj[cand]
                break
    if not tensors_only(obj):
        raise NastyError(f"{p}: not a state dict of named tensors (use --key to pick the entry holding it)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_legacy_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> dict:
    """Load a legacy state dict (from :func:`read_legacy_state_dict`) into ``model``: strict names and
    shapes, floating tensors cast to the model's dtype, NaN/inf refused. Returns facts for the sidecar.

    Every name, shape and dtype is compared with the model's *before* any tensor is copied, cast or made
    contiguous: a stride-0 or expanded view claims a shape its storage does not hold, and copying it
    first would allocate whatever it claims."""
    expected = model.state_dict()
    floats = {k for k, v in state.items() if k in expected and v.is_floating_point() and expected[k].is_floating_point()}
    got = {k: (tuple(v.shape), _dtype_name(expected[k].dtype) if k in floats else _dtype_name(v.dtype)) for k, v in state.items()}
    check_state_fits(_signature(expected), got, str(source), model_spec_name(model))
    cast = {k: (v.to(expected[k].dtype) if k in floats else v).contiguous() for k, v in state.items()}
    for k, v in cast.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise NastyError(f"{source}: tensor {k} holds NaN or inf")
    model.load_state_dict(cast, strict=True)
    model.eval()
    return {"source": str(source), "source_sha256": sha256_file(Path(source)), "loader": "torch.load(weights_only=True)"}


def model_spec_name(model: nn.Module) -> str:
    spec = getattr(model, "nasty_spec", None)
    return spec["name"] if isinstance(spec, dict) else type(model).__name__


# ----------------------------------------------------------------------------------------------
# training state: tensors in safetensors, everything else as JSON in its metadata (one file, one rename)

STATE_FORMAT = "nasty-train-state"
STATE_VERSION = 1


def save_state_file(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically write a training state: ``tensors`` plus a JSON document, in one safetensors file."""
    from safetensors.torch import save

    doc = {"format": STATE_FORMAT, "format_version": STATE_VERSION, **meta}
    blob = save({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()},
                metadata={"nasty": json.dumps(doc, allow_nan=True)})
    atomic_write_bytes(Path(path), blob)


def load_state_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_state_file` (no pickle); one-line errors when it is not one."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get("nasty")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise NastyError(f"{p}: unreadable training state ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    try:
        meta = json.loads(raw) if raw is not None else None
    except (json.JSONDecodeError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise NastyError(f"{p}: not a nasty training state")
    if not _is_int(meta.get("format_version")) or meta["format_version"] > STATE_VERSION:
        raise NastyError(f"{p}: training state version {meta.get('format_version')!r} is not understood")
    return tensors, meta
