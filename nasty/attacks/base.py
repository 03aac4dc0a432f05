"""What every attack shares: the teacher's query interface (``Oracle``), the attacker's resources,
and the ``Attack`` base class that declares what an attack needs and trains a student.

Threat model: an attack states which teacher *access* it can work with (``logits``, ``probs``,
``topk:K``, ``label``, ``weights``) and whether it needs ground-truth labels. ``run_attack``
refuses to run it otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import DataBundle
from ..errors import NastyError
from ..train import Frozen, TrainConfig

ACCESS_LEVELS = ("weights", "logits", "probs", "topk", "label")  # most to least revealing


def parse_access(query: str) -> tuple[str, int | None]:
    """``"topk:3"`` -> ``("topk", 3)``; validates the name."""
    name, _, k = query.partition(":")
    if name not in ACCESS_LEVELS:
        raise NastyError(f"unknown --query {query!r} (choose logits, probs, topk:K, label or weights)")
    if name == "topk":
        if not k.isdigit() or int(k) < 1:
            raise NastyError(f"--query topk needs a positive K, e.g. topk:2 (got {query!r})")
        return name, int(k)
    if k:
        raise NastyError(f"--query {name} takes no argument (got {query!r})")
    return name, None


class Oracle:
    """The teacher as the attacker sees it. Returns *logit-like* scores: raw logits for
    ``logits``/``weights``; ``log p`` for ``probs`` (logits up to a constant, so any temperature can
    be re-applied); ``log p`` of the top-K with ``-inf`` elsewhere for ``topk``; 0/-inf one-hot for
    ``label``. ``post`` is an output defense applied to the teacher's probabilities first.
    Counts the queries it answers."""

    def __init__(self, model: nn.Module, query: str = "logits",
                 post: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model = model.eval()
        self.access, self.k = parse_access(query)
        self.post = post
        self.queries = 0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.queries += len(x)
        z = self.model(x)
        if self.post is None and self.access in ("logits", "weights"):
            return z
        p = F.softmax(z, dim=1)
        if self.post is not None:
            p = self.post(p)
        if self.access == "topk":
            k = min(self.k or 1, p.shape[1])
            top = p.topk(k, dim=1)
            p = torch.zeros_like(p).scatter_(1, top.indices, top.values)
        elif self.access == "label":
            p = F.one_hot(p.argmax(1), p.shape[1]).to(p.dtype)
        return torch.log(p.clamp_min(0))  # log 0 = -inf marks classes the oracle did not reveal

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(1)


@dataclass
class AttackContext:
    """Everything an attack may use. ``teachers`` are oracles (several for ``ensemble``)."""

    data: DataBundle  # the attacker's data (train/val) and the test split for scoring
    teachers: list[Oracle]
    student: str
    train: TrainConfig
    params: dict[str, Any]
    run_dir: Any = None
    log: Callable[[str], None] | None = None
    labels_available: bool = True
    cache_teacher: bool = True
    x_train: torch.Tensor | None = None  # query images when they are not the labelled split (surrogate data)
    info: dict = field(default_factory=dict)

    @property
    def teacher(self) -> Oracle:
        return self.teachers[0]

    def frozen_teacher(self, oracle: Oracle | None = None, n: int | None = None) -> Frozen:
        x = self.x_train if self.x_train is not None else self.data.x_train
        return Frozen(oracle or self.teacher, n or len(x), cache=self.cache_teacher)


class Attack:
    """Base class. Subclasses set the class attributes and implement :meth:`objective`, or override
    :meth:`train` for attacks that do more than plug a loss into the one training loop."""

    name: ClassVar[str]
    summary: ClassVar[str]
    accepts: ClassVar[tuple[str, ...]] = ("weights", "logits", "probs", "topk")
    needs_labels: ClassVar[bool] = True  # refuses to run without ground-truth labels
    uses_labels: ClassVar[bool] = True  # reads them when present (False: teacher outputs only)
    needs_teacher: ClassVar[bool] = True
    params: ClassVar[dict[str, Any]] = {}  # name -> default

    def __init__(self, **params: Any):
        unknown = set(params) - set(self.params)
        if unknown:
            import difflib

            key = sorted(unknown)[0]
            close = difflib.get_close_matches(key, list(self.params), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise NastyError(f"attack {self.name} has no parameter {key!r}{hint} (parameters: {', '.join(self.params) or 'none'})")
        self.p = {**self.params, **params}
        self.validate()

    def validate(self) -> None:
        """Raise :class:`NastyError` for out-of-range parameters."""

    def objective(self, ctx: AttackContext, student: nn.Module):
        raise NotImplementedError

    def build_student(self, ctx: AttackContext) -> nn.Module:
        from ..models import create_model

        d = ctx.data
        return create_model(ctx.student, d.num_classes, d.in_channels, d.image_size)

    def train(self, ctx: AttackContext) -> tuple[nn.Module, dict]:
        """Train and return the student (the module evaluated on the test split) and extra results."""
        from ..train import fit

        student = self.build_student(ctx)
        res = fit(student, self.objective(ctx, student), ctx.data, ctx.train, run_dir=ctx.run_dir,
                  desc=f"{self.name}:{ctx.student}", x_train=ctx.x_train, **({"log": ctx.log} if ctx.log else {}))
        return student, {"best_epoch": res.best_epoch, "val_accuracy": res.best_val_accuracy}


def check_temperature_alpha(p: dict) -> None:
    if not p["temperature"] > 0:
        raise NastyError(f"temperature must be positive, got {p['temperature']}")
    if not 0 <= p["alpha"] <= 1:
        raise NastyError(f"alpha must be in [0, 1], got {p['alpha']}")
