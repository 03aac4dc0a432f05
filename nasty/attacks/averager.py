"""Averager student (Keser & Toreyin, ICLR 2023 Tiny Papers, "Averager Student: Distillation from
Undistillable Teacher"): replace each sample's teacher output by the mean teacher output of its
class within the mini-batch, then distil as Hinton KD. Averaging washes out the per-sample
misleading structure a nasty teacher puts into its soft outputs and keeps the class-level part.

What is averaged is a parameter (``average``): ``probs`` (default) averages the tempered
probabilities ``sigma_T(z_T)``; ``logits`` averages raw logits (needs logits or weights access,
since top-k/label oracles hide classes as ``-inf``). Which of the two the paper averages is
unverified.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import NastyError
from ..losses import kd_loss
from ..train import Objective
from .base import TUNE, Attack, check_temperature_alpha, register_attack


def class_mean_targets(teacher_logits: torch.Tensor, y: torch.Tensor, temperature: float, average: str = "probs") -> torch.Tensor:
    """Teacher logits with each row replaced by its class's batch mean.

    ``probs``: returns ``T * log(mean_{j: y_j = y_i} sigma_T(z_j))``, logits whose tempered softmax is
    exactly the class-mean distribution. ``logits``: the class-mean logits.
    """
    onehot = F.one_hot(y, teacher_logits.shape[1]).to(teacher_logits.dtype)  # (B, C)
    counts = onehot.sum(0).clamp_min(1)
    if average == "logits":
        if not torch.isfinite(teacher_logits).all():
            raise NastyError("averager average=logits needs finite logits (use --query logits or weights, or average=probs)")
        return ((onehot.T @ teacher_logits) / counts[:, None])[y]
    p = F.softmax(teacher_logits / temperature, dim=1)
    mean = (onehot.T @ p) / counts[:, None]
    return temperature * torch.log(mean[y])


@register_attack
class Averager(Attack):
    name = "averager"
    summary = "KD on the class-mean teacher output within each batch (Keser & Toreyin 2023)"
    accepts = ("weights", "logits", "probs", "topk")
    params = {"temperature": 4.0, "alpha": 0.9, "average": "probs", "tune": TUNE}

    def validate(self):
        check_temperature_alpha(self.p)
        if self.p["average"] not in ("probs", "logits"):
            raise NastyError(f"averager average must be probs or logits, got {self.p['average']!r}")

    def objective(self, ctx, student):
        teacher = ctx.frozen_teacher()
        T, a, avg = self.p["temperature"], self.p["alpha"], self.p["average"]

        def loss(model, batch, epoch):
            z = teacher(batch)
            y = batch.y if not bool((batch.y < 0).any()) else torch.where(batch.y >= 0, batch.y, z.argmax(1))  # a query's class: the decision
            target = class_mean_targets(z, y, T, avg)
            return kd_loss(model(batch.x), target, batch.y, T, a)

        return Objective(loss, frozen=[teacher])
