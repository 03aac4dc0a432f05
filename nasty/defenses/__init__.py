"""Defense registry and ``train_defended``: train a teacher whose soft outputs mislead students.

Training-time defenses (one module each) subclass :class:`Defense` and return an objective for
the one training loop. ``train_defended`` goes from data to a defended teacher in one call: it
loads or trains the normal adversary, trains the defended teacher, and runs the KD probe.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, ClassVar

from ..registry import Registry

DEFENSES = Registry("defense")
register_defense = DEFENSES.register
list_defenses = DEFENSES.summaries
get_defense = DEFENSES.lookup


class Defense:
    """A training-time defense: validates its ``[defense]`` config and builds an objective."""

    name: ClassVar[str]
    summary: ClassVar[str]
    reference_curve: list[float] | None = None  # the normal model's per-epoch val accuracy (set by train_defended)
    log: Callable[[str], None] | None = None  # where a defense reports progress (set by train_defended; default stderr)

    def __init__(self, cfg: dict[str, Any], data=None):
        self.cfg = cfg
        self.data = data
        self.validate()

    def validate(self) -> None:
        pass

    def objective(self, adversaries: list):
        raise NotImplementedError

    def train_config(self, tcfg):
        """Adjust the defended phase's :class:`TrainConfig` (e.g. gradient clipping); default unchanged."""
        return tcfg

    def finish(self, model) -> dict:
        """Called after training (e.g. to pick the epoch to keep); returns facts for ``result.json``."""
        return {}


def split_model_specs(text: str | None) -> list[str]:
    """``"cnn,mlp"`` -> ``["cnn", "mlp"]``; options stay with their model: ``"cnn:width=0.5,depth=2,mlp"``
    -> ``["cnn:width=0.5,depth=2", "mlp"]`` (a part holding ``=`` but no ``:`` belongs to the previous spec;
    commas inside brackets, ``mlp:hidden=[64,32]``, do not split)."""
    parts, depth, cur = [], 0, ""
    for ch in text or "":
        depth += ch in "[("
        depth -= ch in "])"
        if ch == "," and depth <= 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    specs: list[str] = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        if "=" in part and ":" not in part and specs:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


def validation_curve(checkpoint: str | Path) -> list[float] | None:
    """Per-epoch validation accuracy of the run that trained ``checkpoint`` (its ``metrics.jsonl``), if kept."""
    import json

    p = Path(checkpoint)
    f = (p if p.is_dir() else p.parent) / "metrics.jsonl"
    try:
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        curve = [float(r["val_accuracy"]) for r in rows]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return curve or None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_defended(cfg: dict, out: Path, log: Callable[[str], None] = _log) -> dict:
    """Adversary (loaded or trained) -> defended teacher -> KD probe -> verdict (also ``result.json``)."""
    from ..checkpoint import atomic_write_json, check_compatible, load_checkpoint
    from ..config import train_config
    from ..probe import run_probe, verdict_text
    from ..runs import data_from_config, new_model, save_model, test_metrics, train_normal
    from ..train import Frozen, fit, seed_everything

    dcfg = cfg["defense"]
    defense_cls = get_defense(dcfg["name"])
    # checkpoints fix the normalisation: the adversary's (or the init checkpoint's) wins
    first_ckpt = dcfg["adversary"][0] if dcfg["adversary"] else (dcfg["init_from"] if dcfg["init_from"] not in (None, "adversary") else None)
    norm = None
    if first_ckpt:
        from ..checkpoint import read_sidecar

        _, side = read_sidecar(first_ckpt)
        norm = (side["normalization"]["mean"], side["normalization"]["std"])
    data = data_from_config(cfg, normalization=norm)
    defense = defense_cls(dcfg, data)
    atomic_write_json(out / "config.json", cfg)

    adversaries = []
    if dcfg["adversary"]:
        for path in dcfg["adversary"]:
            model, side = load_checkpoint(path)
            check_compatible(side, data, f"adversary {path}")
            adversaries.append((model, str(path)))
        normal_test = test_metrics(adversaries[0][0], data)
    else:
        from ..probe import slug

        specs = split_model_specs(dcfg["adversary_model"]) or [cfg["model"]["name"]]
        for i, spec in enumerate(specs):  # the first is the normal reference; the others only adversaries
            log(f"[nasty] no --adversary given: training a normal {spec} first")
            adv_dir = out / ("normal" if i == 0 else f"normal-{i}-{slug(spec)}")
            model, metrics = train_normal(cfg, data, adv_dir, model_spec=spec, log=log, desc=f"normal:{spec}")
            adversaries.append((model, str(adv_dir)))
            if i == 0:
                normal_test = metrics["test"]

    defense.reference_curve = validation_curve(adversaries[0][1])
    defense.log = log
    init = dcfg["init_from"]
    tcfg = train_config(cfg, dcfg["train"])
    seed_everything(tcfg.seed, tcfg.deterministic)
    if init is None:
        teacher = new_model(cfg["model"]["name"], data)
    else:
        path = adversaries[0][1] if init == "adversary" else init
        teacher, side = load_checkpoint(path)
        check_compatible(side, data, f"--init-from {path}")
        teacher.train()
        for p in teacher.parameters():
            p.requires_grad_(True)
    tcfg = defense.train_config(tcfg)
    frozen = [Frozen(m, len(data.y_train)) for m, _ in adversaries]
    res = fit(teacher, defense.objective(frozen), data, tcfg, run_dir=out / "defended", desc=f"defended:{defense.name}", log=log)
    info = defense.finish(teacher)
    defended_test = test_metrics(teacher, data)
    metrics = {"test": defended_test, "best_epoch": info.get("selected_epoch", res.best_epoch),
               "val_accuracy": info.get("val_accuracy", res.best_val_accuracy), "train_seconds": res.seconds}
    save_model(out / "defended", teacher, data, cfg, metrics,
               extra={"defense": {"name": defense.name, **{k: v for k, v in dcfg.items() if k != "train"}},
                      "adversaries": [p for _, p in adversaries], "defense_info": info})

    result: dict[str, Any] = {
        "normal_accuracy": normal_test["accuracy"],
        "defended_accuracy": defended_test["accuracy"],
        "accuracy_drop": normal_test["accuracy"] - defended_test["accuracy"],
        "normal_per_class_accuracy": normal_test["per_class_accuracy"],
        "defended_per_class_accuracy": defended_test["per_class_accuracy"],
        "defense": defense.name,
        "defended_checkpoint": str(out / "defended"),
        "normal_checkpoint": adversaries[0][1],
        "train_seconds": res.seconds,
        "defense_info": info,
        "probe": None,
    }
    if getattr(defense, "protected", None):
        from .selective import split_accuracy

        result["protected_classes"] = [data.classes[c] for c in defense.protected]
        result["normal_split_accuracy"] = split_accuracy(normal_test, defense.protected)
        result["defended_split_accuracy"] = split_accuracy(defended_test, defense.protected)
    if cfg["probe"]["enabled"]:
        result["probe"] = run_probe(cfg, data, adversaries[0][0], teacher, out / "probe", log)
    result["verdict"] = verdict_text(result)
    atomic_write_json(out / "result.json", result)
    return result


from . import budget, multi, nasty, selective  # noqa: E402,F401  (registration)
from .output import DefendedModel, list_output_defenses, parse_output_defense  # noqa: E402,F401
