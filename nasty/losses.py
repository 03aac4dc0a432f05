"""Loss functions shared by defenses and attacks; each docstring gives its formula.

``KL(p || q)`` is written out explicitly, ``sum p (log p - log q)``, so the gradient flows through
the first argument too (the nasty teacher trains the distribution in the first slot).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def kl_div(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Batch-mean ``KL(p || q)`` from log-probabilities; terms with ``p = 0`` count as 0 (top-k outputs)."""
    p = log_p.exp()
    safe_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
    safe_log_q = torch.where(p > 0, log_q, torch.zeros_like(log_q))
    return (p * (safe_log_p - safe_log_q)).sum(dim=1).mean()


def tempered_log_softmax(z: torch.Tensor, tau: float) -> torch.Tensor:
    return F.log_softmax(z / tau, dim=1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor | None, temperature: float, alpha: float,
            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Hinton et al. 2015: ``alpha * T^2 * KL(sigma_T(z_T) || sigma_T(z_S)) + (1 - alpha) * CE(z_S, y)``.

    ``mask`` (bool per sample) keeps the KD term only where true (TLLM drops it for undistillable
    classes); the mean is still over the whole batch. Without labels, ``y=None`` and ``alpha`` is 1.
    In a thief's mixed batch (``y = -1`` on its unlabelled queries) the KD term is the mean over every
    sample and the CE term the mean over the labelled ones (:func:`labelled_ce`).
    """
    log_pt = tempered_log_softmax(teacher_logits, temperature)
    log_ps = tempered_log_softmax(student_logits, temperature)
    if mask is None:
        kl = kl_div(log_pt, log_ps)
    else:
        pt = log_pt.exp()
        per = (pt * (torch.where(pt > 0, log_pt, 0.0) - torch.where(pt > 0, log_ps, 0.0))).sum(1)
        kl = (per * mask.float()).mean()
    ce = labelled_ce(student_logits, y) if y is not None else student_logits.new_zeros(())
    a = alpha if y is not None else 1.0
    loss = a * temperature**2 * kl + (1 - a) * ce
    return loss, {"kd_kl": kl.item(), "ce": ce.item()}


def labelled_ce(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy averaged over the labelled samples of the batch; ``y = -1`` marks an unlabelled
    query (a thief's image without a label), which adds nothing. 0 when no sample is labelled. On a
    fully labelled batch this is exactly ``F.cross_entropy``."""
    known = y >= 0
    if bool(known.all()):
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if not bool(known.any()):
        return logits.sum() * 0.0  # keeps the graph (and the loop's finiteness check) intact
    return F.cross_entropy(logits[known], y[known], label_smoothing=label_smoothing)


def adversary_kl(teacher_logits: torch.Tensor, adversary_logits: torch.Tensor, tau: float,
                 weight: torch.Tensor | None = None, kl_cap: float | None = None) -> torch.Tensor:
    """``KL(sigma_tau(z_T) || sigma_tau(z_A))``, batch mean, gradient through the teacher.

    ``weight`` (per sample) restricts the term, e.g. to protected classes; ``kl_cap`` bounds each
    sample's KL from above (the nasty objective is otherwise unbounded below).
    """
    log_pt = tempered_log_softmax(teacher_logits, tau)
    log_pa = tempered_log_softmax(adversary_logits, tau)
    per = (log_pt.exp() * (log_pt - log_pa)).sum(1)
    if kl_cap is not None:
        per = per.clamp(max=kl_cap)
    return (per * weight).mean() if weight is not None else per.mean()


def nasty_loss(teacher_logits: torch.Tensor, adversary_logits: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor, tau: float,
               omega: float, weight: torch.Tensor | None = None, kl_cap: float | None = None,
               combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Ma et al. 2021: ``CE(z_T, y) - omega * tau^2 * KL(sigma_tau(z_T) || sigma_tau(z_A))``.

    The adversary's logits must come from a frozen network under no-grad. With several adversaries
    (a list), ``combine`` merges their KL terms (default: the mean).
    """
    if isinstance(adversary_logits, torch.Tensor):
        kl = adversary_kl(teacher_logits, adversary_logits, tau, weight, kl_cap)
    else:
        kls = [adversary_kl(teacher_logits, a, tau, weight, kl_cap) for a in adversary_logits]
        kl = combine(kls) if combine is not None else torch.stack(kls).mean()
    ce = F.cross_entropy(teacher_logits, y)
    return ce - omega * tau**2 * kl, {"ce": ce.item(), "kl_adv": kl.item()}
