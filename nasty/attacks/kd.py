"""Standard knowledge distillation (Hinton, Vinyals, Dean 2015):
``alpha * T^2 * KL(sigma_T(z_T) || sigma_T(z_S)) + (1 - alpha) * CE(z_S, y)``, teacher frozen.

With ``--augment mixup|cutmix`` the teacher is queried on the mixed batch and the CE term is the
mixed one; without labels the loss is the KD term alone.

With ``--query label`` the teacher's answer is one-hot (no temperature changes it), so the KD term is
``alpha * T^2 * CE(sigma_T(z_S), argmax teacher)``: cross-entropy on the teacher's labels, but of
the *tempered* student softmax and scaled by ``alpha * T^2``, not the plain CE of label training."""

from __future__ import annotations

import torch

from ..losses import kd_loss
from .augment import Mixed, mixed_ce
from ..train import Objective
from .base import TUNE, Attack, check_temperature_alpha, register_attack


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, m: Mixed, temperature: float, alpha: float,
                 labels: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """Hinton KD on a (possibly mixed) batch; identical to :func:`nasty.losses.kd_loss` on plain batches."""
    if m.lam == 1.0 or not labels:
        return kd_loss(student_logits, teacher_logits, m.y if labels else None, temperature, alpha)
    kd, terms = kd_loss(student_logits, teacher_logits, None, temperature, 1.0)
    ce = mixed_ce(student_logits, m)
    return alpha * kd + (1 - alpha) * ce, {"kd_kl": terms["kd_kl"], "ce": ce.item()}


@register_attack
class KD(Attack):
    name = "kd"
    summary = "Hinton KD on the teacher's soft outputs and the labels"
    accepts = ("weights", "logits", "probs", "topk", "label")  # label: alpha*T^2*CE at temperature T on the teacher's labels
    needs_labels = False  # with alpha = 1 it distils from the teacher alone
    supports_augment = True
    params = {"temperature": 4.0, "alpha": 0.9, "tune": TUNE}

    def validate(self):
        check_temperature_alpha(self.p)

    def objective(self, ctx, student):
        teacher = ctx.frozen_teacher()
        mix = ctx.mixer()
        T, a = self.p["temperature"], self.p["alpha"]
        labels = ctx.labels_available

        def loss(model, batch, epoch):
            m = mix(batch)
            return distill_loss(model(m.x), teacher(m.batch), m, T, a, labels)

        return Objective(loss, frozen=[teacher])
