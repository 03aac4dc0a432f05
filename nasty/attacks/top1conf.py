"""Top-1 + confidence thief: uses only the served top class and its probability ``q``, as an API
that returns ``(label, score)`` would. The soft target is ``q`` on the top class and
``(1 - q) / (C - 1)`` on every other, then Hinton KD at temperature ``T``. It ignores whatever a
defense hides in the ranking of the other classes; against a decision-locked teacher it measures
what the served confidence alone still gives. Threat model: top-1 label and its score, plus labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import kd_loss
from ..train import Objective
from .base import TUNE, Attack, check_temperature_alpha, register_attack, served_probs


def top1_confidence_target(z: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the two-level distribution built from each row's top class and its probability."""
    return top1_confidence_from_probs(F.softmax(z, dim=1))


def top1_confidence_from_probs(p: torch.Tensor) -> torch.Tensor:
    """The same target from served probabilities ``p`` (a top-k answer's are not renormalised: the served
    top-1 probability is read as served, not as 1)."""
    q, top = p.max(1)
    c = p.shape[1]
    rest = ((1 - q) / (c - 1)).clamp_min(1e-12)
    target = rest[:, None].expand(-1, c).clone()
    target.scatter_(1, top[:, None], q[:, None])
    return torch.log(target)


@register_attack
class Top1Confidence(Attack):
    name = "top1-confidence"
    summary = "KD on a target built from the served top-1 class and its probability only"
    accepts = ("weights", "logits", "probs", "topk")
    params = {"temperature": 4.0, "alpha": 0.9, "tune": TUNE}

    def validate(self):
        check_temperature_alpha(self.p)

    def objective(self, ctx, student):
        teacher = ctx.frozen_teacher()
        T, a = self.p["temperature"], self.p["alpha"]

        log_probs = ctx.teacher.serves_log_probs

        def loss(model, batch, epoch):
            return kd_loss(model(batch.x), top1_confidence_from_probs(served_probs(teacher(batch), log_probs)), batch.y, T, a)

        return Objective(loss, frozen=[teacher])
