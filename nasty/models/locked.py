"""Decision-locked teacher: one artifact that serves soft outputs from a nasty part and decisions
from the normal model, so its accuracy *is* the normal model's.

Two forms (``form``):

- ``two-head`` (default of ``nasty train-defended``): the normal model's backbone and classifier
  make the decision; a second head on the same features (``nasty="linear"`` or
  ``"mlp:hidden=H"``) produces the soft outputs. One backbone pass at inference.
- ``two-net``: the normal model decides, a separate nasty network (``nasty=`` a model spec, e.g.
  ``"cnn"``) produces the soft outputs. Two passes at inference.

How the decision is imposed on the nasty logits ``z`` for the decided class ``d`` (``lock``):

- ``swap``: exchange ``z[d]`` with the largest logit (the served vector is a permutation of the
  nasty one, so every statistic of it but the order is kept);
- ``margin``: raise ``z[d]`` to ``max_{j != d} z[j] + margin`` when it is lower (the rest is kept).

Either way ``served.argmax(1) == decision.argmax(1)`` on every input (a tie is broken for ``d``).
White-box honesty: the artifact *contains* the normal model; whoever holds its weights holds the
normal model. The defense is for black-box serving.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ._registry import create_model, parse_model_spec, register_model

FORMS = ("two-head", "two-net")
LOCKS = ("swap", "margin")


def head_module(spec: str, num_features: int, num_classes: int) -> nn.Module:
    """A nasty head on ``num_features`` features: ``linear`` or ``mlp[:hidden=H]``."""

    name, kw = parse_model_spec(spec)
    if name == "linear" and not kw:
        return nn.Linear(num_features, num_classes)
    if name == "mlp" and set(kw) <= {"hidden"}:
        h = kw.get("hidden", num_features)
        if not isinstance(h, int) or isinstance(h, bool) or not 1 <= h <= 65536:
            raise ValueError(f"nasty head mlp hidden must be an integer in 1..65536, got {h!r}")
        return nn.Sequential(nn.Linear(num_features, h), nn.ReLU(), nn.Linear(h, num_classes))
    raise ValueError(f"nasty head must be 'linear' or 'mlp:hidden=H', got {spec!r}")


def next_float_up(x: torch.Tensor) -> torch.Tensor:
    """The next representable float above ``x``."""
    return torch.nextafter(x, torch.full_like(x, float("inf")))


def lock_decision(z: torch.Tensor, decision: torch.Tensor, lock: str = "swap", margin: float = 0.0,
                  above: Callable[[torch.Tensor], torch.Tensor] = next_float_up) -> torch.Tensor:
    """``z`` (N, C) with class ``decision`` (N,) on top (see the module docstring). ``above(best)`` is a
    value above the best other logit, given to the decided class where it would otherwise tie."""
    d = decision[:, None]
    zd = z.gather(1, d)
    if lock == "swap":
        top = z.argmax(1, keepdim=True)
        zt = z.gather(1, top)
        out = z.scatter(1, top, zd).scatter(1, d, zt)
    else:
        others = z.scatter(1, d, float("-inf")).amax(1, keepdim=True)
        out = z.scatter(1, d, torch.maximum(zd, others + margin))
    # ties: the decided class must win argmax even where another logit equals it exactly
    best = out.scatter(1, d, float("-inf")).amax(1, keepdim=True)
    return out.scatter(1, d, torch.maximum(out.gather(1, d), above(best)))


class LockedTeacher(nn.Module):
    """``forward(x)`` = the nasty part's logits with the normal model's decision on top."""

    def __init__(self, decision: nn.Module, nasty: nn.Module, form: str, lock: str, margin: float):
        super().__init__()
        self.decision, self.nasty = decision, nasty
        self.form, self.lock, self.margin = form, lock, margin
        self.stage_names = [f"decision.{s}" for s in getattr(decision, "stage_names", [])]
        self.num_features = getattr(decision, "num_features", None)

    def decide_and_serve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normal logits, nasty logits before the lock)."""
        if self.form == "two-head":
            f = self.decision.forward_features(x)
            return self.decision.forward_head(f), self.nasty(f)
        return self.decision(x), self.nasty(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normal, z = self.decide_and_serve(x)
        return lock_decision(z, normal.argmax(1), self.lock, self.margin)


@register_model
def locked(num_classes: int, in_channels: int, image_size: tuple[int, int], decision: str = "cnn", nasty: str = "linear",
           form: str = "two-head", lock: str = "swap", margin: float = 0.0) -> nn.Module:
    """Decision-locked teacher: ``decision`` model spec decides, ``nasty`` (a head spec for
    ``form=two-head``, a model spec for ``two-net``) shapes the soft outputs; ``lock`` swap|margin."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if lock not in LOCKS:
        raise ValueError(f"lock must be one of {', '.join(LOCKS)}, got {lock!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 100:
        raise ValueError(f"margin must be a number in [0, 100], got {margin!r}")
    if not isinstance(decision, str) or decision.partition(":")[0].strip() == "locked":
        raise ValueError("the decision model must be a plain model spec, not another locked teacher")
    dec = create_model(decision, num_classes, in_channels, image_size)
    if form == "two-head":
        if not hasattr(dec, "forward_features") or not isinstance(getattr(dec, "num_features", None), int):
            raise ValueError(f"decision model {decision!r} exposes no features for a second head")
        part = head_module(nasty, dec.num_features, num_classes)
    else:
        if not isinstance(nasty, str) or nasty.partition(":")[0].strip() == "locked":
            raise ValueError("the nasty network must be a plain model spec")
        part = create_model(nasty, num_classes, in_channels, image_size)
    return LockedTeacher(dec, part, form, lock, float(margin))


def is_locked(model: nn.Module) -> bool:
    return isinstance(model, LockedTeacher)
