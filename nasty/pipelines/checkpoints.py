"""Jobs on checkpoints: ``nasty lock`` (two checkpoints -> one locked artifact), ``nasty eval`` (a
checkpoint's accuracy, per class and as a confusion matrix) and ``nasty convert`` (a weights-only
PyTorch state dict -> a safe checkpoint)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..checkpoint import (check_compatible, legacy_budget, load_checkpoint, load_legacy_state, read_legacy_state_dict,
                          read_sidecar, save_checkpoint, split_settings)
from ..config import load_config
from ..data import load_dataset
from ..defenses.lock import LOCK_PARAMS, assemble, check_lock_defends, describe_lock
from ..errors import NastyError
from ..metrics import evaluate
from ..models.locked import LockedTeacher
from ..models.served import check_keep_classes, parse_keep
from ..runs import data_from_config, new_model, prepare_out_dir, save_model, test_metrics
from .common import normalization


def lock_job(decision: str, nasty_part: str, out: str, *, rule: str = "swap", margin: float = 0.0, keep: str = LOCK_PARAMS["keep"].default,
             force: bool = False) -> dict:
    """Lock ``nasty_part`` to ``decision``'s decisions, serving what ``keep`` says (``confidence:bins=B``:
    calibrated on the validation split of the decision model's dataset); save the two-net artifact into ``out``."""
    LOCK_PARAMS["lock_rule"].validate("--lock-rule", rule)
    LOCK_PARAMS["lock_margin"].validate("--lock-margin", margin)
    LOCK_PARAMS["keep"].validate("--keep", keep)
    model, side, nside = _lock(decision, nasty_part, rule, margin, keep)
    folder = prepare_out_dir(out, force, "locked")
    mean, std = normalization(side)
    save_checkpoint(folder, model, classes=side["classes"], input_shape=tuple(side["input_shape"]), mean=mean, std=std,
                    dataset=side["dataset"], config={"lock": {"decision": str(decision), "nasty": str(nasty_part)}},
                    extra={"defense": nside.get("defense", {"name": "locked"}),
                           "lock": {"decision": str(decision), "nasty": str(nasty_part), "rule": rule, "margin": margin, "keep": keep}})
    return {"checkpoint": str(folder), "decision": str(decision), "nasty": str(nasty_part), "lock_rule": rule, "keep": keep}


def _lock(decision_path: str, nasty_path: str, lock: str = "swap", margin: float = 0.0,
          keep: str = "decision") -> tuple[LockedTeacher, dict, dict]:
    """A two-net lock from two existing checkpoints (e.g. a nasty teacher trained with ``--lock none``
    and the normal model it was trained against). Both must agree on classes, input shape and
    normalisation, and neither may already be locked; returns the model and both sidecars."""
    sides = {}
    for what, path in (("decision", decision_path), ("nasty", nasty_path)):
        _, side = read_sidecar(path)
        if describe_lock(side):
            raise NastyError(f"{path} is {describe_lock(side)}; a lock needs two plain models")
        sides[what] = side
    d, n = sides["decision"], sides["nasty"]
    for key, label in (("classes", "classes"), ("input_shape", "input shape"), ("normalization", "normalisation")):
        if d[key] != n[key]:
            raise NastyError(f"the decision model ({decision_path}) and the nasty part ({nasty_path}) disagree on {label}: "
                             f"{d[key]} vs {n[key]}")
    if d["weights_sha256"] == n["weights_sha256"]:
        raise NastyError(f"the nasty part ({nasty_path}) has the decision model's own weights ({decision_path}, sha256 "
                         f"{d['weights_sha256'][:12]}...): the lock would serve the undefended model's outputs; refused")
    decision, _ = load_checkpoint(decision_path)
    nasty, _ = load_checkpoint(nasty_path)

    class _Data:  # what assemble needs of a dataset (and, to calibrate bins, its validation split)
        classes = d["classes"]
        num_classes = len(d["classes"])
        in_channels = d["input_shape"][0]
        image_size = tuple(d["input_shape"][1:])

    try:
        check_keep_classes(keep, len(d["classes"]))
    except ValueError as e:
        raise NastyError(str(e)) from None
    if parse_keep(keep).bins is not None:
        x_val, y_val = _validation_split(d, decision_path)
        _Data.x_val, _Data.y_val = x_val, y_val
    locked = assemble(decision, nasty, _Data, "two-net", {"lock_rule": lock, "lock_margin": margin, "keep": keep})
    check_lock_defends(locked, *_check_images(d))  # what the artifact serves, on data: not only what its files are
    return locked, d, n


def _validation_split(side: dict, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The decision model's validation split (normalised as its inputs), as it was carved when it trained."""
    split_cfg = split_settings(side)
    data = load_dataset(side["dataset"], split_cfg["data_root"], val_fraction=split_cfg["val_fraction"],
                        split_seed=split_cfg["split_seed"], normalization=normalization(side))
    check_compatible(side, data)
    if not len(data.x_val):
        raise NastyError(f"--keep calibrates bins on the validation split of {path}'s dataset ({side['dataset']}), which is empty")
    return data.x_val, data.y_val


def _check_images(side: dict, n: int = 512) -> tuple[torch.Tensor, str]:
    """Up to ``n`` normalised validation images of ``side``'s dataset (test images when it has no validation
    split); seeded standard-normal inputs of its shape when the dataset cannot be read here."""
    try:
        split_cfg = split_settings(side)
        data = load_dataset(side["dataset"], split_cfg["data_root"], val_fraction=split_cfg["val_fraction"],
                            split_seed=split_cfg["split_seed"], normalization=normalization(side))
        check_compatible(side, data)
    except NastyError:
        return torch.randn(n, *side["input_shape"], generator=torch.Generator().manual_seed(0)), "random inputs"
    x, what = (data.x_val, "validation images") if len(data.x_val) else (data.x_test, "test images")
    return x[:n], f"{what} of {side['dataset']}"


def eval_job(checkpoint: str, dataset: str | None = None, data_root: str | None = None, split: str = "test") -> tuple[dict, Any]:
    """Accuracy, per-class accuracy and confusion matrix of ``checkpoint`` on a split of its dataset (or
    of ``dataset``, read with the checkpoint's normalisation); returns the result and the data."""
    model, side = load_checkpoint(checkpoint)
    name = dataset or side["dataset"]
    split_cfg = split_settings(side)  # type-checked: the sidecar may be hostile
    data = load_dataset(name, data_root or split_cfg["data_root"], val_fraction=split_cfg["val_fraction"],
                        split_seed=split_cfg["split_seed"], normalization=normalization(side))
    check_compatible(side, data)
    x, y = data.split(split)
    return {"checkpoint": checkpoint, "dataset": name, "split": split, "classes": data.classes,
            **evaluate(model, x, y, data.num_classes)}, data


def _floats(name: str, text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise NastyError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise NastyError(f"{name} must be finite numbers, got {text!r}")
    return vals


def convert_job(source: str, model_spec: str, out: str, *, dataset: str = "digits", data_root: str | None = None,
                key: str | None = None, mean: str | None = None, std: str | None = None, force: bool = False) -> tuple[dict, Any]:
    """Read a weights-only state dict (``torch.load(weights_only=True)``, refusing any pickle that would
    call code), load it into ``model_spec`` and save a safe checkpoint into ``out``."""
    if (mean is None) != (std is None):
        raise NastyError("--mean and --std go together")
    norm = (_floats("--mean", mean), _floats("--std", std)) if mean is not None and std is not None else None
    if norm and not all(v > 0 for v in norm[1]):
        raise NastyError("--std must be positive")
    cfg = load_config(None, {"data": {"dataset": dataset, "data_root": data_root}, "model": {"name": model_spec}})
    data = data_from_config(cfg, normalization=norm)  # checks the spec on the meta device, within its parameter budget
    with torch.device("meta"):
        budget = legacy_budget(new_model(model_spec, data))
    # refuses hostile pickles, and files that would unpack beyond what the model can need, before reading them;
    # the tensors stay memory-mapped until load_legacy_state has compared their shapes with the model's
    state = read_legacy_state_dict(source, key, budget=budget)
    model = new_model(model_spec, data)
    info = load_legacy_state(model, state, source)
    folder = prepare_out_dir(out, force, "converted")
    metrics = {"test": test_metrics(model, data)}
    save_model(folder, model, data, cfg, metrics, extra={"converted": info})
    return {"checkpoint": str(folder), "accuracy": metrics["test"]["accuracy"], **info}, data
