"""Configs are data: TOML files (``tomllib``, no custom tags) over defaults, CLI flags over both.

One config file = one experiment. Sections: ``[data]``, ``[model]``, ``[train]``, ``[defense]``,
``[attack]``, ``[probe]``; ``[defense.train]`` and ``[probe.train]`` override ``[train]`` for the
defended teacher and the probe students. Unknown keys are errors with a "did you mean" hint.
The fully resolved config is saved as ``config.json`` beside every run.
"""

from __future__ import annotations

import copy
import difflib
import math
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
        "omega": ("float?", None),  # None: chosen from omega_grid on validation (locked), 0.04 with lock = "none"
        "omega_grid": ("list[float]", [0.1, 0.3, 1.0]),
        "lock": ("str", "two-head"),  # none (the paper's single network), two-head or two-net
        "nasty_head": ("str", "linear"),  # two-head: linear or mlp:hidden=H
        "lock_rule": ("str", "swap"),  # how the decision is imposed: swap or margin
        "lock_margin": ("float", 0.0),
        "cmi": ("float", 10.0),  # two-head: weight of the conditional mutual information of the head's outputs given the class
        "head_epochs": ("int?", None),  # two-head: epochs of the head on cached features (default: about 3000 steps)
        "omega_warmup": ("int", 0),
        "kl_cap": ("float?", None),
        "adversary": ("list[str]", []),
        "adversary_model": ("str?", None),
        "init_from": ("str?", None),
        "protect_classes": ("list[str]", []),
        "max_accuracy_drop": ("float?", None),
        "protect_by": ("str", "label"),  # class-selective: label, mass or both
        "anchor": ("float", 0.0),  # class-selective: weight of KL(adversary || teacher) on unprotected images
        "combine": ("str", "mean"),  # several adversaries: mean, sum or min
        "dual_lr": ("float", 0.5),  # budget: step of the multiplicative omega update
        "omega_max": ("float?", None),  # budget: upper bound of omega (default 1.0)
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
        if not math.isfinite(value):  # TOML allows nan and inf
            raise NastyError(f"{where} must be a finite number, got {value!r}")
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
        source, sep, path = where.rpartition(": ")
        raise NastyError(f"{source}{sep}unknown key {path}.{key}{_suggest(key, TRAIN_SCHEMA)}")
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
        if not p.is_file():  # a FIFO or device named x.toml is refused unread (reading one could block forever)
            raise NastyError(f"config file {p} is not a regular file" if p.exists() else f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise NastyError(f"{p}: invalid TOML ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        except RecursionError:
            raise NastyError(f"{p}: invalid TOML (nested too deeply)") from None
        except OSError as e:
            raise NastyError(f"cannot read config file {p}: {e.strerror or e}") from None
        cfg = merge(cfg, data, str(p))
    if cli:
        cleaned = {sec: {k: v for k, v in t.items() if v is not None} for sec, t in cli.items()}
        cfg = merge(cfg, {s: t for s, t in cleaned.items() if t}, "option")
    validate(cfg)
    return cfg


# Ranges checked when a config is loaded, so that a bad value fails before any training starts,
# also one that only a later phase reads (the probe after the defended teacher, [defense.train]).
RANGES: dict[tuple[str, str], tuple[Any, str]] = {
    ("data", "val_fraction"): (lambda v: 0 < v < 1, "in (0, 1)"),
    ("data", "split_seed"): (lambda v: v >= 0, ">= 0"),
    ("data", "train_subset"): (lambda v: v >= 1, ">= 1"),
    ("train", "label_smoothing"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("defense", "tau"): (lambda v: v > 0, "> 0"),
    ("defense", "omega"): (lambda v: v >= 0, ">= 0"),
    ("defense", "omega_warmup"): (lambda v: v >= 0, ">= 0"),
    ("defense", "omega_grid"): (lambda v: all(o >= 0 for o in v), "a list of numbers >= 0"),
    ("defense", "lock"): (lambda v: v in ("none", "two-head", "two-net"), "none, two-head or two-net"),
    ("defense", "lock_rule"): (lambda v: v in ("swap", "margin"), "swap or margin"),
    ("defense", "lock_margin"): (lambda v: 0 <= v <= 100, "in [0, 100]"),
    ("defense", "cmi"): (lambda v: 0 <= v <= 1e6, "in [0, 1e6]"),
    ("defense", "head_epochs"): (lambda v: 1 <= v <= 100000, "in 1..100000"),
    ("defense", "kl_cap"): (lambda v: v > 0, "> 0"),
    ("defense", "max_accuracy_drop"): (lambda v: v > 0, "> 0"),
    ("defense", "dual_lr"): (lambda v: v > 0, "> 0"),
    ("defense", "omega_max"): (lambda v: v > 0, "> 0"),
    ("defense", "protect_by"): (lambda v: v in ("label", "mass", "both"), "label, mass or both"),
    ("defense", "anchor"): (lambda v: v >= 0, "a number >= 0"),
    ("defense", "combine"): (lambda v: v in ("mean", "sum", "min"), "mean, sum or min"),
    ("attack", "temperature"): (lambda v: v > 0, "> 0"),
    ("attack", "alpha"): (lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("attack", "queries"): (lambda v: v >= 1, ">= 1"),
    ("probe", "temperature"): (lambda v: v > 0, "> 0"),
    ("probe", "alpha"): (lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("probe", "train_subset"): (lambda v: v >= 1, ">= 1"),
}


def validate(cfg: dict) -> None:
    """Cross-key checks of a merged config (types are checked by :func:`merge`): value ranges, the
    training settings of every phase, augmentation, model specs, attack method and query."""
    for (sec, key), (ok, text) in RANGES.items():
        v = cfg.get(sec, {}).get(key)
        if v is not None and not ok(v):
            raise NastyError(f"{sec}.{key} must be {text}, got {v!r}")
    for sec in ("train", "defense", "probe"):
        table = cfg["train"] if sec == "train" else {**cfg["train"], **cfg[sec]["train"]}
        where = "[train]" if sec == "train" else f"[{sec}.train]"
        if not 0 <= table.get("label_smoothing", 0.0) < 1:
            raise NastyError(f"{where} label_smoothing must be in [0, 1), got {table['label_smoothing']!r}")
        try:
            train_config(cfg, None if sec == "train" else cfg[sec]["train"])
        except NastyError as e:
            raise NastyError(f"{where} {e}") from None
    from .data import AUGMENTATIONS

    if cfg["data"]["augment"] not in ("auto", *AUGMENTATIONS):
        raise NastyError(f"data.augment must be auto, {', '.join(AUGMENTATIONS)}; got {cfg['data']['augment']!r}")
    specs = [("model.name", cfg["model"]["name"]), ("attack.student", cfg["attack"]["student"])]
    specs += [(f"probe.students[{i}]", s) for i, s in enumerate(cfg["probe"]["students"])]
    if cfg["defense"]["adversary_model"]:
        from .defenses import split_model_specs

        specs += [("defense.adversary_model", s) for s in split_model_specs(cfg["defense"]["adversary_model"])]
    for where, spec in specs:
        check_model_spec(spec, where)
    from .models.locked import head_module

    try:
        head_module(cfg["defense"]["nasty_head"], 8, 2)
    except ValueError as e:
        raise NastyError(f"defense.nasty_head: {e}") from None
    if cfg["probe"]["enabled"] and not cfg["probe"]["students"]:
        raise NastyError("probe.students is empty; name at least one student or disable the probe")
    from .attacks import get_attack
    from .attacks.base import parse_access
    from .defenses import get_defense

    get_attack(cfg["attack"]["method"])
    parse_access(cfg["attack"]["query"])
    get_defense(cfg["defense"]["name"])


def check_model_spec(spec: str, where: str) -> None:
    """Build ``spec`` on the meta device (no memory, no weights) for a 10-class 3x32x32 input, so a
    typo or a bad option fails at config time rather than when that model's phase starts."""
    import torch

    from .models import create_model

    try:
        with torch.device("meta"):
            create_model(spec, 10, 3, (32, 32))
    except NastyError as e:
        raise NastyError(f"{where}: {e}") from None
    except Exception as e:  # a constructor rejecting a value in its own way
        raise NastyError(f"{where}: model {spec!r} cannot be built ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def train_config(cfg: dict, override: dict | None = None, **extra: Any):
    """The :class:`TrainConfig` of ``cfg['train']`` with ``override`` (a ``[x.train]`` table) applied."""
    from .train import TrainConfig

    t = {**cfg["train"], **(override or {}), **extra}
    t.pop("label_smoothing", None)
    return TrainConfig(**t)
