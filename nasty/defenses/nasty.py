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
import torch.nn.functional as F

from ..errors import NastyError
from ..losses import adversary_kl
from . import Defense, register_defense

# [defense] keys only some defenses read -> the defenses that read them (refused elsewhere, never ignored)
OPTIONAL_KEYS = {
    "protect_classes": "class-selective or budget",
    "protect_by": "class-selective or budget",
    "anchor": "class-selective or budget",
    "combine": "multi-adversary or budget",
    "max_accuracy_drop": "budget",
    "dual_lr": "budget",
    "omega_max": "budget",
}


@register_defense
class NastyTeacher(Defense):
    name = "nasty"
    summary = "Ma et al. 2021: CE minus omega*tau^2*KL to a frozen normal adversary"
    uses: ClassVar[frozenset[str]] = frozenset()  # which OPTIONAL_KEYS this defense reads

    def validate(self) -> None:
        c = self.cfg
        if not c["tau"] > 0:
            raise NastyError(f"tau must be positive, got {c['tau']}")
        if c["omega"] < 0:
            raise NastyError(f"omega must be >= 0, got {c['omega']}")
        if c["omega_warmup"] < 0:
            raise NastyError(f"omega_warmup must be >= 0 epochs, got {c['omega_warmup']}")
        if c["kl_cap"] is not None and not c["kl_cap"] > 0:
            raise NastyError(f"kl_cap must be positive, got {c['kl_cap']}")
        from ..config import SCHEMA

        for key, where in OPTIONAL_KEYS.items():
            if key in c and key not in self.uses and c[key] != SCHEMA["defense"][key][1]:
                raise NastyError(f"defense {self.name} does not use {key} (set to {c[key]!r}); it belongs to --defense {where}")

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

    def objective(self, adversaries):
        tau = self.cfg["tau"]

        def objective(model, batch, epoch):
            z = model(batch.x)
            omega = self.omega_at(epoch)
            adv_logits = [adv(batch) for adv in adversaries]
            kl = self.kl_term(z, batch, adv_logits)
            ce = F.cross_entropy(z, batch.y)
            loss = ce - omega * tau**2 * kl
            terms = {"ce": ce.item(), "kl_adv": kl.item(), "omega": omega}
            extra = self.extra_term(z, batch, adv_logits)
            if extra is not None:
                loss = loss + extra
                terms["anchor"] = extra.item()
            return loss, terms

        return objective
