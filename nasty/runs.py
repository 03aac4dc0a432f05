"""Run directories, data from a config, and normal (supervised) training of a teacher or baseline.

One run = one output directory holding ``config.json`` (the resolved config), the checkpoint
(``model.safetensors`` + ``model.json``), ``metrics.jsonl`` and a result JSON. An existing,
non-empty directory is never overwritten without ``force``.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch.nn as nn

from . import safe_io
from .checkpoint import atomic_write_json, save_checkpoint
from .config import check_model_specs, train_config
from .data import DataBundle, load_dataset
from .errors import NastyError
from .metrics import evaluate
from .models import create_model
from .resume import Checkpointing
from .train import ce_objective, fit, seed_everything


RUN_MARKERS = ("run.json", "result.json", "model.json", "config.json", "metrics.jsonl", "audit.json", "audit-config.json")
LOCK_FILE = ".nasty.lock"
_LOCKS: dict[Path, int] = {}  # run folder -> open, flock-ed file descriptor held by this process


def _is_leftover(p: Path) -> bool:
    """A file nasty leaves behind only when killed: the temporary file of an atomic write (or its
    backup), or the lock file of a run folder."""
    n = p.name
    return n == LOCK_FILE or safe_io.is_temporary(p)


def has_content(path: Path) -> bool:
    """Whether folder ``path`` holds anything besides the leftovers of a killed write."""
    try:
        return any(not _is_leftover(p) for p in path.iterdir())
    except OSError as e:
        raise NastyError(f"cannot list output directory {path}: {e.strerror or e}") from None


def clean_leftovers(path: Path) -> None:
    """Remove the temporary files that killed writes left anywhere in run folder ``path`` (call with
    the folder's lock held: a live run's temporary files are never touched)."""
    safe_io.remove_temporaries(path)


def lock_out_dir(path: Path, beside: bool = False) -> None:
    """Take an exclusive lock on run folder ``path`` for the rest of this command (or process): a
    second nasty run on the same folder at the same time is refused instead of both 'succeeding'.
    ``beside``: the lock file is ``.<name>.nasty.lock`` next to the folder (for a folder whose
    contents another module checks, e.g. an audit's), created with its parents."""
    import fcntl

    key = path.resolve()
    if key in _LOCKS:
        return
    name = f".{path.name}{LOCK_FILE}"
    if len(os.fsencode(name)) > 255:  # a legal 255-byte folder name: the lock beside it gets a short name
        name = f".{hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]}{LOCK_FILE}"
    lock = path.parent / name if beside else path / LOCK_FILE
    try:
        fd = safe_io.open_lock(lock)
    except OSError as e:
        raise NastyError(f"cannot lock output directory {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise NastyError(f"output directory {path} is in use by another nasty run; wait for it or choose another --out") from None
    _LOCKS[key] = fd
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(lambda: unlock_out_dir(key))


def unlock_out_dir(path: Path) -> None:
    fd = _LOCKS.pop(Path(path).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing releases the flock


def _strings(obj: Any, depth: int = 0) -> Iterator[str]:
    if depth > 8:
        return
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v, depth + 1)


def input_paths(values: Any) -> list[Path]:
    """Every existing file or folder that a string in ``values`` names (also after a ``npz:`` or
    ``imagefolder:`` style prefix), both as written and with symlinks resolved."""
    out: list[Path] = []
    for s in _strings(values):
        for cand in (s, s.partition(":")[2]):
            if not cand or len(cand) > 4096 or "\0" in cand:
                continue
            p = Path(cand).expanduser()
            try:
                if os.path.lexists(p):
                    out += [Path(os.path.abspath(p)), p.resolve()]
            except (OSError, RuntimeError, ValueError):
                continue
    return out


def command_inputs(extra: Any = None) -> list[Path]:
    """The paths that the running command reads: every option and argument value (except ``--out``)
    naming an existing path, the default data folder, and ``extra`` (e.g. the resolved config)."""
    import click

    ctx = click.get_current_context(silent=True)
    params = {k: v for k, v in (ctx.params.items() if ctx is not None else ()) if k != "out"}
    default_root = os.environ.get("NASTY_DATA_ROOT", "data")
    return input_paths([params, extra, default_root])


def check_replaceable(path: Path, inputs: Any = None) -> None:
    """What ``--force`` may delete: a folder that is recognisably a nasty run, that is neither the
    current directory nor one of its parents, and that neither is nor holds an input of this command."""
    real, plain = path.resolve(), Path(os.path.abspath(path))
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise NastyError(f"--force refused: --out {path} is the current directory or holds it")
    if path.is_symlink():
        raise NastyError(f"--force refused: --out {path} is a symbolic link; name the folder itself")
    for p in command_inputs(inputs):
        for mine in (real, plain):
            if p == mine or mine in p.parents:
                raise NastyError(f"--force refused: --out {path} {'is' if p == mine else 'holds'} {p}, an input of this command")
    if not any((path / m).exists() for m in RUN_MARKERS):
        raise NastyError(f"--force refused: {path} does not look like a nasty run (none of {', '.join(RUN_MARKERS[:4])} ...); "
                         "delete it yourself or choose another --out")


def prepare_out_dir(out: str | Path | None, force: bool, default_name: str, inputs: Any = None) -> Path:
    """The run folder: created, or an existing empty one (leftover temporary files of a killed write do
    not count), or with ``force`` an old run replaced (see :func:`check_replaceable`). The folder is
    locked against a concurrent nasty run for the rest of the command."""
    path = Path(out) if out else Path("runs") / f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    created, replaced = not os.path.lexists(path), False
    if os.path.lexists(path) and not path.is_dir():
        raise NastyError(f"--out {path} exists and is not a directory")
    if path.is_dir():
        if has_content(path):
            if not force:
                raise NastyError(f"output directory {path} is not empty; pass --force to overwrite it or choose another --out")
            check_replaceable(path, inputs)
            replaced = True
            lock_out_dir(path)  # refuses a folder that a live run is writing
            try:
                safe_io.set_aside(path)  # deleted once this command succeeds, put back if it fails
            finally:
                unlock_out_dir(path)
        elif any(path.iterdir()):  # only the leftovers of a killed write: not a reason to refuse
            lock_out_dir(path)
            clean_leftovers(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NastyError(f"cannot create output directory {path}: {e.strerror}") from None
    lock_out_dir(path)
    if has_content(path):  # another run filled it between our check and our lock
        unlock_out_dir(path)
        raise NastyError(f"output directory {path} was filled by another nasty run; choose another --out")
    if not replaced:  # a folder replaced with --force is put back instead (safe_io.settle)
        safe_io.track_fresh(path, created, {"run.json", LOCK_FILE})
    return path


def data_from_config(cfg: dict, *, normalization=None, train_subset: Any = "config", exclude_subset: int | None = None) -> DataBundle:
    d = cfg["data"]
    data = load_dataset(
        d["dataset"], d["data_root"], val_fraction=d["val_fraction"], split_seed=d["split_seed"],
        train_subset=d["train_subset"] if train_subset == "config" else train_subset,
        download=d["download"], augment=d["augment"], normalization=normalization, exclude_subset=exclude_subset,
    )
    check_model_specs(cfg, data.num_classes, data.in_channels, data.image_size)  # the real input shape, before any training
    return data


def new_model(spec: str, data: DataBundle) -> nn.Module:
    return create_model(spec, data.num_classes, data.in_channels, data.image_size)


def save_model(out_dir: Path, model: nn.Module, data: DataBundle, cfg: dict, metrics: dict, extra: dict | None = None) -> Path:
    return save_checkpoint(out_dir, model, classes=data.classes, input_shape=(data.in_channels, *data.image_size),
                           mean=data.mean, std=data.std, dataset=data.name, config=cfg, metrics=metrics, extra=extra)


def test_metrics(model: nn.Module, data: DataBundle, reference_pred=None) -> dict:
    return evaluate(model, data.x_test, data.y_test, data.num_classes, reference_pred)


def train_normal(cfg: dict, data: DataBundle, out_dir: Path, *, model_spec: str | None = None,
                 train_override: dict | None = None, log: Callable[[str], None] | None = None, desc: str = "teacher",
                 ck: Checkpointing = Checkpointing()) -> tuple[nn.Module, dict]:
    """Supervised training (CE, optional label smoothing); saves the checkpoint into ``out_dir``."""
    tcfg = train_config(cfg, train_override)
    smoothing = {**cfg["train"], **(train_override or {})}["label_smoothing"]
    seed_everything(tcfg.seed, tcfg.deterministic)  # the initial weights depend on the seed too
    model = new_model(model_spec or cfg["model"]["name"], data)
    res = fit(model, ce_objective(smoothing), data, tcfg, run_dir=out_dir, desc=desc, **({"log": log} if log else {}), **ck.fit_args())
    metrics = {"test": test_metrics(model, data), "best_epoch": res.best_epoch, "val_accuracy": res.best_val_accuracy,
               "train_seconds": res.seconds}
    save_model(out_dir, model, data, cfg, metrics)
    atomic_write_json(out_dir / "config.json", cfg)
    return model, metrics
