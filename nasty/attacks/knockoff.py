"""Knockoff Nets (Orekondy, Schiele, Fritz, CVPR 2019), random sampling strategy: query the teacher
on images from a *surrogate* distribution (``--surrogate``, e.g. MNIST against a Fashion-MNIST
teacher) within a query budget (``--queries``), and train the student on its soft outputs:
``T^2 * KL(sigma_T(z_T) || sigma_T(z_S))`` (soft cross-entropy up to a constant at ``T = 1``).
Never reads ground-truth labels. With ``label`` access the outputs are one-hot (Copycat on the
surrogate data). The adaptive (bandit) sampling strategy of the paper is not implemented.
"""

from __future__ import annotations

from ..errors import NastyError
from ..train import Objective
from .base import Attack, register_attack
from .kd import distill_loss


@register_attack
class Knockoff(Attack):
    name = "knockoff"
    summary = "soft outputs on surrogate-distribution queries within a query budget (Orekondy et al. 2019)"
    accepts = ("weights", "logits", "probs", "topk", "label")
    needs_labels = False
    uses_labels = False
    supports_augment = True
    params = {"temperature": 1.0}

    def validate(self):
        if not self.p["temperature"] > 0:
            raise NastyError(f"temperature must be positive, got {self.p['temperature']}")

    def objective(self, ctx, student):
        teacher = ctx.frozen_teacher()
        mix = ctx.mixer()
        T = self.p["temperature"]
        if ctx.teacher.access == "label":
            ctx.notes.append("label-only access: knockoff trains on the teacher's one-hot labels (Copycat on these queries)")

        def loss(model, batch, epoch):
            m = mix(batch)
            return distill_loss(model(m.x), teacher(m.batch), m, T, 1.0, labels=False)

        return Objective(loss, frozen=[teacher])
