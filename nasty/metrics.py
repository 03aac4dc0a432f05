"""Accuracy, per-class accuracy, confusion matrix, teacher agreement, what served probabilities give a
user (top-k, calibration, NLL) and what they say beyond the class (CMI): the one metrics module."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import torch.nn as nn


@torch.no_grad()
def predict_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode (mode and memory layout restored afterwards). A
    convolutional model runs in channels-last layout where that is safe (:func:`use_channels_last`) and at
    batch 256: 2-3x faster per image than the default layout at batch 1024 on CPU (docs/results.md,
    the cost benchmark); the logits agree up to float rounding."""
    was_training = isinstance(model, nn.Module) and model.training
    relayout = isinstance(model, nn.Module) and not _channels_last(model) and _has_conv(model) and use_channels_last(x, [model])
    if isinstance(model, nn.Module):
        model.eval()
        if relayout:
            model.to(memory_format=torch.channels_last)
    try:
        if not len(x):
            return torch.zeros(0)
        xs = x.contiguous(memory_format=torch.channels_last) if relayout or (isinstance(model, nn.Module) and _channels_last(model) and x.dim() == 4) else x
        return torch.cat([model(xs[i : i + batch_size]) for i in range(0, len(xs), batch_size)])
    finally:
        if relayout:
            model.to(memory_format=torch.contiguous_format)
        if was_training:
            model.train()


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _channels_last(model: nn.Module) -> bool:
    """Whether ``model`` is already in channels-last layout (e.g. inside training): a 4-d weight whose layout
    tells the two apart (one input channel or a 1x1 kernel fits both) is channels-last."""
    return any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters())


def confusion_matrix(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``cm[i, j]`` = number of samples of true class i predicted as j."""
    return torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float | None]:
    """Percent correct per true class; ``None`` for classes absent from ``y``."""
    cm = confusion_matrix(pred, y, num_classes)
    support = cm.sum(1)
    return [float(100.0 * cm[c, c] / support[c]) if support[c] else None for c in range(num_classes)]


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(100.0 * (pred == y).float().mean()) if len(y) else float("nan")


def agreement(pred_a: torch.Tensor, pred_b: torch.Tensor) -> float:
    """Percent of samples on which two models predict the same class."""
    return float(100.0 * (pred_a == pred_b).float().mean())


def evaluate(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, num_classes: int,
             reference_pred: torch.Tensor | None = None) -> dict:
    """Overall/per-class accuracy and the confusion matrix; with ``reference_pred``, agreement too."""
    pred = predict_logits(model, x).argmax(1)
    out = {
        "accuracy": accuracy(pred, y),
        "per_class_accuracy": per_class_accuracy(pred, y, num_classes),
        "confusion_matrix": confusion_matrix(pred, y, num_classes).tolist(),
        "n": int(len(y)),
    }
    if reference_pred is not None:
        out["teacher_agreement"] = agreement(pred, reference_pred)
    return out


def topk_hits(p: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the expected top-``k`` hit of the true class when ties in ``p`` are broken uniformly at
    random: 1 when fewer than ``k`` classes beat it and the true class's tie group fits in the slots left,
    ``slots / group size`` when its tie group straddles the boundary, 0 when ``k`` classes beat it. A
    one-hot output has ``C - 1`` tied zeros, so a wrong answer hits the top-5 with probability 4/9 on 10
    classes, not 1 (an index tie-break would make labels alone look like 99% top-5)."""
    py = p.gather(1, y[:, None])
    above = (p > py).sum(1)
    tied = (p == py).sum(1)  # the true class's tie group, itself included (none when the row is NaN: no hit)
    return (k - above).clamp(min=0).minimum(tied).to(torch.float64) / tied.clamp_min(1).to(torch.float64)


def expected_calibration_error(p: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """ECE in percent: ``sum_b |B_b|/n * |acc(B_b) - conf(B_b)|`` over equal-width confidence bins
    of the top-1 probability (Guo et al. 2017); a row's accuracy is its expected top-1 hit under a random
    tie-break (:func:`topk_hits`)."""
    conf = p.max(1).values.to(torch.float64)
    correct = topk_hits(p, y, 1)
    idx = (conf * bins).long().clamp(0, bins - 1)
    n = len(y)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += float(m.sum()) / n * abs(float(correct[m].mean()) - float(conf[m].mean()))
    return 100.0 * ece


NLL_FLOOR = 1e-12  # the served probability of the true class is clipped here: a withheld class costs 27.6 nats, not infinity


def quality_of_probabilities(p: torch.Tensor, y: torch.Tensor) -> dict:
    """``top1``, ``top5`` (expected hits under a random tie-break, percent), ``ece`` (15 bins, percent) and
    ``nll`` (mean ``-log`` of the true class's probability clipped at :data:`NLL_FLOOR`, nats) of
    probability rows ``p``."""
    if not len(y):
        return {"top1": float("nan"), "top5": float("nan"), "ece": float("nan"), "nll": float("nan")}
    p = p.detach().to(torch.float64)
    k = min(5, p.shape[1])
    nll = -torch.log(p.gather(1, y[:, None]).squeeze(1).clamp_min(NLL_FLOOR))
    return {"top1": float(100.0 * topk_hits(p, y, 1).mean()), "top5": float(100.0 * topk_hits(p, y, k).mean()),
            "ece": expected_calibration_error(p, y), "nll": float(nll.mean())}


def served_probabilities(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """What a client receives: ``softmax`` of the served logits at temperature 1 (``-inf`` for a withheld class gives 0)."""
    return torch.softmax(predict_logits(model, x).to(torch.float64), 1)


def served_quality(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict:
    """What a model's served probabilities still give a legitimate user: top-1 and top-5 accuracy
    (ties broken at random), calibration error (ECE, 15 bins), all in percent, and NLL in nats
    (:func:`quality_of_probabilities`)."""
    return quality_of_probabilities(served_probabilities(model, x), y)


def class_conditional_mi(log_p: torch.Tensor, y: torch.Tensor, leave_one_out: bool, floor: float = 1e-12) -> torch.Tensor:
    """``mean_i KL(P_i || Q_i)`` in nats for log-probability rows ``log_p`` and classes ``y``: the
    conditional mutual information of the outputs given the class, estimated from these samples.
    ``Q_i`` is the mean ``P`` of the samples of class ``y_i``: with ``leave_one_out`` without sample ``i``,
    ``(n_c Q_c - P_i) / (n_c - 1)``, and then a sample alone in its class has no ``Q_i`` and is left out of
    the mean (0 when every sample is alone); else with it (the plug-in form, biased low by the sample's own
    share of its mean, and finite even for one-hot outputs). ``Q`` is floored at ``floor``. Computed in
    float64 (the leave-one-out difference would cancel in float32); differentiable."""
    dtype = log_p.dtype
    log_p = log_p.to(torch.float64).clamp_min(-745.0)  # exp(-745) is the last float64 above 0: a withheld class weighs 0, not NaN
    p = log_p.exp()
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
    n_c = onehot.sum(0)
    sums = onehot.T @ p
    if leave_one_out:
        n_i = n_c[y]
        keep = n_i > 1
        if not keep.any():
            return (log_p.sum() * 0).to(dtype)
        q = (sums[y] - p) / (n_i - 1).clamp_min(1)[:, None]
    else:
        keep = torch.ones_like(y, dtype=torch.bool)
        q = sums[y] / n_c[y][:, None]
    kl = (p * (log_p - torch.log(q.clamp_min(floor)))).sum(1)
    return kl[keep].mean().to(dtype)


def served_cmi(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """The conditional mutual information (nats) of a model's served probabilities (temperature 1, what a
    thief receives) given the true class, over the whole split ``x``: ``Q_c`` is the mean served output
    of class ``c`` over the split (the plug-in form of :func:`class_conditional_mi`). 0 when the outputs
    are a function of the class; labels-only outputs of a model that errs score above 0 (their decision
    says something beyond the class)."""
    if not len(y):
        return float("nan")
    log_p = torch.log_softmax(predict_logits(model, x).to(torch.float64), 1)
    return float(class_conditional_mi(log_p, y, leave_one_out=False))


def use_channels_last(x: torch.Tensor, models: Sequence[nn.Module] = ()) -> bool:
    """Train convolutional models on image batches in channels-last layout where that is known to be
    safe (the environment variable ``NASTY_CHANNELS_LAST=0`` turns it off everywhere). Only the
    memory layout changes: the results agree with the default layout up to float rounding.

    Not safe: a model with a strided 1x1 convolution of fewer than 16 input channels per group
    (:func:`channels_last_hazard`). oneDNN computes its weight gradient in channels-last with the
    ``jit_1x1`` backward-weights kernel, whose reduce-to-unit-stride workspace is sized for the
    input channels but written in blocks of 8 (AVX2) or 16 (AVX-512) channels: a heap overrun
    ("corrupted size vs. prev_size", e.g. resnet20:width=0.25 on digits, one thread), or silently
    corrupted memory. Such models train in the default layout (NCHW), which uses another kernel."""
    if x.dim() != 4 or os.environ.get("NASTY_CHANNELS_LAST", "1") == "0":
        return False
    return not any(channels_last_hazard(m) for m in models)


CHANNELS_LAST_MIN_1X1_STRIDED_IC = 16  # the channel block of the AVX-512 kernel (AVX2: 8)


def channels_last_hazard(model: nn.Module) -> str | None:
    """The first convolution of ``model`` that channels-last training may corrupt memory in (see
    :func:`use_channels_last`), described, or ``None``."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and tuple(mod.kernel_size) == (1, 1) and max(mod.stride) > 1 \
                and mod.in_channels // mod.groups < CHANNELS_LAST_MIN_1X1_STRIDED_IC:
            return f"{name}: 1x1 convolution, stride {tuple(mod.stride)}, {mod.in_channels // mod.groups} input channels per group"
    return None
