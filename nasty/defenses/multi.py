"""Nasty teacher against several adversaries, so it is not nasty only against its own twin.

Ma et al. (ICLR 2021) maximise the KL to *one* normally trained adversary of the teacher's own
architecture. Here the adversaries are several normal networks, ideally of different
architectures (``--adversary`` repeated, or ``--adversary-model cnn,mlp`` to train them first),
and ``combine`` says how their batch-mean KL terms ``K_1..K_n`` enter the objective:

- ``mean`` (default): ``(1/n) sum_j K_j``: every adversary pulls with equal weight; the gradient is
  smooth, omega keeps the meaning it has with one adversary.
- ``sum``: ``sum_j K_j``, the same direction as ``mean`` at ``n`` times the strength.
- ``min``: ``min_j K_j`` (per batch), a max-min objective: the teacher must be far from *every*
  adversary, and the gradient goes to whichever it is currently closest to (a subgradient). With a
  fixed KL budget it spreads the perturbation instead of over-serving the easiest adversary, at
  the price of a noisier gradient.

Which wins is an empirical question (``benchmarks/bench_defenses.py`` measures it against students
of architectures not used as adversaries); ``mean`` is the default because it is the stable one.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import NastyError
from ..params import Param
from .base import register_defense, split_model_specs
from .nasty import NastyTeacher

COMBINE = ("mean", "sum", "min")


def combine_kls(kls: list[torch.Tensor], how: str = "mean") -> torch.Tensor:
    """Combine the per-adversary KL terms (scalars): ``mean``, ``sum`` or ``min``."""
    if not kls:
        raise NastyError("no adversary KL terms to combine")
    stacked = torch.stack(kls)
    if how == "mean":
        return stacked.mean()
    if how == "sum":
        return stacked.sum()
    if how == "min":
        return stacked.min()
    raise NastyError(f"combine must be one of {', '.join(COMBINE)}, got {how!r}")


def count_adversaries(cfg: dict) -> int:
    return len(cfg.get("adversary") or []) or max(1, len(split_model_specs(cfg.get("adversary_model"))))


@register_defense
class MultiAdversaryNasty(NastyTeacher):
    name = "multi-adversary"
    summary = "nasty KL against several adversaries (--adversary repeated or --adversary-model cnn,mlp), --combine mean|sum|min"
    params: ClassVar[dict[str, Param]] = {
        "combine": Param("str", "mean", "multi-adversary/budget: how several adversaries' KL terms combine.", choices=COMBINE),
    }
    min_adversaries: ClassVar[int] = 2

    def validate(self) -> None:
        super().validate()
        n = count_adversaries(self.cfg)
        if n < self.min_adversaries:
            raise NastyError(f"defense {self.name} needs at least {self.min_adversaries} adversaries: repeat --adversary "
                             "or give several architectures, e.g. --adversary-model cnn,mlp")

    def combine(self, kls: list[torch.Tensor]) -> torch.Tensor:
        return combine_kls(kls, self.cfg.get("combine", "mean"))
