"""The nasty teacher (Ma et al., ICLR 2021, "Undistillable: Making A Nasty Teacher That CANNOT
teach students"): fit the labels while maximising the tempered KL to a frozen, normally trained
adversary, ``L = CE(z_T, y) - omega * tau^2 * KL(sigma_tau(z_T) || sigma_tau(z_A))``.

Extensions (all off by default): ``omega_warmup`` ramps omega linearly over the first epochs;
``kl_cap`` bounds each sample's KL; with several adversaries the KL terms are averaged.
Subclasses narrow or reshape the KL term through two hooks: :meth:`NastyTeacher.sample_weight`
(which samples it acts on) and :meth:`NastyTeacher.combine` (how several adversaries count).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..losses import adversary_kl, nasty_loss
from ..train import Objective
from ..params import Param
from .base import Defense, register_defense

@register_defense
class NastyTeacher(Defense):
    name = "nasty"
    summary = "Ma et al. 2021: CE minus omega*tau^2*KL to a frozen normal adversary"
    params: ClassVar[dict[str, Param]] = {
        "tau": Param("float", 4.0, "Temperature of the KL to the adversary.", lambda v: v > 0, "positive", hi=1000.0),
        "omega": Param("float?", None, "Weight of the KL term (strength of the defense; default: chosen from --omega-grid on the "
                       "validation split with a lock, 0.04 without).", lambda v: v >= 0, ">= 0", hi=1000.0),
        "omega_warmup": Param("int", 0, "Ramp omega linearly over this many epochs.", lambda v: v >= 0, ">= 0", hi=100000),
        "kl_cap": Param("float?", None, "Cap each sample's KL to the adversary.", lambda v: v > 0, "positive", hi=1e4),
    }

    def omega_at(self, epoch: int) -> float:
        warm = self.cfg["omega_warmup"]
        return self.cfg["omega"] * (min(1.0, (epoch + 1) / warm) if warm else 1.0)

    def sample_weight(self, batch, adversary_logits: list[torch.Tensor]) -> torch.Tensor | None:
        """Per-sample weight of the KL term (``None``: every sample). Subclasses narrow it."""
        return None

    def combine(self, kls: list[torch.Tensor]) -> torch.Tensor:
        """How the (batch-mean) KL terms of several adversaries combine (here: their mean)."""
        return torch.stack(kls).mean()

    def extra_term(self, z: torch.Tensor, batch, adversary_logits: list[torch.Tensor]) -> torch.Tensor | None:
        """A term added to the loss (``None``: nothing). Subclasses use it to hold parts of the output in place."""
        return None

    def kl_term(self, z: torch.Tensor, batch, adversary_logits: list[torch.Tensor]) -> torch.Tensor:
        """The combined, weighted, capped KL of the teacher's logits ``z`` to every adversary."""
        tau, cap = self.cfg["tau"], self.cfg["kl_cap"]
        w = self.sample_weight(batch, adversary_logits)
        return self.combine([adversary_kl(z, a, tau, w, cap) for a in adversary_logits])

    def objective(self, adversaries) -> Objective:
        tau, cap = self.cfg["tau"], self.cfg["kl_cap"]

        def loss(model, batch, epoch):
            z = model(batch.x)
            omega = self.omega_at(epoch)
            adv_logits = [adv(batch) for adv in adversaries]
            total, terms = nasty_loss(z, adv_logits, batch.y, tau, omega, self.sample_weight(batch, adv_logits), cap, self.combine)
            terms["omega"] = omega
            extra = self.extra_term(z, batch, adv_logits)
            if extra is not None:
                total = total + extra
                terms["anchor"] = extra.item()
            return total, terms

        return Objective(loss, frozen=adversaries)
