"""Distillation from an ensemble (e.g. Hinton et al. 2015; You et al., KDD 2017): the student learns
the average of several teachers' outputs (``--teacher`` repeated), so one defended member's
misleading soft outputs are diluted by the others.

``combine = probs`` (default) averages the tempered probabilities ``sigma_T(z_k)``; ``logits``
averages raw logits (needs logits or weights access). Each teacher is queried once per training
image (outputs cached on un-augmented batches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import NastyError
from ..train import Objective
from .base import Attack, check_temperature_alpha, register_attack
from .kd import distill_loss


def ensemble_targets(teacher_logits: list[torch.Tensor], temperature: float, combine: str = "probs") -> torch.Tensor:
    """Logits whose tempered softmax is the mean of the teachers' (``probs``), or the mean logits (``logits``)."""
    z = torch.stack(teacher_logits)
    if combine == "logits":
        if not torch.isfinite(z).all():
            raise NastyError("ensemble combine=logits needs finite logits (use --query logits or weights, or combine=probs)")
        return z.mean(0)
    return temperature * torch.log(F.softmax(z / temperature, dim=2).mean(0))


@register_attack
class Ensemble(Attack):
    name = "ensemble"
    summary = "KD from the average output of several teachers (--teacher repeated)"
    accepts = ("weights", "logits", "probs", "topk")
    needs_labels = False
    min_teachers = 2
    max_teachers = None
    supports_augment = True
    params = {"temperature": 4.0, "alpha": 0.9, "combine": "probs"}

    def validate(self):
        check_temperature_alpha(self.p)
        if self.p["combine"] not in ("probs", "logits"):
            raise NastyError(f"ensemble combine must be probs or logits, got {self.p['combine']!r}")

    def objective(self, ctx, student):
        teachers = [ctx.frozen_teacher(o) for o in ctx.teachers]
        mix = ctx.mixer()
        T, a, how = self.p["temperature"], self.p["alpha"], self.p["combine"]
        labels = ctx.labels_available

        def loss(model, batch, epoch):
            m = mix(batch)
            target = ensemble_targets([t(m.batch) for t in teachers], T, how)
            return distill_loss(model(m.x), target, m, T, a, labels)

        return Objective(loss, frozen=teachers)
