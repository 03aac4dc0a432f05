"""Distillation-time augmentation for soft-label attacks: mixup (Zhang et al., ICLR 2018) and
CutMix (Yun et al., ICCV 2019).

The student *and the teacher* see the mixed batch: the teacher is queried on the mixed images (a
mixed batch is marked ``augmented`` so :class:`nasty.train.Frozen` does not serve cached outputs of
the clean images). The label term becomes ``lam * CE(z, y) + (1 - lam) * CE(z, y2)``. The mixing
coefficient is drawn per batch from ``Beta(alpha, alpha)`` (default ``alpha = 1``; write
``mixup:0.2`` for another); CutMix then sets ``lam`` to the kept area exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..losses import labelled_ce

from ..data import Batch
from ..errors import NastyError
from ..registry import did_you_mean

AUGMENTS = ("none", "mixup", "cutmix")


def parse_augment(spec: str | None) -> tuple[str, float]:
    """``"mixup:0.4"`` -> ``("mixup", 0.4)``; ``None``/``"none"`` -> ``("none", 0.0)``."""
    name, _, a = (spec or "none").partition(":")
    if name not in AUGMENTS:
        raise NastyError(f"unknown --augment {spec!r}{did_you_mean(name, AUGMENTS)} (choose none, mixup or cutmix, optionally with :ALPHA)")
    if name == "none":
        if a:
            raise NastyError("--augment none takes no argument")
        return name, 0.0
    try:
        alpha = float(a) if a else 1.0
    except ValueError:
        raise NastyError(f"--augment {spec!r}: ALPHA must be a number") from None
    if not alpha > 0:
        raise NastyError(f"--augment {spec!r}: ALPHA must be positive")
    return name, alpha


@dataclass
class Mixed:
    """A (possibly) mixed batch: ``batch.x`` is what student and teacher see; sample i is
    ``lam`` parts class ``batch.y[i]`` and ``1 - lam`` parts class ``y2[i]``."""

    batch: Batch
    y2: torch.Tensor
    lam: float

    @property
    def x(self) -> torch.Tensor:
        return self.batch.x

    @property
    def y(self) -> torch.Tensor:
        return self.batch.y


def mixup(x: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * x + (1 - lam) * x[perm]


def cutmix(x: torch.Tensor, perm: torch.Tensor, lam: float, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    """Paste a box of ``x[perm]`` covering about ``1 - lam`` of the image; returns the exact kept fraction."""
    h, w = x.shape[-2:]
    cut = np.sqrt(1.0 - lam)
    ch, cw = int(round(h * cut)), int(round(w * cut))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - ch // 2, 0), min(cy + (ch - ch // 2), h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + (cw - cw // 2), w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


class Mixer:
    """Per-batch mixing with its own seeded generators (the training loop's random stream is untouched)."""

    def __init__(self, spec: str | None, seed: int = 0):
        self.kind, self.alpha = parse_augment(spec)
        self.gen = torch.Generator().manual_seed(seed + 7919)
        self.rng = np.random.default_rng(seed + 7919)

    @property
    def active(self) -> bool:
        return self.kind != "none"

    @staticmethod
    def identity(batch: Batch) -> Mixed:
        return Mixed(batch, batch.y, 1.0)

    def __call__(self, batch: Batch) -> Mixed:
        if not self.active or len(batch.y) < 2:
            return Mixed(batch, batch.y, 1.0)
        perm = torch.randperm(len(batch.y), generator=self.gen)
        lam = float(self.rng.beta(self.alpha, self.alpha))
        if self.kind == "mixup":
            x = mixup(batch.x, perm, lam)
        else:
            x, lam = cutmix(batch.x, perm, lam, self.rng)
        return Mixed(Batch(x, batch.y, batch.idx, augmented=True), batch.y[perm], lam)


def mixed_ce(logits: torch.Tensor, m: Mixed, reduction: str = "mean") -> torch.Tensor:
    """``lam * CE(z, y) + (1 - lam) * CE(z, y2)`` (plain CE when the batch is not mixed)."""
    if m.lam == 1.0 and reduction == "mean":
        return labelled_ce(logits, m.y)  # a thief's unlabelled queries (y = -1) add nothing
    ce = F.cross_entropy(logits, m.y, reduction=reduction, ignore_index=-1)
    if m.lam == 1.0:
        return ce
    return m.lam * ce + (1 - m.lam) * F.cross_entropy(logits, m.y2, reduction=reduction)
