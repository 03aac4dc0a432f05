"""Resuming an interrupted training: the state :func:`nasty.train.fit` writes after every epoch.

The state is one safetensors file (weights, best weights so far, optimizer, scheduler, every RNG incl.
the batch generator, the frozen networks' identity and output caches, the objective's own state) plus
JSON metadata, written atomically; no pickle. A run resumes only from a state of the very same run:
same training options, model, data and frozen networks, else a one-line :class:`NastyError`.
Whether a command saves or resumes is a :class:`Checkpointing` value passed down as an argument.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import _signature, check_state_fits, load_state_file, save_state_file
from .errors import NastyError
from .frozen import Frozen
from .registry import slug


@dataclass(frozen=True)
class Checkpointing:
    """What ``fit`` does with its run directory: write a training state after every epoch
    (``save``) and continue from an existing one (``resume``)."""

    save: bool = False
    resume: bool = False


    def fit_args(self) -> dict[str, bool]:
        """The keyword arguments of :func:`nasty.train.fit` that apply this policy."""
        return {"save_state": self.save or self.resume, "resume": self.resume}


def state_path(run_dir: str | Path, desc: str) -> Path:
    """Where ``fit(run_dir=..., desc=...)`` keeps its training state."""
    return Path(run_dir) / f"train_state-{slug(desc, 'train')}.safetensors"


def data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """A cheap fingerprint of the training split (all labels, a strided sample of the images)."""
    h = hashlib.sha256(f"{tuple(x.shape)}|{x.dtype}|{tuple(y.shape)}|{y.dtype}".encode())
    h.update(y.detach().cpu().contiguous().numpy().tobytes())
    flat = x.detach().reshape(-1)
    h.update(flat[:: max(1, flat.numel() // 65536)].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rng_state(gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng/torch": torch.get_rng_state(), "rng/batches": gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, t in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = t
    npst = np.random.get_state()
    meta = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    return tensors, meta


def _set_rng_state(gen: torch.Generator, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    gen.set_state(tensors["rng/batches"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    v, st, g = meta["python"]
    random.setstate((v, tuple(st), g))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _split_optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, values = {}, {}
    for idx, st in sd["state"].items():
        values[str(idx)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{idx}/{k}"] = v
            else:
                values[str(idx)][k] = v
    return tensors, {"param_groups": sd["param_groups"], "values": values}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["values"].items()}
    for k, t in tensors.items():
        if k.startswith("optim/"):
            _, idx, name = k.split("/", 2)
            state.setdefault(int(idx), {})[name] = t
    groups = [{k: tuple(v) if k == "betas" and isinstance(v, list) else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return None if a == b else f"{path or 'value'} was {a!r}, now {b!r}"


@dataclass
class FitState:
    """Everything ``fit`` needs to continue after a completed epoch."""

    epoch: int
    best_val: float
    best_epoch: int
    best_state: dict[str, torch.Tensor] | None
    history: list[dict]
    seconds: float


def save_fit_state(path: Path, *, desc: str, cfg: Any, model: nn.Module, opt, sched, gen: torch.Generator,
                   frozen: Sequence[Frozen], fingerprint: str, state: FitState, stateful: Sequence[Any] = ()) -> None:
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    if state.best_state is not None:
        tensors.update({f"best/{k}": v for k, v in state.best_state.items()})
    opt_t, opt_meta = _split_optimizer_state(opt)
    tensors.update(opt_t)
    rng_t, rng_meta = _rng_state(gen)
    tensors.update(rng_t)
    for i, f in enumerate(frozen):
        tensors.update({f"frozen/{i}/{k}": v for k, v in f.state_tensors().items()})
    extra_meta = []
    for i, o in enumerate(stateful):
        t, m = o.resume_state()
        tensors.update({f"objective/{i}/{k}": v for k, v in t.items()})
        extra_meta.append({"type": type(o).__qualname__, "state": m})
    meta = {
        "desc": desc,
        "epoch": state.epoch,
        "epochs": cfg.epochs,
        "complete": state.epoch >= cfg.epochs,
        "train_config": cfg.to_dict(),
        "model": getattr(model, "nasty_spec", type(model).__name__),
        "data": fingerprint,
        "frozen": [f.identity() for f in frozen],
        "frozen_samples_run": [f.samples_run for f in frozen],
        "objective_state": extra_meta,
        "optimizer": opt_meta,
        "scheduler": sched.state_dict(),
        "rng": rng_meta,
        "best_val_accuracy": state.best_val,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "seconds": state.seconds,
    }
    save_state_file(path, tensors, meta)


def load_fit_state(path: Path, *, desc: str, cfg: Any, model: nn.Module, opt, sched, gen: torch.Generator,
                   frozen: Sequence[Frozen], fingerprint: str, stateful: Sequence[Any] = ()) -> FitState:
    """Check that the state belongs to this very run, then restore model, optimizer, scheduler,
    RNGs and frozen caches in place. Any mismatch is a one-line :class:`NastyError`."""
    tensors, meta = load_state_file(path)
    where = f"cannot resume from {path}"
    hint = "pass the options of the interrupted run, or --force to start over"
    try:
        diff = first_difference(meta["train_config"], json.loads(json.dumps(cfg.to_dict())))
        if diff:
            raise NastyError(f"{where}: training option {diff}; {hint}")
        spec = getattr(model, "nasty_spec", type(model).__name__)
        if meta["model"] != json.loads(json.dumps(spec)):
            raise NastyError(f"{where}: model was {meta['model']!r}, now {spec!r}; {hint}")
        if meta["desc"] != desc:
            raise NastyError(f"{where}: it belongs to {meta['desc']!r}, not {desc!r}")
        if meta["data"] != fingerprint:
            raise NastyError(f"{where}: the training data differ (dataset, subset, split or normalisation changed); {hint}")
        ids = [f.identity() for f in frozen]
        if meta["frozen"] != ids:
            raise NastyError(f"{where}: the frozen networks (adversary/teacher) differ from the interrupted run's "
                             f"({len(meta['frozen'])} then, {len(ids)} now, or different weights); {hint}")
        model_t = _prefixed("model/", tensors)
        check_state_fits(_signature(model.state_dict()), _signature(model_t), str(path), str(spec))
        model.load_state_dict(model_t, strict=True)
        opt.load_state_dict(_join_optimizer_state(tensors, meta["optimizer"]))
        sched.load_state_dict(meta["scheduler"])
        _set_rng_state(gen, tensors, meta["rng"])
        for i, f in enumerate(frozen):
            f.load_state_tensors(_prefixed(f"frozen/{i}/", tensors))
            f.samples_run = meta["frozen_samples_run"][i]
        saved = meta.get("objective_state", [])
        if [m["type"] for m in saved] != [type(o).__qualname__ for o in stateful]:
            raise NastyError(f"{where}: the objective's stateful parts differ from the interrupted run's; {hint}")
        for i, (o, m) in enumerate(zip(stateful, saved)):
            o.load_resume_state(_prefixed(f"objective/{i}/", tensors), m["state"])
        best = _prefixed("best/", tensors) or None
        return FitState(int(meta["epoch"]), float(meta["best_val_accuracy"]), int(meta["best_epoch"]), best,
                        list(meta["history"]), float(meta["seconds"]))
    except NastyError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise NastyError(f"{where}: damaged training state ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
