"""Standard knowledge distillation (Hinton, Vinyals, Dean 2015):
``alpha * T^2 * KL(sigma_T(z_T) || sigma_T(z_S)) + (1 - alpha) * CE(z_S, y)``, teacher frozen."""

from __future__ import annotations

from ..losses import kd_loss
from . import register_attack
from .base import Attack, check_temperature_alpha


@register_attack
class KD(Attack):
    name = "kd"
    summary = "Hinton KD on the teacher's soft outputs and the labels"
    accepts = ("weights", "logits", "probs", "topk", "label")  # label: degrades to CE on the teacher's labels
    needs_labels = False  # with alpha = 1 it distils from the teacher alone
    params = {"temperature": 4.0, "alpha": 0.9}

    def validate(self):
        check_temperature_alpha(self.p)

    def objective(self, ctx, student):
        teacher = ctx.frozen_teacher()
        T, a = self.p["temperature"], self.p["alpha"]
        labels = ctx.labels_available

        def objective(model, batch, epoch):
            return kd_loss(model(batch.x), teacher(batch), batch.y if labels else None, T, a)

        return objective
