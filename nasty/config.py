"""Configs are data: TOML files (``tomllib``, no custom tags) over defaults, CLI flags over both.

One config file = one experiment. Sections: ``[data]``, ``[model]``, ``[train]``, ``[defense]``,
``[attack]``, ``[probe]``; ``[defense.train]`` and ``[probe.train]`` override ``[train]`` for the
defended teacher and the probe students. Unknown keys are errors with a "did you mean" hint.
The fully resolved config is saved as ``config.json`` beside every run.

Every key is declared once, as a :class:`nasty.params.Param` (type, default, range, help): here for
the command-level keys, and on the defense classes and the lock for the ``[defense]`` keys they read
(the schema asks the defenses). Validation, error messages and CLI options come from the declarations.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import torch

from .attacks import get_attack
from .attacks.base import parse_access
from .data import AUGMENTATIONS
from .defenses import check_defense_keys, defense_params, get_defense, split_model_specs
from .defenses.lock import LOCK_PARAMS
from .errors import InputShapeError, NastyError
from .models import create_model
from .models.locked import head_module
from .params import Param
from .registry import did_you_mean
from .train import OPTIMIZERS, SCHEDULES, TrainConfig

pos = lambda v: v > 0  # noqa: E731
nonneg = lambda v: v >= 0  # noqa: E731
unit = lambda v: 0 <= v <= 1  # noqa: E731
at_least_1 = lambda v: v >= 1  # noqa: E731

TRAIN_SCHEMA: dict[str, Param] = {
    "epochs": Param("int", 10, "Training epochs.", hi=100000),
    "batch_size": Param("int", 128, "Batch size.", hi=2**20),
    "optimizer": Param("str", "sgd", choices=OPTIMIZERS, help="Optimizer."),
    "lr": Param("float", 0.05, "Learning rate.", hi=10.0),
    "momentum": Param("float", 0.9, flag="", hi=1.0),
    "weight_decay": Param("float", 5e-4, flag="", hi=1.0),
    "schedule": Param("str", "cosine", choices=SCHEDULES, help="Learning-rate schedule."),
    "milestones": Param("list[int]", [], flag="", hi=100000),
    "gamma": Param("float", 0.1, flag=""),
    "seed": Param("int", 0, "Training seed.", hi=2**32 - 1),
    "deterministic": Param("bool", False, "Deterministic algorithms (reproducible on CPU)."),
    "select": Param("str", "best-val", flag=""),
    "grad_clip": Param("float?", None, flag=""),
    "label_smoothing": Param("float", 0.0, "Label smoothing of the cross-entropy.", lambda v: 0 <= v < 1, "in [0, 1)"),
}

SCHEMA: dict[str, dict[str, Param]] = {
    "data": {
        "dataset": Param("str", "digits", "digits (default), mnist, fashion-mnist, cifar10, cifar100, svhn, npz:PATH, imagefolder:PATH."),
        "data_root": Param("str?", None, "Folder holding the dataset files (default $NASTY_DATA_ROOT or ./data)."),
        "val_fraction": Param("float", 0.1, check=lambda v: 0 < v < 1, expect="in (0, 1)", flag=""),
        "split_seed": Param("int", 0, check=nonneg, expect=">= 0", flag="", hi=2**32 - 1),
        "train_subset": Param("int?", None, "Keep a stratified subset of N labelled training images.", at_least_1, ">= 1"),
        "download": Param("bool", False, "Allow torchvision to download missing data (needs internet)."),
        "augment": Param("str", "auto", "Training-data augmentation: auto (the dataset's default), none, crop or crop-flip "
                         "(the config's [data] augment).", choices=("auto", *AUGMENTATIONS), flag="--data-augment"),
    },
    "model": {"name": Param("str", "cnn", "Architecture, with options: e.g. cnn, resnet20, 'cnn:width=0.25'.", flag="--model")},
    "train": TRAIN_SCHEMA,
    "defense": {
        "name": Param("str", "nasty", "Training-time defense (see `nasty defenses`); default nasty.", flag="--defense"),
        "adversary": Param("list[str]", [], "Normal teacher checkpoint (repeatable). Without it one is trained first.", repeat=True),
        "adversary_model": Param("str?", None, "Architecture(s) of the adversaries trained when --adversary is absent, comma-separated "
                                 "(e.g. cnn,mlp; the first is the normal reference; default: --model)."),
        "init_from": Param("str?", None, "--lock none/two-net: fine-tune the nasty network from a checkpoint, or 'adversary' for the "
                           "(trained) adversary of the same architecture, instead of training from scratch (a two-head lock's head "
                           "always starts fresh)."),
        **LOCK_PARAMS,
        **defense_params(),
        "train": Param("train", {}, flag=""),
    },
    "attack": {
        "method": Param("str", "kd", "Attack (see `nasty attacks`); default kd."),
        "teacher": Param("list[str]", [], "Teacher checkpoint (repeatable for ensembles).", repeat=True),
        "student": Param("str", "mlp", "Student architecture, e.g. mlp or 'cnn:width=0.25'."),
        "temperature": Param("float", 4.0, "Distillation temperature T.", pos, "positive", hi=1000.0),
        "alpha": Param("float", 0.9, "Weight of the distillation term.", unit, "in [0, 1]"),
        "query": Param("str", "logits", "What the teacher exposes: logits, probs, topk:K, label, weights."),
        "queries": Param("int?", None, "Query budget: train on this many images (a fixed seeded subset).", at_least_1, ">= 1"),
        "labelled": Param("int?", None, "The thief's regime: how many of its --queries images carry labels; the rest are unlabelled "
                          "queries, and its validation split comes from the labelled ones.", at_least_1, ">= 1"),
        "surrogate": Param("str?", None, "Query the teacher on another dataset's images instead (unlabelled), e.g. mnist or npz:PATH."),
        "augment": Param("str", "none", "Distillation-time augmentation for soft-label attacks: none, mixup or cutmix (optionally :ALPHA)."),
        "options": Param("table", {}, flag=""),
    },
    "probe": {
        "enabled": Param("bool", True, flag=""),
        "students": Param("list[str]", ["mlp", "cnn:width=0.25"], "Comma-separated student architectures for the KD probe.",
                          flag="--probe-students"),
        "train_subset": Param("int?", None, "Labelled images the probe's students train on.", at_least_1, ">= 1", flag="--probe-subset"),
        "labelled": Param("int?", None, "The probe's thief regime: labelled images of its --probe-queries (the rest unlabelled); its "
                          "leakage is measured against the floors (labels only, hard-label) with self-tuning attacks.", at_least_1, ">= 1",
                          flag="--probe-labelled"),
        "queries": Param("int?", None, "The probe's thief regime: images the thief holds (default: every image of its pool).",
                         at_least_1, ">= 1", flag="--probe-queries"),
        "seeds": Param("int", 3, "Student seeds of the probe and of the strength's choice in the thief regime (at least 2 for "
                       "an interval; 3 by default).", lambda v: 1 <= v <= 100, "in 1..100", flag="--probe-seeds"),
        "attacks": Param("list[str]", ["kd", "rehead", "top1-confidence", "set-uniform", "confidence-label",
                                              "confidence-curriculum", "skeptical"],
                         "Attacks of the probe's thief regime (each tunes itself on the thief's validation split); by default "
                         "every thief of the served outputs, with those that read only the served confidence and runner-up set "
                         "(top1-confidence, set-uniform, confidence-label, confidence-curriculum) against a decision-locked teacher.",
                         flag="--probe-attacks"),
        "jobs": Param("int?", None, "Probe students trained at once, each in its own process with one thread (default: the "
                      "CPU cores; the numbers do not depend on it).", lambda v: 1 <= v <= 256, "in 1..256", flag="--jobs"),
        "temperature": Param("float", 4.0, check=pos, expect="positive", flag="", hi=1000.0),
        "alpha": Param("float", 0.9, check=unit, expect="in [0, 1]", flag=""),
        "train": Param("train", {}, flag=""),
    },
}


def defaults() -> dict[str, dict[str, Any]]:
    return {sec: {k: copy.deepcopy(p.default) for k, p in keys.items()} for sec, keys in SCHEMA.items()}


def _check_value(where: str, param: Param, value: Any) -> Any:
    """Type and range of one value (see :class:`nasty.params.Param`); a ``train`` table key by key."""
    if param.kind == "train":
        if not isinstance(value, dict):
            raise NastyError(f"{where} must be a table")
        return {k: _check_value(f"{where}.{k}", _train_param(where, k), v) for k, v in value.items()}
    return param.validate(where, value)


def _train_param(where: str, key: str) -> Param:
    if key not in TRAIN_SCHEMA:
        source, sep, path = where.rpartition(": ")
        raise NastyError(f"{source}{sep}unknown key {path}.{key}{did_you_mean(key, TRAIN_SCHEMA)}")
    return TRAIN_SCHEMA[key]


def merge(base: dict, overrides: dict, source: str) -> dict:
    """Validate ``overrides`` (nested dict) against the schema and merge it into ``base``."""
    out = copy.deepcopy(base)
    if not isinstance(overrides, dict):
        raise NastyError(f"{source}: a config must be a table of sections")
    for sec, table in overrides.items():
        if sec not in SCHEMA:
            raise NastyError(f"{source}: unknown section [{sec}]{did_you_mean(sec, SCHEMA)}")
        if not isinstance(table, dict):
            raise NastyError(f"{source}: [{sec}] must be a table, got {table!r}")
        for key, value in table.items():
            if key not in SCHEMA[sec]:
                raise NastyError(f"{source}: unknown key {sec}.{key}{did_you_mean(key, SCHEMA[sec])}")
            param = SCHEMA[sec][key]
            checked = _check_value(f"{source}: {sec}.{key}", param, value)
            if param.kind in ("train", "table"):
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


def validate(cfg: dict) -> None:
    """Cross-key checks of a merged config (each value's type and range were checked by :func:`merge`
    against its declaration): the training settings of every phase, model specs, the defense and its
    keys, the attack method and query. A bad value fails here, before any training starts, also one
    that only a later phase reads (the probe after the defended teacher, ``[defense.train]``)."""
    for sec in ("train", "defense", "probe"):
        table = cfg["train"] if sec == "train" else {**cfg["train"], **cfg[sec]["train"]}
        where = "[train]" if sec == "train" else f"[{sec}.train]"
        if not 0 <= table.get("label_smoothing", 0.0) < 1:
            raise NastyError(f"{where} label_smoothing must be in [0, 1), got {table['label_smoothing']!r}")
        try:
            train_config(cfg, None if sec == "train" else cfg[sec]["train"])
        except NastyError as e:
            raise NastyError(f"{where} {e}") from None
    for where, spec in model_specs(cfg):
        try:
            check_model_spec(spec, where)
        except InputShapeError:
            pass  # the data's own shape is not known yet: checked with it by check_model_specs, before any training
    try:
        head_module(cfg["defense"]["nasty_head"], 8, 2)
    except ValueError as e:
        raise NastyError(f"defense.nasty_head: {e}") from None
    if cfg["probe"]["enabled"] and not cfg["probe"]["students"]:
        raise NastyError("probe.students is empty; name at least one student or disable the probe")
    get_attack(cfg["attack"]["method"])
    for a in cfg["probe"]["attacks"]:
        cls = get_attack(a)
        if not cls.needs_teacher or cls.accepts == ("weights",):
            raise NastyError(f"probe.attacks: {a} is not a black-box attack on the served outputs (its floors are always trained)")
    if cfg["probe"]["queries"] is not None and cfg["probe"]["labelled"] is None:
        raise NastyError("probe.queries needs probe.labelled (the thief regime: how many of its images carry labels)")
    if cfg["probe"]["labelled"] is not None and cfg["probe"]["queries"] is not None and cfg["probe"]["labelled"] >= cfg["probe"]["queries"]:
        raise NastyError(f"probe.labelled {cfg['probe']['labelled']} must be smaller than probe.queries {cfg['probe']['queries']}")
    parse_access(cfg["attack"]["query"])
    check_defense_keys(get_defense(cfg["defense"]["name"]), cfg["defense"])


def model_specs(cfg: dict) -> list[tuple[str, str]]:
    """(where, spec) of every model a config names."""
    specs = [("model.name", cfg["model"]["name"]), ("attack.student", cfg["attack"]["student"])]
    specs += [(f"probe.students[{i}]", s) for i, s in enumerate(cfg["probe"]["students"])]
    specs += [("defense.adversary_model", s) for s in split_model_specs(cfg["defense"]["adversary_model"])]
    return specs


def check_model_specs(cfg: dict, num_classes: int, in_channels: int, image_size: tuple[int, int]) -> None:
    """Every model of ``cfg`` built on the meta device for the loaded dataset's real input shape
    (called when the data is loaded, before any training)."""
    for where, spec in model_specs(cfg):
        check_model_spec(spec, where, num_classes, in_channels, image_size)


# The most parameters (and buffer entries) of a model nasty builds, counted on the meta device by
# check_model_spec before any model is built for real.
MAX_PARAMETERS = 2_000_000_000


def check_model_spec(spec: str, where: str, num_classes: int = 10, in_channels: int = 3,
                     image_size: tuple[int, int] = (32, 32)) -> None:
    """Build ``spec`` on the meta device (no memory, no weights; at most :data:`MAX_PARAMETERS`), so a typo or a bad option fails at
    config time rather than when that model's phase starts. Before the data is loaded the input is a
    guess (3x32x32): a model that cannot take it raises :class:`InputShapeError`, which
    :func:`check_config` leaves to :func:`check_model_specs` with the data's real shape."""
    try:
        with torch.device("meta"):
            model = create_model(spec, num_classes, in_channels, image_size)
    except InputShapeError as e:
        raise InputShapeError(f"{where}: {e}") from None
    except NastyError as e:
        raise NastyError(f"{where}: {e}") from None
    except Exception as e:  # a constructor rejecting a value in its own way
        raise NastyError(f"{where}: model {spec!r} cannot be built ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    n = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    if n > MAX_PARAMETERS:
        raise NastyError(f"{where}: model {spec!r} has {n:.3g} parameters, more than the {MAX_PARAMETERS:.0e} nasty builds")


def train_config(cfg: dict, override: dict | None = None, **extra: Any):
    """The :class:`TrainConfig` of ``cfg['train']`` with ``override`` (a ``[x.train]`` table) applied."""
    t = {**cfg["train"], **(override or {}), **extra}
    t.pop("label_smoothing", None)
    return TrainConfig(**t)
