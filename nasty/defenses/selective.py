"""Class-selective nasty teacher: make *chosen* classes undistillable and leave the rest alone.

No published method does this; it is the nasty teacher (Ma et al., ICLR 2021) with its KL term
restricted to where it protects the chosen classes ``P`` (``protect_classes``: indices or names):
``L = CE(z_T, y) - omega * tau^2 * mean_i[ w_i * KL(sigma_tau(z_T,i) || sigma_tau(z_A,i)) ]``.

Design choice, ``protect_by`` (documented default ``label``):

- ``label``: ``w_i = 1[y_i in P]``. The teacher scrambles its soft outputs on images *labelled*
  with a protected class, so a KD student is misled exactly on those classes; on all other images
  only the cross-entropy acts, so their soft labels (and the student's accuracy on them) stay
  normal. Cheap, no hyper-parameter, and the only choice that guarantees the unprotected classes'
  images are never perturbed.
- ``mass``: ``w_i = sum_{c in P} softmax(z_A,i)_c`` (the frozen adversary's probability mass on
  ``P`` at temperature 1, averaged over adversaries). It also perturbs unprotected images that look
  like a protected class (their soft labels are where the "dark knowledge" about ``P`` lives), in
  proportion to how much they do; images of a protected class get ``w`` near 1. It uses the
  adversary, not the teacher, so the weight is fixed per image and cannot be gamed by the teacher.
- ``both``: ``max`` of the two.

The batch mean keeps the per-sample strength of plain nasty training at the same omega (the total
KL is smaller because fewer samples carry it).

``anchor`` (default 0: off) adds ``anchor * tau^2 * mean_i[(1 - w_i) * KL(sigma_tau(z_A,i) || sigma_tau(z_T,i))]``:
on the images the KL term spares, the teacher is distilled from the (normal) adversary, so the
unprotected classes keep both their accuracy and their soft labels (the scrambled mass of the
protected images otherwise leaks into the neighbouring classes' outputs). With several adversaries
their mean tempered distribution is the anchor.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import NastyError
from ..params import Param
from ..registry import did_you_mean
from .base import register_defense
from .nasty import NastyTeacher

PROTECT_BY = ("label", "mass", "both")


def resolve_classes(names: list[str], classes: list[str]) -> list[int]:
    """Class names or indices (as strings) -> sorted unique indices into ``classes``."""
    lower = {c.lower(): i for i, c in enumerate(classes)}
    out: set[int] = set()
    for raw in names:
        name = str(raw).strip()
        if name.lower() in lower:
            out.add(lower[name.lower()])
        elif name.lstrip("-").isdigit():
            i = int(name)
            if not 0 <= i < len(classes):
                raise NastyError(f"protected class index {i} is out of range (0..{len(classes) - 1})")
            out.add(i)
        else:
            raise NastyError(f"unknown class {name!r}{did_you_mean(name, classes)} (classes: {', '.join(classes)})")
    return sorted(out)


def protection_weight(y: torch.Tensor, adversary_logits: list[torch.Tensor], protected: torch.Tensor,
                      mode: str = "label") -> torch.Tensor:
    """Per-sample KL weight in [0, 1] (see the module docstring). ``protected``: bool mask over classes."""
    if mode not in PROTECT_BY:
        raise NastyError(f"protect_by must be one of {', '.join(PROTECT_BY)}, got {mode!r}")
    protected = protected.to(y.device)
    by_label = protected[y].float()
    if mode == "label":
        return by_label
    mass = torch.stack([F.softmax(a.float(), dim=1)[:, protected].sum(1) for a in adversary_logits]).mean(0)
    return mass if mode == "mass" else torch.maximum(by_label, mass)


def anchor_kl(teacher_logits: torch.Tensor, adversary_logits: list[torch.Tensor], tau: float, weight: torch.Tensor) -> torch.Tensor:
    """``tau^2 * mean_i[weight_i * KL(p_A,i || p_T,i)]`` at temperature ``tau``; ``p_A`` is the adversaries' mean."""
    log_pt = F.log_softmax(teacher_logits / tau, dim=1)
    p_a = torch.stack([F.softmax(a.float() / tau, dim=1) for a in adversary_logits]).mean(0)
    per = (p_a * (torch.log(p_a.clamp_min(1e-12)) - log_pt)).sum(1)
    return tau**2 * (per * weight).mean()


def split_accuracy(metrics: dict, protected: list[int]) -> dict:
    """Accuracy (percent of images) on the protected classes and on the others, from ``evaluate``'s confusion matrix."""
    cm = torch.tensor(metrics["confusion_matrix"], dtype=torch.float64)
    mask = torch.zeros(len(cm), dtype=torch.bool)
    mask[protected] = True

    def acc(m: torch.Tensor) -> float | None:
        n = cm[m].sum()  # images of those classes; the sub-matrix's diagonal holds the correct ones
        return float(100.0 * cm[m][:, m].diagonal().sum() / n) if n > 0 else None

    return {"protected": acc(mask), "other": acc(~mask)}


@register_defense
class ClassSelectiveNasty(NastyTeacher):
    name = "class-selective"
    summary = "nasty KL only where it protects --protect-classes (labelled with them, or their probability mass)"
    params: ClassVar[dict[str, Param]] = {
        "protect_classes": Param("list[str]", [], "class-selective/budget: classes to protect, indices or names (e.g. 3,5,7 or Shirt,Coat)."),
        "protect_by": Param("str", "label", "Where the KL acts: images labelled with a protected class (default), the adversary's "
                            "probability mass on them, or both.", choices=PROTECT_BY),
        "anchor": Param("float", 0.0, "class-selective/budget: weight of KL(adversary || teacher) on unprotected images (keeps "
                        "their soft labels normal; default 0).", lambda v: v >= 0, "a number >= 0"),
    }
    require_protected: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        c = self.cfg
        names = c.get("protect_classes") or []
        if not names:
            if self.require_protected:
                raise NastyError(f"defense {self.name} needs --protect-classes (indices or class names, e.g. 3,5,7)")
            self.protected: list[int] = []
            return
        if self.data is None:
            raise NastyError(f"defense {self.name} needs the dataset to resolve --protect-classes")
        self.protected = resolve_classes(names, self.data.classes)
        if len(self.protected) == self.data.num_classes:
            raise NastyError("--protect-classes names every class: that is the plain nasty teacher (--defense nasty)")
        self._mask = torch.zeros(self.data.num_classes, dtype=torch.bool)
        self._mask[self.protected] = True

    def sample_weight(self, batch, adversary_logits):
        if not self.protected:
            return None
        return protection_weight(batch.y, adversary_logits, self._mask, self.cfg.get("protect_by", "label"))

    def extra_term(self, z, batch, adversary_logits):
        lam = float(self.cfg.get("anchor") or 0.0)
        if not lam or not self.protected:
            return None
        return lam * anchor_kl(z, adversary_logits, self.cfg["tau"], 1.0 - self.sample_weight(batch, adversary_logits))
