"""Set-uniform thief: reads the served top class, its probability ``q`` and the *set* of runner-up classes,
never their order (the runner-up set as dark knowledge, after Hinton et al. 2015; rank-agnostic against
defenses that reorder the served ranks). The soft target is ``q`` on the top class and ``1 - q`` spread
evenly over the served ranks ``2..k`` (classes tied with the ``k``-th join the set; a class the teacher
hid, probability 0, never does), zero elsewhere (``1e-12`` in log space), then Hinton KD at temperature
``T``. With every class served, ``k = C`` is top1-confidence; with no runner-up served (``k = 1``, or a
top-1 answer) the rest is spread over every other class, which is top1-confidence too.
Threat model: the served top-k (or full) probabilities, plus labels.
"""

from __future__ import annotations

import torch

from ..losses import kd_loss
from ..params import Param
from ..train import Objective
from .base import TUNE, Attack, check_temperature_alpha, register_attack, served_probs

FLOOR = 1e-12  # the target's probability outside the set (its log is finite)


def set_uniform_target(p: torch.Tensor, k: int) -> torch.Tensor:
    """Log-probabilities of the set-uniform target of each row of served probabilities ``p`` (``(N, C)``,
    0 where a class was not served): ``q`` on the top class (the first of tied maxima), ``(1 - q) / |S|``
    on each class of ``S`` = the other served classes at least as probable as the ``k``-th (``k`` capped at
    ``C``), :data:`FLOOR` elsewhere; an empty ``S`` spreads ``1 - q`` over every other class."""
    n, c = p.shape
    q, top = p.max(1)
    kth = p.topk(min(k, c), dim=1).values[:, -1:]
    others = torch.ones_like(p, dtype=torch.bool).scatter_(1, top[:, None], False)
    in_set = others & (p > 0) & (p >= kth)
    size = in_set.sum(1, keepdim=True)
    spread = torch.where(size > 0, in_set, others)  # no runner-up served: the rest over every other class
    share = ((1 - q)[:, None] / spread.sum(1, keepdim=True)).expand(-1, c)
    target = torch.where(spread, share, torch.zeros_like(p)).clamp_min(FLOOR)
    target = target.scatter(1, top[:, None], q[:, None].clamp_min(FLOOR))
    return torch.log(target)


@register_attack
class SetUniform(Attack):
    name = "set-uniform"
    summary = "KD on the served top class and its probability, the rest spread evenly over the served runner-up set (ranks 2..k)"
    accepts = ("weights", "logits", "probs", "topk")
    params = {"temperature": 4.0, "alpha": 0.9,
              "k": Param("int", 5, "set-uniform: ranks whose classes share the rest of the probability (1 or C: top1-confidence).",
                         lambda v: v >= 1, ">= 1", flag="", hi=100_000),
              "tune": TUNE}

    def validate(self):
        check_temperature_alpha(self.p)

    def objective(self, ctx, student):
        teacher = ctx.frozen_teacher()
        T, a, k = self.p["temperature"], self.p["alpha"], self.p["k"]
        log_probs = ctx.teacher.serves_log_probs

        def loss(model, batch, epoch):
            return kd_loss(model(batch.x), set_uniform_target(served_probs(teacher(batch), log_probs), k), batch.y, T, a)

        return Objective(loss, frozen=[teacher])
