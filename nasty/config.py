"""Configs are data: TOML files (``tomllib``, no custom tags) over defaults, CLI flags over both.

One config file = one experiment. Sections: ``[data]``, ``[model]``, ``[train]``, ``[defense]``,
``[attack]``, ``[probe]``; ``[defense.train]`` and ``[probe.train]`` override ``[train]`` for the
defended teacher and the probe students. Unknown keys are errors with a "did you mean" hint.
The fully resolved config is saved as ``config.json`` beside every run.
"""

from __future__ import annotations

import copy
import difflib
import tomllib
from pathlib import Path
from typing import Any

from .errors import NastyError

# type tags: int, float, str, bool, "?" suffix = may be null/absent, list[int], list[str], train (table)
TRAIN_SCHEMA: dict[str, tuple[str, Any]] = {
    "epochs": ("int", 10),
    "batch_size": ("int", 128),
    "optimizer": ("str", "sgd"),
    "lr": ("float", 0.05),
    "momentum": ("float", 0.9),
    "weight_decay": ("float", 5e-4),
    "schedule": ("str", "cosine"),
    "milestones": ("list[int]", []),
    "gamma": ("float", 0.1),
    "seed": ("int", 0),
    "deterministic": ("bool", False),
    "select": ("str", "best-val"),
    "grad_clip": ("float?", None),
    "label_smoothing": ("float", 0.0),
}

SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "data": {
        "dataset": ("str", "digits"),
        "data_root": ("str?", None),
        "val_fraction": ("float", 0.1),
        "split_seed": ("int", 0),
        "train_subset": ("int?", None),
        "download": ("bool", False),
        "augment": ("str", "auto"),
    },
    "model": {"name": ("str", "cnn")},
    "train": TRAIN_SCHEMA,
    "defense": {
        "name": ("str", "nasty"),
        "tau": ("float", 4.0),
        "omega": ("float", 0.04),
        "omega_warmup": ("int", 0),
        "kl_cap": ("float?", None),
        "adversary": ("list[str]", []),
        "adversary_model": ("str?", None),
        "init_from": ("str?", None),
        "protect_classes": ("list[str]", []),
        "max_accuracy_drop": ("float?", None),
        "train": ("train", {}),
    },
    "attack": {
        "method": ("str", "kd"),
        "teacher": ("list[str]", []),
        "student": ("str", "mlp"),
        "temperature": ("float", 4.0),
        "alpha": ("float", 0.9),
        "query": ("str", "logits"),
        "queries": ("int?", None),
        "surrogate": ("str?", None),
        "augment": ("str", "none"),
        "options": ("table", {}),
    },
    "probe": {
        "enabled": ("bool", True),
        "students": ("list[str]", ["mlp", "cnn:width=0.25"]),
        "train_subset": ("int?", None),
        "temperature": ("float", 4.0),
        "alpha": ("float", 0.9),
        "train": ("train", {}),
    },
}


def defaults() -> dict[str, dict[str, Any]]:
    return {sec: {k: copy.deepcopy(v[1]) for k, v in keys.items()} for sec, keys in SCHEMA.items()}


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_value(where: str, tag: str, value: Any) -> Any:
    nullable = tag.endswith("?")
    base = tag.rstrip("?")
    if value is None:
        if nullable:
            return None
        raise NastyError(f"{where} must not be empty")
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise NastyError(f"{where} must be an integer, got {value!r}")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise NastyError(f"{where} must be a number, got {value!r}")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise NastyError(f"{where} must be a string, got {value!r}")
        return value
    if base == "bool":
        if not isinstance(value, bool):
            raise NastyError(f"{where} must be true or false, got {value!r}")
        return value
    if base.startswith("list["):
        inner = base[5:-1]
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise NastyError(f"{where} must be a list, got {value!r}")
        return [_check_value(f"{where}[{i}]", inner, v) for i, v in enumerate(value)]
    if base == "train":
        if not isinstance(value, dict):
            raise NastyError(f"{where} must be a table")
        return {k: _check_value(f"{where}.{k}", _train_tag(where, k), v) for k, v in value.items()}
    if base == "table":
        if not isinstance(value, dict):
            raise NastyError(f"{where} must be a table")
        return value
    raise AssertionError(tag)


def _train_tag(where: str, key: str) -> str:
    if key not in TRAIN_SCHEMA:
        raise NastyError(f"unknown key {where}.{key}{_suggest(key, TRAIN_SCHEMA)}")
    return TRAIN_SCHEMA[key][0]


def merge(base: dict, overrides: dict, source: str) -> dict:
    """Validate ``overrides`` (nested dict) against the schema and merge it into ``base``."""
    out = copy.deepcopy(base)
    if not isinstance(overrides, dict):
        raise NastyError(f"{source}: a config must be a table of sections")
    for sec, table in overrides.items():
        if sec not in SCHEMA:
            raise NastyError(f"{source}: unknown section [{sec}]{_suggest(sec, SCHEMA)}")
        if not isinstance(table, dict):
            raise NastyError(f"{source}: [{sec}] must be a table, got {table!r}")
        for key, value in table.items():
            if key not in SCHEMA[sec]:
                raise NastyError(f"{source}: unknown key {sec}.{key}{_suggest(key, SCHEMA[sec])}")
            tag = SCHEMA[sec][key][0]
            checked = _check_value(f"{source}: {sec}.{key}", tag, value)
            if tag in ("train", "table"):
                out[sec][key] = {**out[sec][key], **checked}
            else:
                out[sec][key] = checked
    return out


def load_config(path: str | Path | None, cli: dict | None = None) -> dict:
    """Defaults, then the TOML file, then CLI overrides (nested dict, ``None`` values ignored)."""
    cfg = defaults()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise NastyError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise NastyError(f"{p}: invalid TOML ({e})") from None
        cfg = merge(cfg, data, str(p))
    if cli:
        cleaned = {sec: {k: v for k, v in t.items() if v is not None} for sec, t in cli.items()}
        cfg = merge(cfg, {s: t for s, t in cleaned.items() if t}, "option")
    return cfg


def train_config(cfg: dict, override: dict | None = None, **extra: Any):
    """The :class:`TrainConfig` of ``cfg['train']`` with ``override`` (a ``[x.train]`` table) applied."""
    from .train import TrainConfig

    t = {**cfg["train"], **(override or {}), **extra}
    t.pop("label_smoothing", None)
    return TrainConfig(**t)
