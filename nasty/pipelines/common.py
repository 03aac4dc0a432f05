"""What every pipeline does with a teacher checkpoint: read its normalisation, open it for a dataset."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ..checkpoint import check_compatible, load_checkpoint, read_sidecar


def normalization(side: dict) -> tuple[list[float], list[float]]:
    """The input normalisation a checkpoint was trained with (its sidecar's ``(mean, std)``)."""
    return list(side["normalization"]["mean"]), list(side["normalization"]["std"])


def teacher_normalization(path: str | Path) -> tuple[list[float], list[float]]:
    """The normalisation of the checkpoint at ``path`` (read from its sidecar only)."""
    return normalization(read_sidecar(path)[1])


def open_teacher(path: str | Path, data, what: str = "teacher") -> tuple[nn.Module, dict]:
    """Load a checkpoint (no pickle) and check it fits ``data`` (classes, input shape, normalisation)."""
    model, side = load_checkpoint(path)
    check_compatible(side, data, f"{what} {path}")
    return model, side
