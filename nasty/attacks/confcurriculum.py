"""Confidence-curriculum thief: the hard-label thief (its own labels, the teacher's top-1 on its
unlabelled queries) that lets the queries in by the served confidence ``q`` of the decided class, most
confident first (curriculum learning, Bengio et al. 2009; confidence-ordered pseudo-labels as in
Curriculum Labeling, Cascante-Bonilla et al. 2021). At epoch ``e`` of ``E`` a query counts when its
``q`` is among the top fraction ``f(e) = start + (end - start) * min(1, 2 e / E)`` of its batch's queries
(a tie at the cut lets the whole tie in: a confidence bin enters as a whole); ``start = end`` is a fixed
filter that drops the least confident queries throughout. Labelled images always count. Against binned
confidence it reads exactly what the bins say: which answers the teacher is sure of. Threat model: the
top-1 label and its score, plus labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..params import Param
from ..train import Objective
from .base import TUNE, Attack, register_attack, served_probs

TUNE_SCHEDULES = ((0.25, 1.0), (0.5, 1.0), (0.5, 0.5), (0.75, 0.75))
TUNE_SMOOTHING = (0.0, 0.3)


def admitted_fraction(epoch: int, epochs: int, start: float, end: float) -> float:
    """``f(e)``: from ``start`` at epoch 0 linearly to ``end`` at half the epochs, then ``end``."""
    return start + (end - start) * min(1.0, 2.0 * epoch / max(1, epochs))


def admitted(q: torch.Tensor, query: torch.Tensor, fraction: float) -> torch.Tensor:
    """Which rows count: every non-query row, and the queries whose confidence ``q`` is at least the
    ``ceil(fraction * n)``-th largest among the ``n`` queries (ties at the cut included)."""
    n = int(query.sum())
    if n == 0 or fraction >= 1.0:
        return torch.ones_like(query)
    k = max(1, int(-(-fraction * n // 1)))
    cut = q[query].topk(k).values[-1]
    return ~query | (q >= cut)


@register_attack
class ConfidenceCurriculum(Attack):
    name = "confidence-curriculum"
    summary = "hard-label thief whose queries enter training by the served confidence, most confident first"
    accepts = ("weights", "logits", "probs", "topk")
    needs_labels = False
    params = {"start": Param("float", 0.5, "confidence-curriculum: fraction of each batch's queries admitted at the first epoch "
                             "(the most confident).", lambda v: 0 < v <= 1, "in (0, 1]", flag=""),
              "end": Param("float", 1.0, "confidence-curriculum: fraction admitted from half the epochs on.",
                           lambda v: 0 < v <= 1, "in (0, 1]", flag=""),
              "label_smoothing": Param("float", 0.0, "confidence-curriculum: label smoothing of the cross-entropy.",
                                       lambda v: 0 <= v < 1, "in [0, 1)", flag=""),
              "tune": TUNE}

    def tuning_grid(self, labels: bool = True) -> list[dict]:
        """Curricula 0.25 -> 1 and 0.5 -> 1, filters 0.5 and 0.75, each with label smoothing 0 and 0.3."""
        return [{"start": s, "end": e, "label_smoothing": ls} for s, e in TUNE_SCHEDULES for ls in TUNE_SMOOTHING]

    def objective(self, ctx, student):
        teacher = ctx.frozen_teacher()
        start, end, ls, epochs = self.p["start"], self.p["end"], self.p["label_smoothing"], ctx.train.epochs
        log_probs = ctx.teacher.serves_log_probs

        def loss(model, batch, epoch):
            q, top = served_probs(teacher(batch), log_probs).max(1)
            query = batch.y < 0
            y = torch.where(query, top, batch.y)
            keep = admitted(q, query, admitted_fraction(epoch, epochs, start, end)).float()
            ce = F.cross_entropy(model(batch.x), y, label_smoothing=ls, reduction="none")
            return (keep * ce).sum() / keep.sum().clamp_min(1.0), {"admitted": float(keep.mean())}

        return Objective(loss, frozen=[teacher])
