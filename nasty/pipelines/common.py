"""What every pipeline does with a teacher checkpoint: read its normalisation, open it for a dataset."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ..checkpoint import check_compatible, load_checkpoint, read_sidecar
from ..runs import data_from_config


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


def teacher_subset(path: str | Path, cfg: dict) -> int | None:
    """How many training images the checkpoint at ``path`` trained on when that was a ``train_subset`` of
    the same dataset and split as ``cfg``'s (so a thief's images can be kept apart from them), else ``None``.
    ``cfg`` may name no subset or the teacher's own (the owner's config, which the teacher trained with); a
    different subset is the user's choice of the thief's images, and is kept."""
    side = read_sidecar(path)[1]
    theirs = (side.get("config") or {}).get("data") or {}
    d = cfg["data"]
    k = theirs.get("train_subset")
    if not isinstance(k, int) or isinstance(k, bool) or d["train_subset"] not in (None, k):
        return None
    if theirs.get("dataset") != d["dataset"] or theirs.get("split_seed", 0) != d["split_seed"]:
        return None
    return k


def thief_data(cfg: dict, teachers: list[str | Path], norm, log=None):
    """The thief's data (``--labelled``): the training split, minus the images the teacher trained on
    when its checkpoint says it trained on a ``train_subset`` of the same split (the first teacher's);
    otherwise the thief's images overlap the teacher's training images, and a note says so."""
    k = teacher_subset(teachers[0], cfg) if teachers else None
    if k is None:
        return data_from_config(cfg, normalization=norm), ("the thief's images come from the training split the teacher trained on "
                                                           "(train the teacher with --train-subset to keep them apart)")
    data = data_from_config(cfg, normalization=norm, train_subset=None, exclude_subset=k)
    return data, f"the thief's images are the {len(data.y_train) + len(data.y_val)} training images the teacher never saw " \
                 f"(it trained on a subset of {k})"
