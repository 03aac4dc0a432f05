"""Baselines a defense is judged against: a student trained on labels alone, and with label
smoothing (the stricter bar of CMIM, Ye et al. 2025: a defense holds only if a distilled student
does not beat the label-smoothing student)."""

from __future__ import annotations

from ..errors import NastyError
from ..train import ce_objective
from .base import Attack, register_attack


@register_attack
class Scratch(Attack):
    name = "scratch"
    summary = "labels only, no teacher (the label-only twin every attack is compared with)"
    needs_teacher = False
    accepts = ("weights", "logits", "probs", "topk", "label")

    def objective(self, ctx, student):
        return ce_objective(0.0)


@register_attack
class LabelSmoothing(Attack):
    name = "label-smoothing"
    summary = "labels with label smoothing, no teacher (the stricter baseline)"
    needs_teacher = False
    accepts = Scratch.accepts
    params = {"smoothing": 0.1}

    def validate(self):
        if not 0 <= self.p["smoothing"] < 1:
            raise NastyError(f"smoothing must be in [0, 1), got {self.p['smoothing']}")

    def objective(self, ctx, student):
        return ce_objective(self.p["smoothing"])
