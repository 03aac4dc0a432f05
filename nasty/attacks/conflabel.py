"""Confidence-label thief: the hard-label thief (its own labels, the teacher's top-1 on its unlabelled
queries) that also reads the served confidence ``q`` of the decided class (per-sample label smoothing by
the teacher's confidence, after Szegedy et al. 2016 and Muller et al. 2019). ``confidence = smooth``:
the target is ``s`` on the decided class and ``(1 - s) / (C - 1)`` on every other (label smoothing
``1 - s``); ``weight``: each sample's cross-entropy is weighted by ``s``; ``s = q ** exponent``
(``exponent = 0`` is hard-label). A labelled image whose label the teacher does not decide keeps its hard
label, weight 1: the served confidence is about another class. Threat model: the top-1 label and its
score, plus labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..params import Param
from ..train import Objective
from .base import TUNE, Attack, register_attack, served_probs

CONFIDENCE_USES = ("smooth", "weight")
TUNE_EXPONENTS = (0.5, 1.0, 2.0)


def confidence_label_target(p: torch.Tensor, y: torch.Tensor, exponent: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of served probabilities ``p`` and thief's label ``y`` (``-1``: an unlabelled query): the
    decided class (``y``, else the served top class) and its confidence ``s``: ``q ** exponent`` where the
    decided class is the served top class, 1 where the thief's own label disagrees with the teacher."""
    q, top = p.max(1)
    cls = torch.where(y >= 0, y, top)
    s = torch.where(cls == top, q.clamp(0, 1) ** exponent, torch.ones_like(q))
    return cls, s


def smoothed_targets(cls: torch.Tensor, s: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``s`` on ``cls`` and ``(1 - s) / (C - 1)`` on every other class, per row (label smoothing ``1 - s``)."""
    rest = ((1 - s) / (num_classes - 1))[:, None].expand(-1, num_classes)
    return rest.scatter(1, cls[:, None], s[:, None])


def confidence_label_loss(z: torch.Tensor, cls: torch.Tensor, s: torch.Tensor, use: str) -> torch.Tensor:
    """Mean over the batch of the confidence-smoothed cross-entropy (``smooth``) or the cross-entropy
    weighted by ``s`` (``weight``)."""
    if use == "weight":
        return (s * F.cross_entropy(z, cls, reduction="none")).mean()
    return -(smoothed_targets(cls, s, z.shape[1]) * F.log_softmax(z, dim=1)).sum(1).mean()


@register_attack
class ConfidenceLabel(Attack):
    name = "confidence-label"
    summary = "CE on the thief's labels and the teacher's top-1, each smoothed (or weighted) by the served confidence"
    accepts = ("weights", "logits", "probs", "topk")
    needs_labels = False  # without labels: Copycat reading the served confidence
    params = {"confidence": Param("str", "smooth", "confidence-label: smooth (label smoothing 1 - q) or weight (CE weighted by q).",
                                  choices=CONFIDENCE_USES, flag=""),
              "exponent": Param("float", 1.0, "confidence-label: the confidence used is q ** EXPONENT (0: hard-label).",
                                lambda v: v >= 0, ">= 0", flag="", hi=100.0),
              "tune": TUNE}

    def tuning_grid(self, labels: bool = True) -> list[dict]:
        """Both uses of the confidence x exponents 0.5, 1, 2."""
        return [{"confidence": u, "exponent": e} for u in CONFIDENCE_USES for e in TUNE_EXPONENTS]

    def objective(self, ctx, student):
        teacher = ctx.frozen_teacher()
        use, exponent = self.p["confidence"], self.p["exponent"]
        log_probs = ctx.teacher.serves_log_probs

        def loss(model, batch, epoch):
            cls, s = confidence_label_target(served_probs(teacher(batch), log_probs), batch.y, exponent)
            return confidence_label_loss(model(batch.x), cls, s, use), {}

        return Objective(loss, frozen=[teacher])
