"""Accuracy, per-class accuracy, confusion matrix and teacher agreement: the one metrics module."""

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


def expected_calibration_error(p: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """ECE in percent: ``sum_b |B_b|/n * |acc(B_b) - conf(B_b)|`` over equal-width confidence bins
    of the top-1 probability (Guo et al. 2017)."""
    conf, pred = p.max(1)
    correct = (pred == y).float()
    idx = (conf * bins).long().clamp(0, bins - 1)
    n = len(y)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += float(m.sum()) / n * abs(float(correct[m].mean()) - float(conf[m].mean()))
    return 100.0 * ece


def served_quality(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict:
    """What a model's served probabilities still give a legitimate user: top-1 and top-5 accuracy
    and calibration error (ECE, 15 bins), all in percent."""
    z = predict_logits(model, x)
    p = torch.softmax(z, 1)
    k = min(5, p.shape[1])
    top5 = (p.topk(k, 1).indices == y[:, None]).any(1)
    return {"top1": accuracy(p.argmax(1), y), "top5": float(100.0 * top5.float().mean()), "ece": expected_calibration_error(p, y)}


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
