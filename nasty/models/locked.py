"""Decision-locked teacher: one artifact that serves soft outputs from a nasty part and decisions
from the normal model, so its accuracy *is* the normal model's.

Two forms (``form``):

- ``two-head`` (default of ``nasty train-defended``): the normal model's backbone and classifier
  make the decision; a second head on the same features (``nasty="linear"`` or
  ``"mlp:hidden=H"``) produces the soft outputs. One backbone pass at inference.
- ``two-net``: the normal model decides, a separate nasty network (``nasty=`` a model spec, e.g.
  ``"cnn"``) produces the soft outputs. Two passes at inference.

What is served (``lock``, ``margin``, ``keep``) is one function, :func:`nasty.models.served.serve`:
the nasty logits with the decision imposed (``swap``: exchange ``z[d]`` with the largest logit;
``margin``: raise ``z[d]`` to ``max_{j != d} z[j] + margin``), the served top probability kept as
``keep`` says (``decision``: the nasty part's own; ``confidence``: the normal model's top
probability; ``confidence:bins=B``: its validation-calibrated value), and on every input the decided
class at least :data:`nasty.models.served.MIN_GAP` above every other class. ``forward`` returns
served log-probabilities.

White-box honesty: the artifact *contains* the normal model; whoever holds its weights holds the
normal model. The defense is for black-box serving.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._registry import create_model, parse_model_spec, register_model
from .served import LOCKS, Served, parse_keep

FORMS = ("two-head", "two-net")


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


class LockedTeacher(nn.Module):
    """``forward(x)`` = the served log-probabilities (:func:`nasty.models.served.serve`)."""

    def __init__(self, decision: nn.Module, nasty: nn.Module, form: str, served: Served):
        super().__init__()
        self.decision, self.nasty, self.served = decision, nasty, served
        self.form, self.lock, self.margin, self.keep = form, served.lock, served.margin, served.keep
        self.num_classes = served.num_classes
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
        return self.served(z, normal)


@register_model
def locked(num_classes: int, in_channels: int, image_size: tuple[int, int], decision: str = "cnn", nasty: str = "linear",
           form: str = "two-head", lock: str = "swap", margin: float = 0.0, keep: str = "decision") -> nn.Module:
    """Decision-locked teacher: ``decision`` model spec decides, ``nasty`` (a head spec for
    ``form=two-head``, a model spec for ``two-net``) shapes the soft outputs; ``lock`` swap|margin;
    ``keep`` decision|confidence|confidence:bins=B (the served top probability), optionally with top=K
    (the normal model's top-K set served as the top K)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if lock not in LOCKS:
        raise ValueError(f"lock must be one of {', '.join(LOCKS)}, got {lock!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 100:
        raise ValueError(f"margin must be a number in [0, 100], got {margin!r}")
    parse_keep(keep)
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
    return LockedTeacher(dec, part, form, Served(num_classes, lock, float(margin), keep))


def is_locked(model: nn.Module) -> bool:
    return isinstance(model, LockedTeacher)
