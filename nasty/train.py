"""The one training loop. Normal training, every defense and every attack plug an :class:`Objective` into ``fit``.

The loop's contract is the :class:`Objective`: a loss per batch, the frozen networks it consults
(:class:`nasty.frozen.Frozen`), an optional end-of-epoch hook and an optional state saved with the
training state (:mod:`nasty.resume`). The loop knows objectives, not defenses or attacks.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from . import distributed as ddp_, safe_io
from .checkpoint import save_checkpoint
from .data import Batch, DataBundle, iterate_batches
from .errors import NastyError, TrainingDiverged
from .frozen import Frozen, StepMemo
from .losses import labelled_ce
from .metrics import CHANNELS_LAST_MIN_1X1_STRIDED_IC, accuracy, channels_last_hazard, predict_logits, use_channels_last  # noqa: F401 (re-exported)
from .resume import FitState, data_fingerprint, load_fit_state, save_fit_state, state_path

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


Loss = Callable[[nn.Module, Batch, int], "tuple[torch.Tensor, dict[str, float]]"]


class Objective:
    """What :func:`fit` minimises: the training loop's whole contract with a defense or an attack.

    - ``loss(model, batch, epoch) -> (loss, {term: float})``, once per batch (``epoch`` 0-based);
    - ``frozen``: the :class:`Frozen` networks the loss consults; a training state records their
      identity (a resumed run refuses other networks) and output caches, and they move to the device;
    - ``end_of_epoch(model, epochs_done)``: called after each epoch's validation and model selection,
      before the training state is saved (e.g. a defense adapting its weight to the validation split);
    - ``state``: an object with ``resume_state() -> (tensors, json)`` and ``load_resume_state(tensors,
      json)``, saved and restored with the training state (e.g. that adapted weight).
    """

    def __init__(self, loss: Loss, frozen: Sequence[Frozen] = (), end_of_epoch: Callable[[nn.Module, int], Any] | None = None,
                 state: Any = None):
        self.loss = loss
        self.frozen = [f for f in frozen if f is not None]
        self.end_of_epoch = end_of_epoch
        self.state = state

    def __call__(self, model: nn.Module, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss(model, batch, epoch)

    @classmethod
    def of(cls, obj: "Objective | Loss") -> "Objective":
        """``obj`` itself, or a bare loss function as an objective with no frozen networks and no hooks."""
        return obj if isinstance(obj, Objective) else cls(obj)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


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



def _save_last_good(run_dir: Path, model: nn.Module, data: DataBundle, state: FitState, message: str) -> Path | None:
    """On divergence, keep the best weights so far as a loadable checkpoint in ``run_dir/last_good``."""
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
    objective: Objective | Callable
    desc: str = "train"
    eval_model: nn.Module | None = None
    run_dir: str | Path | None = None
    y_train: torch.Tensor | None = None  # this member's labels of the shared images (default: the group's)
    data: DataBundle | None = None  # whose validation split scores this member (default: the group's)
    log: Callable[[str], None] | None = None  # default: the group's
    explode: float | None = None  # stop (diverged) when an epoch's mean loss exceeds this many times the first epoch's
    late_ties: bool = False  # an epoch as accurate on validation as the best so far replaces it (a small split saturates early)
    select_from: int = 1  # the first epoch (1-based) that model selection may keep (e.g. after a labels-only warm-up)


@dataclass
class _Slot:
    """Per-member training state inside :func:`fit_group`."""

    m: Member
    obj: Objective
    data: DataBundle
    y: torch.Tensor
    eval_model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    spath: Path | None
    fingerprint: str
    st: FitState
    train_model: nn.Module
    log: Callable[[str], None] | None
    metrics_file: Any = None
    error: TrainingDiverged | None = None
    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0


def fit(
    model: nn.Module,
    objective: Objective | Callable,
    data: DataBundle,
    cfg: TrainConfig,
    *,
    eval_model: nn.Module | None = None,
    run_dir: str | Path | None = None,
    desc: str = "train",
    log: Callable[[str], None] | None = _log_default,
    x_train: torch.Tensor | None = None,
    y_train: torch.Tensor | None = None,
    save_state: bool = False,
    resume: bool = False,
    explode: float | None = None,
    late_ties: bool = False,
    select_from: int = 1,
) -> FitResult:
    """Train ``model`` on ``objective``; keep the weights of the best validation epoch.

    ``eval_model`` (default ``model``) is what validation accuracy is measured on. ``x_train`` /
    ``y_train`` replace the training split (e.g. labels from a teacher). Writes ``metrics.jsonl``
    into ``run_dir`` one line per epoch.

    Resume (see :mod:`nasty.resume`): with ``save_state`` and a ``run_dir`` the full training state
    (weights, optimizer, scheduler, every RNG incl. the batch generator, best weights so far,
    history, the objective's frozen networks' identity and output caches, the objective's own
    ``state``) is written atomically after every epoch to :func:`state_path`; with ``resume`` an
    existing state is checked against this run and training continues from it, bit-for-bit on CPU
    with ``deterministic``. A NaN/inf loss raises :class:`TrainingDiverged`; the best weights so far
    are restored into ``model`` and saved in ``run_dir/last_good``. ``explode=F``: so does an epoch whose
    mean loss exceeds ``F`` times the first epoch's with the same loss terms (in absolute value, at least
    1; a warm-up that adds terms starts anew): a loss that climbs by orders of magnitude without ever
    turning NaN/inf is a diverged run too. ``late_ties``: among
    epochs equally accurate on validation the latest is kept (a small validation split saturates
    early, long before the schedule ends). ``select_from``: epochs before it are never kept.
    """
    member = Member(model, objective, desc=desc, eval_model=eval_model, run_dir=run_dir, y_train=y_train, explode=explode,
                    late_ties=late_ties, select_from=select_from)
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
    save_state: bool = False,
    resume: bool = False,
    errors: str = "raise",
) -> list[FitResult | TrainingDiverged]:
    """Train several models in one pass over the same batches (the one training loop; :func:`fit`
    is its one-member case).

    Every member sees the same images in the same order with the same augmentation (one batch
    generator, seeded by ``cfg.seed``), so its result is the one :func:`fit` gives it alone; the
    batches are drawn once, and a frozen network that several members query on an augmented batch
    runs once for all of them (:class:`nasty.frozen.StepMemo`). Each member has its own optimizer,
    schedule, labels, validation, ``run_dir`` (metrics, resumable state) and best-epoch selection.
    ``errors="collect"``: a member whose loss turns NaN/inf stops (its :class:`TrainingDiverged` is
    returned in its place) and the others go on; ``"raise"``: it is raised. Resuming needs every
    member's state at the same epoch (otherwise all start afresh).
    """
    if not members:
        return []
    if errors not in ("raise", "collect"):
        raise ValueError(f"errors must be 'raise' or 'collect', got {errors!r}")
    ddp = ddp_.init()  # under torchrun: DDP across ranks (see nasty.distributed); otherwise off
    if ddp and len(members) > 1:
        raise NastyError("fit_group trains one model at a time under torchrun (DDP)")
    main = ddp_.is_main()
    gen = _seed(cfg, ddp)
    dev = ddp_.device()
    x = data.x_train if x_train is None else x_train
    cl = use_channels_last(x, [m.model for m in members])
    slots = [_make_slot(m, data, cfg, x, dev, cl, main, log if main else None, save_state or resume) for m in members]
    if resume:
        _resume(slots, cfg, gen)
    start = slots[0].st.epoch
    _open(slots, ddp, dev, main)
    t_start = time.perf_counter() - max(s.st.seconds for s in slots)
    steps = math.ceil(len(x) / cfg.batch_size)
    bar = tqdm(total=cfg.epochs * steps, initial=start * steps, desc=slots[0].m.desc if len(slots) == 1 else f"{len(slots)} models",
               file=sys.stderr, disable=not (main and sys.stderr.isatty()), leave=False)
    memo = StepMemo([f for s in slots for f in s.obj.frozen])
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
                with memo:
                    _step(live, batch, epoch, step, cfg, ddp, dev, cl, errors)
                bar.update(1)
            for s in live:
                if s.error is None:
                    _end_epoch(s, epoch, cfg, gen, ddp, dev, main, t0, t_start, errors)
    finally:
        bar.close()
        for s in slots:
            if s.metrics_file:
                s.metrics_file.close()
            if cl:
                s.m.model.to(memory_format=torch.contiguous_format)
            if dev.type != "cpu":  # callers evaluate on the CPU
                s.m.model.cpu()
                for f in s.obj.frozen:
                    f.to(torch.device("cpu"))
    results = [_result(s, time.perf_counter() - t_start) for s in slots]
    if ddp:
        ddp_.barrier()  # rank 0's files are complete before any rank reads them
    return results


def _seed(cfg: TrainConfig, ddp: bool) -> torch.Generator:
    """Seed every RNG; the batch generator is the same on every rank (the same global batches)."""
    seed_everything(cfg.seed, cfg.deterministic)
    gen = torch.Generator().manual_seed(cfg.seed)
    if ddp:  # the global RNG (dropout and the like) differs per rank
        random.seed(cfg.seed + ddp_.rank())
        np.random.seed((cfg.seed + ddp_.rank()) % 2**32)
        torch.manual_seed(cfg.seed + ddp_.rank())
    return gen


def _open(slots: list[_Slot], ddp: bool, dev: torch.device, main: bool) -> None:
    """Wrap the trained networks for DDP, move frozen ones to the device, open the metrics files
    (with the history of a resumed run)."""
    for s in slots:
        if ddp:
            s.train_model = ddp_.wrap(s.m.model)  # only the trained network; frozen ones are not wrapped
        for f in s.obj.frozen if dev.type != "cpu" else []:
            f.to(dev)
        if s.m.run_dir is not None:
            Path(s.m.run_dir).mkdir(parents=True, exist_ok=True)
            if main:
                history = "".join(json.dumps(row) + "\n" for row in s.st.history)
                s.metrics_file = safe_io.open_log(Path(s.m.run_dir) / "metrics.jsonl", history.encode())


def _result(s: _Slot, seconds: float) -> FitResult | TrainingDiverged:
    """The member's outcome: its error, or its best epoch with those weights restored into the model."""
    if s.error is not None:
        return s.error
    if s.st.best_state is not None:
        s.m.model.load_state_dict(s.st.best_state)
    return FitResult(s.st.best_epoch, s.st.best_val, s.st.history, seconds)


def _make_slot(m: Member, data: DataBundle, cfg: TrainConfig, x: torch.Tensor, dev: torch.device, cl: bool, main: bool,
               log: Callable[[str], None] | None, saving: bool) -> _Slot:
    y = data.y_train if m.y_train is None else m.y_train
    if len(y) != len(x):
        raise NastyError(f"{m.desc}: {len(y)} labels for {len(x)} training images")
    model = m.model
    if dev.type != "cpu":
        model.to(dev)
    if cl:  # 1.3-3x faster convolutions on CPU (docs/results.md); undone before returning
        model.to(memory_format=torch.channels_last)
    spath = state_path(m.run_dir, m.desc) if m.run_dir is not None and saving else None
    opt = make_optimizer(model.parameters(), cfg)
    return _Slot(m, Objective.of(m.objective), m.data or data, y, m.eval_model or model, opt,
                 make_scheduler(opt, cfg, math.ceil(len(x) / cfg.batch_size)), spath, data_fingerprint(x, y) if spath else "",
                 FitState(0, -1.0, -1, None, [], 0.0), model, log if m.log is None or not main else m.log)


def _stateful(s: _Slot) -> list[Any]:
    return [s.obj.state] if s.obj.state is not None else []


def _resume(slots: list[_Slot], cfg: TrainConfig, gen: torch.Generator) -> None:
    """Restore every member's saved state (all at the same epoch, or none)."""
    found = [s.spath is not None and s.spath.is_file() for s in slots]
    epochs = set()
    for s, f in zip(slots, found):
        if f:
            s.st = load_fit_state(s.spath, desc=s.m.desc, cfg=cfg, model=s.m.model, opt=s.opt, sched=s.sched, gen=gen,
                                  frozen=s.obj.frozen, fingerprint=s.fingerprint, stateful=_stateful(s))
            epochs.add(s.st.epoch)
    if len(slots) > 1 and (len(epochs) > 1 or (epochs and not all(found))):
        raise NastyError("cannot resume a group of models whose saved states are at different epochs; "
                         "resume them one at a time or start over with --force")
    for s in slots:
        if s.st.epoch and s.log:
            s.log(f"[{s.m.desc}] resuming after epoch {s.st.epoch}/{cfg.epochs} from {s.spath}")


def _stop(s: _Slot, msg: str, main: bool, errors: str) -> None:
    try:
        _diverged(s.m.model, s.data, s.m.run_dir if main else None, s.st, msg)
    except TrainingDiverged as e:
        if errors == "raise":
            raise
        s.error = e
        if s.log:
            s.log(f"[{s.m.desc}] stopped: {str(e).splitlines()[0]}")


def _step(live: list[_Slot], batch: Batch, epoch: int, step: int, cfg: TrainConfig, ddp: bool, dev: torch.device, cl: bool,
          errors: str) -> None:
    """One optimisation step of every live member on the shared batch."""
    sh = None
    xb = batch.x
    if ddp:  # this rank's shard of the global batch; its loss weighted to give the global mean
        sh = ddp_.shard(len(batch.y))
        xb = xb[sh.sl].to(dev)
    if cl:
        xb = xb.contiguous(memory_format=torch.channels_last)
    for s in live:
        if s.error is not None:
            continue
        yb = s.y[batch.idx]
        b_s = Batch(xb, yb[sh.sl].to(dev) if sh is not None else yb, batch.idx[sh.sl] if sh is not None else batch.idx, batch.augmented)
        loss, terms = s.obj(s.train_model, b_s, epoch)
        bad = not bool(torch.isfinite(loss))
        if ddp:
            bad = ddp_.any_rank(bad)  # every rank stops together (no rank left waiting in an all-reduce)
        if bad:
            detail = ", ".join(f"{k}={v:.4g}" for k, v in terms.items()) or "no loss terms reported"
            where = f" on rank {ddp_.rank()}" if ddp else ""
            _stop(s, f"{s.m.desc}: loss is {loss.item()}{where} at epoch {epoch + 1}, step {step + 1} ({detail})", ddp_.is_main(), errors)
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


def _end_epoch(s: _Slot, epoch: int, cfg: TrainConfig, gen: torch.Generator, ddp: bool, dev: torch.device, main: bool,
               t0: float, t_start: float, errors: str) -> None:
    """Validate, log, select the best epoch, run the objective's end-of-epoch hook, save the state."""
    sums, seen = s.sums, s.seen
    if ddp:  # epoch means over the global data
        keys = sorted(sums)
        tot = ddp_.all_reduce_sum(torch.tensor([float(seen)] + [sums[k] for k in keys], dtype=torch.float64))
        seen, sums = int(tot[0]), {k: float(v) for k, v in zip(keys, tot[1:])}
    if not all(bool(torch.isfinite(p).all()) for p in s.m.model.parameters()):
        _stop(s, f"{s.m.desc}: the weights became NaN/inf during epoch {epoch + 1} (losses stayed finite)", main, errors)
        return
    val_acc = _val_accuracy(s.eval_model, s.data, ddp, dev)
    row = {"epoch": epoch + 1, **{k: v / max(seen, 1) for k, v in sums.items()}, "val_accuracy": val_acc,
           "lr": s.opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
    st = s.st
    # the objective's first epoch in its current form (the same loss terms: a warm-up that adds terms starts a new phase)
    same = [h for h in st.history if set(h) == set(row) and "loss" in h]
    if s.m.explode and same and "loss" in row:
        first = same[0]["loss"]
        if row["loss"] > s.m.explode * max(abs(first), 1.0):
            _stop(s, f"{s.m.desc}: the loss exploded at epoch {epoch + 1} ({row['loss']:.4g}, more than {s.m.explode:g} times "
                     f"the first epoch's {first:.4g}) without turning NaN/inf", main, errors)
            return
    st.history.append(row)
    if s.metrics_file:
        s.metrics_file.write(json.dumps(row) + "\n")
        s.metrics_file.flush()
    if s.log:
        terms_txt = " ".join(f"{k}={v / max(seen, 1):.4f}" for k, v in sums.items())
        s.log(f"[{s.m.desc}] epoch {epoch + 1}/{cfg.epochs} {terms_txt} val_acc={val_acc:.2f}")
    better = (val_acc > st.best_val or (s.m.late_ties and val_acc == st.best_val)) and epoch + 1 >= s.m.select_from
    if cfg.select == "last" or better:
        st.best_val, st.best_epoch = val_acc, epoch + 1
        st.best_state = copy.deepcopy(s.m.model.state_dict())
    if s.obj.end_of_epoch is not None:
        try:
            s.obj.end_of_epoch(s.m.model, epoch + 1)
        except TrainingDiverged as e:
            if errors == "raise":
                raise
            s.error = e
            return
    st.epoch = epoch + 1
    st.seconds = time.perf_counter() - t_start
    if s.spath is not None and main:
        save_fit_state(s.spath, desc=s.m.desc, cfg=cfg, model=s.m.model, opt=s.opt, sched=s.sched, gen=gen,
                       frozen=s.obj.frozen, fingerprint=s.fingerprint, state=st, stateful=_stateful(s))


def _val_accuracy(eval_model: nn.Module, data: DataBundle, ddp: bool, dev: torch.device) -> float:
    """Validation accuracy; under DDP each rank scores a shard and the counts are summed."""
    if not ddp:
        return accuracy(predict_logits(eval_model, data.x_val).argmax(1), data.y_val)

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

    def loss(model: nn.Module, batch: Batch, epoch: int):
        return labelled_ce(model(batch.x), batch.y, label_smoothing), {}

    return Objective(loss)
