"""Re-head attack: an adaptive attack on decision-locked (and any argmax-preserving) defenses.

The thief fits a correction ``g`` from the served logits to its own labels (softmax regression on
its labelled images: ``corrector=affine``, a C x C affine map, or ``mlp``, a small MLP), picks the
fitting step on its validation split, then distils from the corrected outputs with Hinton KD:
``alpha * T^2 * KL(sigma_T(g(z_T)) || sigma_T(z_S)) + (1 - alpha) * CE``. A nasty part that is an
invertible scramble of the normal logits is unscrambled this way; one that destroyed the
information is not (then the attack lands near label-only). Threat model: soft outputs (logits or
probabilities) plus the thief's labelled images.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Batch
from ..errors import NastyError
from ..losses import kd_loss
from ..train import Objective
from .base import TUNE, Attack, check_temperature_alpha, register_attack


def _center(z: torch.Tensor) -> torch.Tensor:
    """Logits (or log-probabilities) up to the per-row constant the oracle cannot fix."""
    return z - z.mean(1, keepdim=True)


def fit_corrector(z: torch.Tensor, y: torch.Tensor, z_val: torch.Tensor, y_val: torch.Tensor, kind: str, hidden: int,
                  steps: int, seed: int) -> tuple[nn.Module, dict]:
    """Softmax regression from served logits to labels; the step with the lowest validation CE is kept."""
    c = z.shape[1]
    g = torch.Generator().manual_seed(seed)
    if kind == "affine":
        net: nn.Module = nn.Linear(c, c)
        with torch.no_grad():
            net.weight.copy_(torch.eye(c))
            net.bias.zero_()
    else:
        net = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, c))
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p.shape[-1])) ** 0.5 if p.ndim > 1 else torch.zeros_like(p))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    zc, zvc = _center(z), _center(z_val)
    best, best_state, best_step = float("inf"), None, 0
    for step in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(net(zc), y)
        loss.backward()
        opt.step()
        if step % 10 == 9 or step == steps - 1:
            with torch.no_grad():
                v = float(F.cross_entropy(net(zvc), y_val)) if len(y_val) else float(loss)
            if v < best:
                best, best_state, best_step = v, {k: t.clone() for k, t in net.state_dict().items()}, step + 1
    assert best_state is not None
    net.load_state_dict(best_state)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        acc = float((net(zvc).argmax(1) == y_val).float().mean() * 100) if len(y_val) else float("nan")
    return net, {"corrector_val_ce": best, "corrector_step": best_step, "corrector_val_accuracy": acc}


@register_attack
class Rehead(Attack):
    name = "rehead"
    summary = "fit a correction (affine or small MLP) from the served logits to the thief's labels, then KD from the corrected outputs"
    accepts = ("weights", "logits", "probs")
    params = {"temperature": 4.0, "alpha": 0.9, "corrector": "affine", "hidden": 64, "steps": 500, "tune": TUNE}

    def validate(self):
        check_temperature_alpha(self.p)
        if self.p["corrector"] not in ("affine", "mlp"):
            raise NastyError(f"rehead corrector must be affine or mlp, got {self.p['corrector']!r}")
        if not 1 <= self.p["hidden"] <= 4096:
            raise NastyError(f"rehead hidden must be in 1..4096, got {self.p['hidden']}")
        if not 10 <= self.p["steps"] <= 100000:
            raise NastyError(f"rehead steps must be in 10..100000, got {self.p['steps']}")

    def objective(self, ctx, student):
        teacher = ctx.frozen_teacher()
        x, y = ctx.train_split()
        z = teacher(Batch(x, y, torch.arange(len(y)), False))  # fills the cache: every image queried once
        z_val = ctx.teacher(ctx.data.x_val)  # the thief's own validation images (counted as queries)
        if not (torch.isfinite(z).all() and torch.isfinite(z_val).all()):
            raise NastyError("rehead needs finite served scores (use --query logits or probs)")
        known = y >= 0  # the thief's labelled images (its unlabelled queries carry no label to fit)
        net, facts = fit_corrector(z[known], y[known], z_val, ctx.data.y_val, self.p["corrector"], self.p["hidden"], self.p["steps"],
                                   ctx.train.seed)
        ctx.notes.append(f"corrector {self.p['corrector']}: validation accuracy {facts['corrector_val_accuracy']:.2f}% after "
                         f"{facts['corrector_step']} steps")
        T, a = self.p["temperature"], self.p["alpha"]

        def loss(model, batch, epoch):
            with torch.no_grad():
                target = net(_center(teacher(batch)))
            return kd_loss(model(batch.x), target, batch.y, T, a)

        return Objective(loss, frozen=[teacher])
