"""Copycat CNN (Correia-Silva et al., IJCNN 2018): label-only extraction. The attacker holds
unlabelled images (in-distribution or not), asks the teacher for its top-1 label on each, and
trains the student with cross-entropy on those labels. Needs only ``label`` access; any richer
access is reduced to the argmax. Never reads ground-truth labels.
"""

from __future__ import annotations

import torch.nn.functional as F

from ..errors import NastyError
from ..train import Objective
from .base import Attack, register_attack


@register_attack
class Copycat(Attack):
    name = "copycat"
    summary = "CE on the teacher's argmax labels of unlabelled (or surrogate) queries"
    accepts = ("weights", "logits", "probs", "topk", "label")
    needs_labels = False
    uses_labels = False
    params = {"label_smoothing": 0.0}

    def validate(self):
        if not 0 <= self.p["label_smoothing"] < 1:
            raise NastyError(f"label_smoothing must be in [0, 1), got {self.p['label_smoothing']}")

    def objective(self, ctx, student):
        teacher = ctx.frozen_teacher()
        ls = self.p["label_smoothing"]

        def loss(model, batch, epoch):
            stolen = teacher(batch).argmax(1)
            return F.cross_entropy(model(batch.x), stolen, label_smoothing=ls), {}

        return Objective(loss, frozen=[teacher])
