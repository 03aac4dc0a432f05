"""Averaging over perturbed queries (one of the adaptive attacks ModelGuard, Tang et al., USENIX
Security 2024, evaluates): every training image is queried ``queries`` times under small random
perturbations (Gaussian pixel noise of ``noise`` standard deviations and shifts of up to
``shift`` pixels; the first query is the clean image), the served probabilities are averaged, and
the student distils from the average with Hinton KD. A deterministic perturbation of the outputs
that varies with the input is partly averaged out. Threat model: soft outputs, labels, and
``queries`` times as many queries as images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import Batch
from ..errors import NastyError
from ..losses import kd_loss
from ..frozen import Frozen
from ..train import Objective
from .base import Attack, check_temperature_alpha, register_attack


def perturb(x: torch.Tensor, noise: float, shift: int, gen: torch.Generator) -> torch.Tensor:
    out = x + noise * torch.randn(x.shape, generator=gen)
    if shift:
        dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=gen))
        out = torch.roll(out, shifts=(dy, dx), dims=(2, 3))
    return out


@register_attack
class AugmentAverage(Attack):
    name = "augment-average"
    summary = "KD from the served probabilities averaged over several perturbed queries of each image (ModelGuard's adaptive thief)"
    accepts = ("weights", "logits", "probs", "topk")
    params = {"temperature": 4.0, "alpha": 0.9, "queries": 8, "noise": 0.1, "shift": 1}

    def validate(self):
        check_temperature_alpha(self.p)
        if not 1 <= self.p["queries"] <= 256:
            raise NastyError(f"augment-average queries must be in 1..256, got {self.p['queries']}")
        if not 0 <= self.p["noise"] <= 10:
            raise NastyError(f"augment-average noise must be in [0, 10], got {self.p['noise']}")
        if not 0 <= self.p["shift"] <= 8:
            raise NastyError(f"augment-average shift must be in 0..8, got {self.p['shift']}")

    def objective(self, ctx, student):
        x, y = ctx.train_split()
        gen = torch.Generator().manual_seed(ctx.train.seed)
        mean = torch.zeros(len(x), ctx.data.num_classes)
        for k in range(self.p["queries"]):
            xk = x if k == 0 else perturb(x, self.p["noise"], self.p["shift"], gen)
            for i in range(0, len(x), 1024):
                mean[i : i + 1024] += F.softmax(ctx.teacher(xk[i : i + 1024]), 1)
        target = Frozen.from_outputs(torch.log((mean / self.p["queries"]).clamp_min(1e-12)))
        T, a = self.p["temperature"], self.p["alpha"]

        def loss(model, batch: Batch, epoch):
            return kd_loss(model(batch.x), target(batch), batch.y, T, a)

        return Objective(loss, frozen=[target])
