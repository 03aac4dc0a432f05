"""The one training loop. Normal training, every defense and every attack plug a loss into ``fit``.

An *objective* is a callable ``objective(model, batch, epoch) -> (loss, {term: value})``. Frozen
networks an objective consults (the nasty teacher's adversary, a distilling student's teacher) are
wrapped in :class:`Frozen`, which runs them in eval mode under no-grad and, when the batch is not
augmented, computes each training sample's output once and reuses it in later epochs.
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

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
        if not self.lr > 0:
            bad(f"lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"unknown optimizer {self.optimizer!r} (choose {', '.join(OPTIMIZERS)})")
        if self.schedule not in SCHEDULES:
            bad(f"unknown schedule {self.schedule!r} (choose {', '.join(SCHEDULES)})")
        if self.select not in ("best-val", "last"):
            bad(f"select must be best-val or last, got {self.select!r}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            bad("weight_decay must be >= 0 and momentum in [0, 1)")

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

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.fn, nn.Module):
            self.fn.eval()
        self.samples_run += len(x)
        return self.fn(x)

    def __call__(self, batch: Batch) -> torch.Tensor:
        if not self.cache or batch.augmented:
            return self.run(batch.x)
        missing = ~self._filled[batch.idx]
        if missing.any():
            out = self.run(batch.x[missing])
            if self._store is None:
                self._store = torch.zeros((self.n, *out.shape[1:]), dtype=out.dtype)
            self._store[batch.idx[missing]] = out
            self._filled[batch.idx[missing]] = True
        assert self._store is not None
        return self._store[batch.idx]


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
) -> FitResult:
    """Train ``model`` on ``objective``; keep the weights of the best validation epoch.

    ``eval_model`` (default ``model``) is what validation accuracy is measured on. ``x_train`` /
    ``y_train`` replace the training split (e.g. labels from a teacher). Writes ``metrics.jsonl``
    into ``run_dir`` one line per epoch.
    """
    from tqdm import tqdm

    seed_everything(cfg.seed, cfg.deterministic)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = data.x_train if x_train is None else x_train
    y = data.y_train if y_train is None else y_train
    eval_model = eval_model or model
    steps = math.ceil(len(y) / cfg.batch_size)
    opt = make_optimizer(model.parameters(), cfg)
    sched = make_scheduler(opt, cfg, steps)
    metrics_file = None
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        metrics_file = open(Path(run_dir) / "metrics.jsonl", "w")
    best_val, best_epoch, best_state = -1.0, -1, None
    history: list[dict] = []
    t_start = time.perf_counter()
    bar = tqdm(total=cfg.epochs * steps, desc=desc, file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)
    try:
        for epoch in range(cfg.epochs):
            model.train()
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            seen = 0
            for step, batch in enumerate(iterate_batches(x, y, cfg.batch_size, gen, data.augment)):
                loss, terms = objective(model, batch, epoch)
                if not torch.isfinite(loss):
                    if best_state is not None:
                        model.load_state_dict(best_state)
                    detail = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
                    raise TrainingDiverged(
                        f"{desc}: loss is {float(loss)} at epoch {epoch + 1}, step {step + 1} ({detail}); "
                        "the last good checkpoint is kept; lower the learning rate or the defense strength"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                b = len(batch.y)
                seen += b
                for k, v in {"loss": float(loss), **terms}.items():
                    sums[k] = sums.get(k, 0.0) + v * b
                bar.update(1)
            val_acc = accuracy(predict_logits(eval_model, data.x_val).argmax(1), data.y_val)
            row = {"epoch": epoch + 1, **{k: v / max(seen, 1) for k, v in sums.items()}, "val_accuracy": val_acc,
                   "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            history.append(row)
            if metrics_file:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if log:
                terms_txt = " ".join(f"{k}={v / max(seen, 1):.4f}" for k, v in sums.items())
                log(f"[{desc}] epoch {epoch + 1}/{cfg.epochs} {terms_txt} val_acc={val_acc:.2f}")
            if cfg.select == "last" or val_acc > best_val:
                best_val, best_epoch = val_acc, epoch + 1
                best_state = copy.deepcopy(model.state_dict())
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(best_epoch, best_val, history, time.perf_counter() - t_start)


def ce_objective(label_smoothing: float = 0.0) -> Objective:
    """Plain supervised training (optionally with label smoothing)."""

    def objective(model: nn.Module, batch: Batch, epoch: int):
        loss = nn.functional.cross_entropy(model(batch.x), batch.y, label_smoothing=label_smoothing)
        return loss, {}

    return objective
