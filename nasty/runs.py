"""Run directories, data from a config, and normal (supervised) training of a teacher or baseline.

One run = one output directory holding ``config.json`` (the resolved config), the checkpoint
(``model.safetensors`` + ``model.json``), ``metrics.jsonl`` and a result JSON. An existing,
non-empty directory is never overwritten without ``force``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from .checkpoint import atomic_write_json, save_checkpoint
from .config import train_config
from .data import DataBundle, load_dataset
from .errors import NastyError
from .metrics import evaluate
from .models import create_model
from .train import ce_objective, fit, seed_everything


def prepare_out_dir(out: str | Path | None, force: bool, default_name: str) -> Path:
    path = Path(out) if out else Path("runs") / f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and not path.is_dir():
        raise NastyError(f"--out {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise NastyError(f"output directory {path} is not empty; pass --force to overwrite it or choose another --out")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NastyError(f"cannot create output directory {path}: {e.strerror}") from None
    return path


def data_from_config(cfg: dict, *, normalization=None, train_subset: Any = "config") -> DataBundle:
    d = cfg["data"]
    return load_dataset(
        d["dataset"], d["data_root"], val_fraction=d["val_fraction"], split_seed=d["split_seed"],
        train_subset=d["train_subset"] if train_subset == "config" else train_subset,
        download=d["download"], augment=d["augment"], normalization=normalization,
    )


def new_model(spec: str, data: DataBundle) -> nn.Module:
    return create_model(spec, data.num_classes, data.in_channels, data.image_size)


def save_model(out_dir: Path, model: nn.Module, data: DataBundle, cfg: dict, metrics: dict, extra: dict | None = None) -> Path:
    return save_checkpoint(out_dir, model, classes=data.classes, input_shape=(data.in_channels, *data.image_size),
                           mean=data.mean, std=data.std, dataset=data.name, config=cfg, metrics=metrics, extra=extra)


def test_metrics(model: nn.Module, data: DataBundle, reference_pred=None) -> dict:
    return evaluate(model, data.x_test, data.y_test, data.num_classes, reference_pred)


def train_normal(cfg: dict, data: DataBundle, out_dir: Path, *, model_spec: str | None = None,
                 train_override: dict | None = None, log: Callable[[str], None] | None = None, desc: str = "teacher") -> tuple[nn.Module, dict]:
    """Supervised training (CE, optional label smoothing); saves the checkpoint into ``out_dir``."""
    tcfg = train_config(cfg, train_override)
    smoothing = {**cfg["train"], **(train_override or {})}["label_smoothing"]
    seed_everything(tcfg.seed, tcfg.deterministic)  # the initial weights depend on the seed too
    model = new_model(model_spec or cfg["model"]["name"], data)
    res = fit(model, ce_objective(smoothing), data, tcfg, run_dir=out_dir, desc=desc, **({"log": log} if log else {}))
    metrics = {"test": test_metrics(model, data), "best_epoch": res.best_epoch, "val_accuracy": res.best_val_accuracy,
               "train_seconds": res.seconds}
    save_model(out_dir, model, data, cfg, metrics)
    atomic_write_json(out_dir / "config.json", cfg)
    return model, metrics
