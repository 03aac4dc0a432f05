"""The nasty teacher (Ma et al., ICLR 2021, "Undistillable: Making A Nasty Teacher That CANNOT
teach students"): fit the labels while maximising the tempered KL to a frozen, normally trained
adversary, ``L = CE(z_T, y) - omega * tau^2 * KL(sigma_tau(z_T) || sigma_tau(z_A))``.

Extensions (all off by default): ``omega_warmup`` ramps omega linearly over the first epochs;
``kl_cap`` bounds each sample's KL; with several adversaries the KL terms are averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import NastyError
from ..losses import adversary_kl
from . import Defense, register_defense


@register_defense
class NastyTeacher(Defense):
    name = "nasty"
    summary = "Ma et al. 2021: CE minus omega*tau^2*KL to a frozen normal adversary"

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

    def omega_at(self, epoch: int) -> float:
        warm = self.cfg["omega_warmup"]
        return self.cfg["omega"] * (min(1.0, (epoch + 1) / warm) if warm else 1.0)

    def sample_weight(self, batch) -> torch.Tensor | None:
        """Per-sample weight of the KL term (``None``: every sample). Subclasses narrow it."""
        return None

    def combine(self, kls: list[torch.Tensor]) -> torch.Tensor:
        """How the KL terms of several adversaries combine (here: their mean)."""
        return torch.stack(kls).mean()

    def objective(self, adversaries):
        tau, cap = self.cfg["tau"], self.cfg["kl_cap"]

        def objective(model, batch, epoch):
            z = model(batch.x)
            omega = self.omega_at(epoch)
            w = self.sample_weight(batch)
            kl = self.combine([adversary_kl(z, adv(batch), tau, w, cap) for adv in adversaries])
            ce = F.cross_entropy(z, batch.y)
            return ce - omega * tau**2 * kl, {"ce": float(ce), "kl_adv": float(kl), "omega": omega}

        return objective
