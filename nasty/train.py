"""The one training loop. Normal training, every defense and every attack plug a loss into ``fit``.

An *objective* is a callable ``objective(model, batch, epoch) -> (loss, {term: value})``. Frozen
networks an objective consults (the nasty teacher's adversary, a distilling student's teacher) are
wrapped in :class:`Frozen`, which runs them in eval mode under no-grad and, when the batch is not
augmented, computes each training sample's output once and reuses it in later epochs.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import hashlib
import inspect
import json
import math
import os
import random
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn

from .data import Batch, DataBundle, iterate_batches
from .errors import NastyError, TrainingDiverged
from .metrics import accuracy, predict_logits

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "multistep", "onecycle")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    seed: int = 0
    deterministic: bool = False
    select: str = "best-val"  # or "last"
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise NastyError(msg)

        if not isinstance(self.epochs, int) or self.epochs < 1:
            bad(f"epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            bad(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < math.inf:
            bad(f"lr must be a positive finite number, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            bad(f"seed must be an integer in 0..2**63-1, got {self.seed!r}")
        if not (isinstance(self.gamma, (int, float)) and 0 < self.gamma < math.inf):
            bad(f"gamma must be a positive finite number, got {self.gamma!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and 0 < self.grad_clip < math.inf):
            bad(f"grad_clip must be a positive finite number (or absent), got {self.grad_clip!r}")
        if not isinstance(self.milestones, (list, tuple)) or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.milestones):
            bad(f"milestones must be positive epoch numbers, got {self.milestones!r}")
        if not isinstance(self.deterministic, bool):
            bad(f"deterministic must be true or false, got {self.deterministic!r}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"unknown optimizer {self.optimizer!r} (choose {', '.join(OPTIMIZERS)})")
        if self.schedule not in SCHEDULES:
            bad(f"unknown schedule {self.schedule!r} (choose {', '.join(SCHEDULES)})")
        if self.select not in ("best-val", "last"):
            bad(f"select must be best-val or last, got {self.select!r}")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < math.inf) or not (
            isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1
        ):
            bad(f"weight_decay must be a finite number >= 0 and momentum in [0, 1), got {self.weight_decay!r} and {self.momentum!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, float]]: ...


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class Frozen:
    """A frozen network's outputs, cached per training index on un-augmented batches.

    ``fn`` maps an input batch to outputs (a module, or a query oracle around one). ``n`` is the
    size of the training split the batches index into; ``cache=False`` turns caching off.
    ``samples_run`` counts how many samples ``fn`` actually processed (for tests and benchmarks).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], n: int, cache: bool = True):
        if isinstance(fn, nn.Module):
            fn.eval()
            for p in fn.parameters():
                p.requires_grad_(False)
        self.fn, self.n, self.cache = fn, n, cache
        self._store: torch.Tensor | None = None
        self._filled = torch.zeros(n, dtype=torch.bool)
        self.samples_run = 0

    @classmethod
    def from_outputs(cls, outputs: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> "Frozen":
        """A frozen network whose outputs on every training index are already known (``outputs``,
        row i for training index i), e.g. computed on images while training runs on their features.
        ``fn`` answers augmented batches (none: refused)."""

        def refuse(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("precomputed outputs cannot answer augmented batches")

        f = cls(fn or refuse, len(outputs))
        f._store = outputs.detach().clone()
        f._filled[:] = True
        return f

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        memo = _STEP_MEMO.get()  # inside fit_group: answers already computed for this batch by another member
        key = None
        if memo is not None:
            share = getattr(self.fn, "share_key", None)
            key = (share() if callable(share) else ("module", id(self.fn)), id(x))
            hit = memo.get(key)
            if hit is not None and hit[0] is x:
                if hasattr(self.fn, "queries"):
                    self.fn.queries += len(x)  # still this attacker's queries
                return hit[1]
        if isinstance(self.fn, nn.Module):
            self.fn.eval()
        self.samples_run += len(x)
        out = self.fn(x)
        if key is not None:
            memo[key] = (x, out)
        return out

    def __call__(self, batch: Batch) -> torch.Tensor:
        if not self.cache or batch.augmented:
            return self.run(batch.x)
        missing = ~self._filled[batch.idx]
        if missing.any():
            out = self.run(batch.x[missing])
            if self._store is None:
                self._store = torch.zeros((self.n, *out.shape[1:]), dtype=out.dtype, device=out.device)
            self._store[batch.idx[missing]] = out
            self._filled[batch.idx[missing]] = True
        assert self._store is not None
        return self._store[batch.idx]

    def to(self, device: torch.device) -> "Frozen":
        """Move the frozen network (and the cache) to ``device`` (DDP on GPUs)."""
        module = self.fn if isinstance(self.fn, nn.Module) else getattr(self.fn, "model", None)
        if isinstance(module, nn.Module):
            module.to(device)
        if self._store is not None:
            self._store = self._store.to(device)
        return self

    def identity(self) -> str:
        """SHA-256 of the frozen network's weights and of how it is queried; a resumed run refuses
        to continue against a different network."""
        if getattr(self, "_identity", None) is None:
            module = self.fn if isinstance(self.fn, nn.Module) else getattr(self.fn, "model", None)
            h = hashlib.sha256()
            if isinstance(module, nn.Module):
                h.update(repr(getattr(module, "nasty_spec", type(module).__name__)).encode())
                for k, v in sorted(module.state_dict().items()):
                    t = v.detach().cpu().contiguous()
                    h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
                    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(f"unhashable:{type(self.fn).__module__}.{type(self.fn).__qualname__}".encode())
            for attr in ("access", "k"):
                h.update(f"{attr}={getattr(self.fn, attr, None)!r}".encode())
            post = getattr(self.fn, "post", None)
            if post is not None:
                h.update(repr(getattr(post, "describe", lambda: type(post).__qualname__)()).encode())
            self._identity = h.hexdigest()
        return self._identity

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The output cache, so that a resumed run reuses exactly the outputs the interrupted one had."""
        out = {"filled": self._filled}
        if self._store is not None:
            out["store"] = self._store
        return out

    def load_state_tensors(self, t: dict[str, torch.Tensor]) -> None:
        if "filled" in t and t["filled"].shape == self._filled.shape:
            self._filled = t["filled"].clone()
            self._store = t["store"].clone() if "store" in t else None
            if self._store is None:
                self._filled.zero_()


def find_frozen(obj: Any) -> list[Frozen]:
    """The :class:`Frozen` networks an objective consults, found by walking its closure, bound
    object and containers (a few levels deep). Used to record their identity in a training state."""
    return [o for o in _reachable(obj) if isinstance(o, Frozen)]


def find_stateful(obj: Any) -> list[Any]:
    """Objects an objective consults that carry their own training state (e.g. a defense adapting
    omega per epoch). They opt in to resume by defining ``resume_state() -> (tensors, json_dict)``
    and ``load_resume_state(tensors, json_dict)``; fit saves and restores them with the rest."""
    return [o for o in _reachable(obj) if not isinstance(o, Frozen) and callable(getattr(o, "resume_state", None))
            and callable(getattr(o, "load_resume_state", None))]


def _reachable(obj: Any, _depth: int = 0, _seen: set | None = None, _out: list | None = None) -> list[Any]:
    seen = set() if _seen is None else _seen
    out: list[Any] = [] if _out is None else _out
    if _depth > 5 or id(obj) in seen or obj is None:
        return out
    seen.add(id(obj))
    if isinstance(obj, Frozen):
        out.append(obj)
        return out
    if not isinstance(obj, type) and callable(getattr(obj, "resume_state", None)) and not inspect.ismethod(obj):
        out.append(obj)
    if isinstance(obj, (nn.Module, torch.Tensor, np.ndarray, str, bytes, int, float, bool, type)) or inspect.ismodule(obj):
        return out
    nxt = _depth + 1
    if inspect.ismethod(obj):
        _reachable(obj.__self__, nxt, seen, out)
        _reachable(obj.__func__, nxt, seen, out)
    elif isinstance(obj, functools.partial):
        for v in (obj.func, *obj.args, *obj.keywords.values()):
            _reachable(v, nxt, seen, out)
    elif inspect.isfunction(obj):
        for cell in obj.__closure__ or ():
            try:
                _reachable(cell.cell_contents, nxt, seen, out)
            except ValueError:  # empty cell
                pass
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in list(obj)[:1000]:
            _reachable(v, nxt, seen, out)
    elif isinstance(obj, dict):
        for v in list(obj.values())[:1000]:
            _reachable(v, nxt, seen, out)
    elif hasattr(obj, "__dict__"):
        for v in list(vars(obj).values())[:1000]:
            _reachable(v, nxt, seen, out)
    return out


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """A per-step schedule; multistep milestones are given in epochs."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                   cycle_momentum=cfg.optimizer == "sgd" and cfg.momentum > 0)
    if cfg.schedule == "cosine":
        f = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))  # noqa: E731
    elif cfg.schedule == "multistep":
        ms = sorted(cfg.milestones)
        f = lambda s: cfg.gamma ** sum(s // steps_per_epoch >= m for m in ms)  # noqa: E731
    else:
        f = lambda s: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


@dataclass
class FitResult:
    best_epoch: int
    best_val_accuracy: float
    history: list[dict]
    seconds: float


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# training state (resume after a kill): written atomically after every epoch, no pickle


@dataclass(frozen=True)
class Checkpointing:
    """What ``fit`` does with its run directory: write a training state after every epoch
    (``save``) and continue from an existing one (``resume``)."""

    save: bool = False
    resume: bool = False


_CHECKPOINTING: contextvars.ContextVar[Checkpointing] = contextvars.ContextVar("nasty_checkpointing", default=Checkpointing())


@contextmanager
def checkpointing(save: bool = True, resume: bool = False) -> Iterator[Checkpointing]:
    """Inside this block every :func:`fit` given a ``run_dir`` saves its training state after each
    epoch and, with ``resume``, continues an interrupted run from it. The CLI opens it around the
    training commands, so nested trainings (adversary, defended teacher, probe students) all resume."""
    token = _CHECKPOINTING.set(Checkpointing(save=save or resume, resume=resume))
    try:
        yield _CHECKPOINTING.get()
    finally:
        _CHECKPOINTING.reset(token)


def state_path(run_dir: str | Path, desc: str) -> Path:
    """Where ``fit(run_dir=..., desc=...)`` keeps its training state."""
    return Path(run_dir) / f"train_state-{re.sub(r'[^A-Za-z0-9.]+', '-', desc).strip('-') or 'train'}.safetensors"


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


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
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


def save_fit_state(path: Path, *, desc: str, cfg: TrainConfig, model: nn.Module, opt, sched, gen: torch.Generator,
                   frozen: Sequence[Frozen], fingerprint: str, state: FitState, stateful: Sequence[Any] = ()) -> None:
    from .checkpoint import save_state_file

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


def load_fit_state(path: Path, *, desc: str, cfg: TrainConfig, model: nn.Module, opt, sched, gen: torch.Generator,
                   frozen: Sequence[Frozen], fingerprint: str, stateful: Sequence[Any] = ()) -> FitState:
    """Check that the state belongs to this very run, then restore model, optimizer, scheduler,
    RNGs and frozen caches in place. Any mismatch is a one-line :class:`NastyError`."""
    from .checkpoint import load_state_file

    tensors, meta = load_state_file(path)
    where = f"cannot resume from {path}"
    hint = "pass the options of the interrupted run, or --force to start over"
    try:
        diff = _first_difference(meta["train_config"], json.loads(json.dumps(cfg.to_dict())))
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
        from .checkpoint import _signature, check_state_fits

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


def _save_last_good(run_dir: Path, model: nn.Module, data: DataBundle, state: FitState, message: str) -> Path | None:
    """On divergence, keep the best weights so far as a loadable checkpoint in ``run_dir/last_good``."""
    from .checkpoint import save_checkpoint

    if state.best_state is None or not hasattr(model, "nasty_spec"):
        return None
    save_checkpoint(run_dir / "last_good", model, classes=data.classes, input_shape=(data.in_channels, *data.image_size),
                    mean=data.mean, std=data.std, dataset=data.name,
                    metrics={"best_epoch": state.best_epoch, "val_accuracy": state.best_val},
                    extra={"diverged": message})
    return run_dir / "last_good"


@dataclass
class Member:
    """One model trained by :func:`fit_group`: its own objective, optimizer, schedule, validation
    and run folder; the batches (images, order, augmentation) are shared with the other members."""

    model: nn.Module
    objective: Objective
    desc: str = "train"
    eval_model: nn.Module | None = None
    run_dir: str | Path | None = None
    y_train: torch.Tensor | None = None  # this member's labels of the shared images (default: the group's)
    data: DataBundle | None = None  # whose validation split scores this member (default: the group's)
    frozen: Sequence[Frozen] | None = None
    log: Callable[[str], None] | None = None  # default: the group's


@dataclass
class _Slot:
    """Per-member training state inside :func:`fit_group`."""

    m: Member
    data: DataBundle
    y: torch.Tensor
    eval_model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    frozen: list[Frozen]
    stateful: list[Any]
    spath: Path | None
    fingerprint: str
    st: FitState
    train_model: nn.Module
    log: Callable[[str], None] | None
    metrics_file: Any = None
    error: TrainingDiverged | None = None
    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0


# The teacher's answers on the current (augmented) batch, shared by every member of a group that
# queries the same network on the same images: the teacher runs once per batch, not once per student.
_STEP_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("nasty_step_memo", default=None)


def fit(
    model: nn.Module,
    objective: Objective,
    data: DataBundle,
    cfg: TrainConfig,
    *,
    eval_model: nn.Module | None = None,
    run_dir: str | Path | None = None,
    desc: str = "train",
    log: Callable[[str], None] | None = _log_default,
    x_train: torch.Tensor | None = None,
    y_train: torch.Tensor | None = None,
    save_state: bool | None = None,
    resume: bool | None = None,
    frozen: Sequence[Frozen] | None = None,
) -> FitResult:
    """Train ``model`` on ``objective``; keep the weights of the best validation epoch.

    ``eval_model`` (default ``model``) is what validation accuracy is measured on. ``x_train`` /
    ``y_train`` replace the training split (e.g. labels from a teacher). Writes ``metrics.jsonl``
    into ``run_dir`` one line per epoch.

    Resume: with ``save_state`` (default: the enclosing :func:`checkpointing` block, else off) and a
    ``run_dir``, the full training state (weights, optimizer, scheduler, every RNG incl. the batch
    generator, best weights so far, history, the frozen networks' identity and output caches) is
    written atomically after every epoch to :func:`state_path`; with ``resume`` an existing state is
    checked against this run and training continues from it, bit-for-bit on CPU with
    ``deterministic``. ``frozen`` lists the :class:`Frozen` networks the objective consults (default:
    found in its closure); objects in the closure with ``resume_state``/``load_resume_state`` (see
    :func:`find_stateful`) have their own state saved and restored too. A NaN/inf loss raises
    :class:`TrainingDiverged`; the best weights so far are restored into ``model`` and saved in
    ``run_dir/last_good``.
    """
    member = Member(model, objective, desc=desc, eval_model=eval_model, run_dir=run_dir, y_train=y_train, frozen=frozen)
    out = fit_group([member], data, cfg, log=log, x_train=x_train, save_state=save_state, resume=resume)[0]
    assert isinstance(out, FitResult)
    return out


def fit_group(
    members: Sequence[Member],
    data: DataBundle,
    cfg: TrainConfig,
    *,
    log: Callable[[str], None] | None = _log_default,
    x_train: torch.Tensor | None = None,
    save_state: bool | None = None,
    resume: bool | None = None,
    errors: str = "raise",
) -> list[FitResult | TrainingDiverged]:
    """Train several models in one pass over the same batches (the one training loop; :func:`fit`
    is its one-member case).

    Every member sees the same images in the same order with the same augmentation (one batch
    generator, seeded by ``cfg.seed``), so its result is the one :func:`fit` gives it alone; the
    batches are drawn once, and a frozen teacher that several members query on an augmented batch
    runs once for all of them. Each member has its own optimizer, schedule, labels, validation,
    ``run_dir`` (metrics, resumable state) and best-epoch selection. ``errors="collect"``: a member
    whose loss turns NaN/inf stops (its :class:`TrainingDiverged` is returned in its place) and the
    others go on; ``"raise"``: it is raised. Resuming needs every member's state at the same epoch
    (otherwise all start afresh).
    """
    from tqdm import tqdm

    from . import distributed as ddp_

    if not members:
        return []
    if errors not in ("raise", "collect"):
        raise ValueError(f"errors must be 'raise' or 'collect', got {errors!r}")
    ck = _CHECKPOINTING.get()
    save_state = ck.save if save_state is None else save_state
    resume = ck.resume if resume is None else resume
    ddp = ddp_.init()  # under torchrun: DDP across ranks (see nasty.distributed); otherwise off
    if ddp and len(members) > 1:
        raise NastyError("fit_group trains one model at a time under torchrun (DDP)")
    main = ddp_.is_main()
    log = log if main else None
    seed_everything(cfg.seed, cfg.deterministic)
    gen = torch.Generator().manual_seed(cfg.seed)  # the same on every rank: the same global batches
    if ddp:  # the global RNG (dropout and the like) differs per rank
        random.seed(cfg.seed + ddp_.rank())
        np.random.seed((cfg.seed + ddp_.rank()) % 2**32)
        torch.manual_seed(cfg.seed + ddp_.rank())
    dev = ddp_.device()
    x = data.x_train if x_train is None else x_train
    steps = math.ceil(len(x) / cfg.batch_size)
    cl = use_channels_last(x, [m.model for m in members])
    slots: list[_Slot] = []
    for m in members:
        y = data.y_train if m.y_train is None else m.y_train
        if len(y) != len(x):
            raise NastyError(f"{m.desc}: {len(y)} labels for {len(x)} training images")
        model = m.model
        if dev.type != "cpu":
            model.to(dev)
        if cl:  # 1.3-3x faster convolutions on CPU (docs/results.md); undone before returning
            model.to(memory_format=torch.channels_last)
        spath = state_path(m.run_dir, m.desc) if m.run_dir is not None and (save_state or resume) else None
        opt = make_optimizer(model.parameters(), cfg)
        frozen = list(find_frozen(m.objective) if m.frozen is None else m.frozen) if spath or dev.type != "cpu" else []
        slots.append(_Slot(m, m.data or data, y, m.eval_model or model, opt, make_scheduler(opt, cfg, steps), frozen,
                           find_stateful(m.objective) if spath else [], spath, data_fingerprint(x, y) if spath else "",
                           FitState(0, -1.0, -1, None, [], 0.0), model, log if m.log is None or not main else m.log))
    if resume:
        found = [s.spath is not None and s.spath.is_file() for s in slots]
        epochs = set()
        for s, f in zip(slots, found):
            if f:
                s.st = load_fit_state(s.spath, desc=s.m.desc, cfg=cfg, model=s.m.model, opt=s.opt, sched=s.sched, gen=gen,
                                      frozen=s.frozen, fingerprint=s.fingerprint, stateful=s.stateful)
                epochs.add(s.st.epoch)
        if len(slots) > 1 and (len(epochs) > 1 or (epochs and not all(found))):
            raise NastyError("cannot resume a group of models whose saved states are at different epochs; "
                             "resume them one at a time or start over with --force")
        for s in slots:
            if s.st.epoch and s.log:
                s.log(f"[{s.m.desc}] resuming after epoch {s.st.epoch}/{cfg.epochs} from {s.spath}")
    start = slots[0].st.epoch
    for s in slots:
        if ddp:
            s.train_model = ddp_.wrap(s.m.model)  # only the trained network; frozen ones are not wrapped
        for f in s.frozen if dev.type != "cpu" else []:
            f.to(dev)
        if s.m.run_dir is not None:
            Path(s.m.run_dir).mkdir(parents=True, exist_ok=True)
            if main:
                s.metrics_file = open(Path(s.m.run_dir) / "metrics.jsonl", "w")
                for row in s.st.history:
                    s.metrics_file.write(json.dumps(row) + "\n")
                s.metrics_file.flush()
    t_start = time.perf_counter() - max(s.st.seconds for s in slots)
    bar = tqdm(total=cfg.epochs * steps, initial=start * steps, desc=slots[0].m.desc if len(slots) == 1 else f"{len(slots)} models",
               file=sys.stderr, disable=not (main and sys.stderr.isatty()), leave=False)

    def stop(s: _Slot, msg: str) -> None:
        try:
            _diverged(s.m.model, s.data, s.m.run_dir if main else None, s.st, msg)
        except TrainingDiverged as e:
            if errors == "raise":
                raise
            s.error = e
            if s.log:
                s.log(f"[{s.m.desc}] stopped: {str(e).splitlines()[0]}")

    try:
        for epoch in range(start, cfg.epochs):
            live = [s for s in slots if s.error is None]
            if not live:
                break
            t0 = time.perf_counter()
            for s in live:
                s.m.model.train()
                s.sums, s.seen = {}, 0
            for step, batch in enumerate(iterate_batches(x, live[0].y, cfg.batch_size, gen, data.augment)):
                sh = None
                xb = batch.x
                if ddp:  # this rank's shard of the global batch; its loss weighted to give the global mean
                    sh = ddp_.shard(len(batch.y))
                    xb = xb[sh.sl].to(dev)
                if cl:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                token = _STEP_MEMO.set({})
                try:
                    for s in live:
                        if s.error is not None:
                            continue
                        yb = s.y[batch.idx]
                        b_s = Batch(xb, yb[sh.sl].to(dev) if sh is not None else yb,
                                    batch.idx[sh.sl] if sh is not None else batch.idx, batch.augmented)
                        loss, terms = s.m.objective(s.train_model, b_s, epoch)
                        bad = not bool(torch.isfinite(loss))
                        if ddp:
                            bad = ddp_.any_rank(bad)  # every rank stops together (no rank left waiting in an all-reduce)
                        if bad:
                            detail = ", ".join(f"{k}={v:.4g}" for k, v in terms.items()) or "no loss terms reported"
                            where = f" on rank {ddp_.rank()}" if ddp else ""
                            stop(s, f"{s.m.desc}: loss is {loss.item()}{where} at epoch {epoch + 1}, step {step + 1} ({detail})")
                            continue
                        s.opt.zero_grad(set_to_none=True)
                        (loss * sh.weight if sh is not None else loss).backward()
                        if cfg.grad_clip:
                            nn.utils.clip_grad_norm_(s.m.model.parameters(), cfg.grad_clip)
                        s.opt.step()
                        s.sched.step()
                        n_b = len(b_s.y) if not (sh is not None and sh.empty) else 0
                        s.seen += n_b
                        for k, v in {"loss": loss.item(), **terms}.items():
                            s.sums[k] = s.sums.get(k, 0.0) + v * n_b
                finally:
                    _STEP_MEMO.reset(token)
                bar.update(1)
            for s in live:
                if s.error is not None:
                    continue
                sums, seen = s.sums, s.seen
                if ddp:  # epoch means over the global data
                    keys = sorted(sums)
                    tot = ddp_.all_reduce_sum(torch.tensor([float(seen)] + [sums[k] for k in keys], dtype=torch.float64))
                    seen, sums = int(tot[0]), {k: float(v) for k, v in zip(keys, tot[1:])}
                if not all(bool(torch.isfinite(p).all()) for p in s.m.model.parameters()):
                    stop(s, f"{s.m.desc}: the weights became NaN/inf during epoch {epoch + 1} (losses stayed finite)")
                    continue
                val_acc = _val_accuracy(s.eval_model, s.data, ddp, dev)
                row = {"epoch": epoch + 1, **{k: v / max(seen, 1) for k, v in sums.items()}, "val_accuracy": val_acc,
                       "lr": s.opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
                st = s.st
                st.history.append(row)
                if s.metrics_file:
                    s.metrics_file.write(json.dumps(row) + "\n")
                    s.metrics_file.flush()
                if s.log:
                    terms_txt = " ".join(f"{k}={v / max(seen, 1):.4f}" for k, v in sums.items())
                    s.log(f"[{s.m.desc}] epoch {epoch + 1}/{cfg.epochs} {terms_txt} val_acc={val_acc:.2f}")
                if cfg.select == "last" or val_acc > st.best_val:
                    st.best_val, st.best_epoch = val_acc, epoch + 1
                    st.best_state = copy.deepcopy(s.m.model.state_dict())
                st.epoch = epoch + 1
                st.seconds = time.perf_counter() - t_start
                if s.spath is not None and main:
                    save_fit_state(s.spath, desc=s.m.desc, cfg=cfg, model=s.m.model, opt=s.opt, sched=s.sched, gen=gen,
                                   frozen=s.frozen, fingerprint=s.fingerprint, state=st, stateful=s.stateful)
    finally:
        bar.close()
        for s in slots:
            if s.metrics_file:
                s.metrics_file.close()
            if cl:
                s.m.model.to(memory_format=torch.contiguous_format)
            if dev.type != "cpu":  # callers evaluate on the CPU
                s.m.model.cpu()
                for f in s.frozen:
                    f.to(torch.device("cpu"))
    results: list[FitResult | TrainingDiverged] = []
    seconds = time.perf_counter() - t_start
    for s in slots:
        if s.error is not None:
            results.append(s.error)
            continue
        if s.st.best_state is not None:
            s.m.model.load_state_dict(s.st.best_state)
        results.append(FitResult(s.st.best_epoch, s.st.best_val, s.st.history, seconds))
    if ddp:
        ddp_.barrier()  # rank 0's files are complete before any rank reads them
    return results


def use_channels_last(x: torch.Tensor, models: Sequence[nn.Module] = ()) -> bool:
    """Train convolutional models on image batches in channels-last layout where that is known to be
    safe (the environment variable ``NASTY_CHANNELS_LAST=0`` turns it off everywhere). Only the
    memory layout changes: the results agree with the default layout up to float rounding.

    Not safe: a model with a strided 1x1 convolution of fewer than 16 input channels per group
    (:func:`channels_last_hazard`). oneDNN computes its weight gradient in channels-last with the
    ``jit_1x1`` backward-weights kernel, whose reduce-to-unit-stride workspace is sized for the
    input channels but written in blocks of 8 (AVX2) or 16 (AVX-512) channels: a heap overrun
    ("corrupted size vs. prev_size", e.g. resnet20:width=0.25 on digits, one thread), or silently
    corrupted memory. Such models train in the default layout (NCHW), which uses another kernel."""
    if x.dim() != 4 or os.environ.get("NASTY_CHANNELS_LAST", "1") == "0":
        return False
    return not any(channels_last_hazard(m) for m in models)


CHANNELS_LAST_MIN_1X1_STRIDED_IC = 16  # the channel block of the AVX-512 kernel (AVX2: 8)


def channels_last_hazard(model: nn.Module) -> str | None:
    """The first convolution of ``model`` that channels-last training may corrupt memory in (see
    :func:`use_channels_last`), described, or ``None``."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and tuple(mod.kernel_size) == (1, 1) and max(mod.stride) > 1 \
                and mod.in_channels // mod.groups < CHANNELS_LAST_MIN_1X1_STRIDED_IC:
            return f"{name}: 1x1 convolution, stride {tuple(mod.stride)}, {mod.in_channels // mod.groups} input channels per group"
    return None


def _val_accuracy(eval_model: nn.Module, data: DataBundle, ddp: bool, dev: torch.device) -> float:
    """Validation accuracy; under DDP each rank scores a shard and the counts are summed."""
    if not ddp:
        return accuracy(predict_logits(eval_model, data.x_val).argmax(1), data.y_val)
    from . import distributed as ddp_

    sh = ddp_.shard(len(data.y_val))
    correct = 0.0
    if not sh.empty and len(data.y_val):
        pred = predict_logits(eval_model, data.x_val[sh.sl].to(dev)).argmax(1).cpu()
        correct = float((pred == data.y_val[sh.sl]).sum())
    n = len(data.y_val)
    total = float(ddp_.all_reduce_sum(torch.tensor([correct], dtype=torch.float64))[0])
    # the same float32 arithmetic as metrics.accuracy, so ranks and a single process agree exactly
    return float(100.0 * (torch.tensor(total, dtype=torch.float32) / n)) if n else float("nan")


def _diverged(model: nn.Module, data: DataBundle, run_dir: str | Path | None, st: FitState, msg: str) -> None:
    """Restore the best weights so far, keep them on disk, raise a one-line :class:`TrainingDiverged`."""
    if st.best_state is not None:
        model.load_state_dict(st.best_state)
    saved = _save_last_good(Path(run_dir), model, data, st, msg) if run_dir is not None else None
    if saved is not None:
        kept = f"the best weights so far (epoch {st.best_epoch}) are kept in {saved}"
    elif st.best_state is not None:
        kept = f"the best weights so far (epoch {st.best_epoch}) are restored"
    else:
        kept = "no epoch completed, nothing to keep"
    raise TrainingDiverged(f"{msg}; {kept}; lower the learning rate or the defense strength")


def ce_objective(label_smoothing: float = 0.0) -> Objective:
    """Plain supervised training (optionally with label smoothing)."""

    def objective(model: nn.Module, batch: Batch, epoch: int):
        loss = nn.functional.cross_entropy(model(batch.x), batch.y, label_smoothing=label_smoothing)
        return loss, {}

    return objective
