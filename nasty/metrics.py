"""Accuracy, per-class accuracy, confusion matrix and teacher agreement: the one metrics module."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


@torch.no_grad()
def predict_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode (mode restored afterwards)."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0)
    finally:
        if was_training:
            model.train()


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
