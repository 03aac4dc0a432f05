"""Defense registry and ``train_defended``: train a teacher whose soft outputs mislead students.

Training-time defenses (one module each) subclass :class:`Defense` and return an objective for
the one training loop. ``train_defended`` goes from data to a defended teacher in one call: it
loads or trains the normal adversary, trains the defended teacher, and runs the KD probe.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any, Callable, ClassVar

from ..errors import NastyError

_DEFENSES: dict[str, type] = {}


def register_defense(cls):
    if cls.name in _DEFENSES:
        raise ValueError(f"defense {cls.name} registered twice")
    _DEFENSES[cls.name] = cls
    return cls


def list_defenses() -> dict[str, str]:
    return {k: v.summary for k, v in sorted(_DEFENSES.items())}


def get_defense(name: str) -> type:
    if name not in _DEFENSES:
        close = difflib.get_close_matches(name, list(_DEFENSES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise NastyError(f"unknown defense {name!r}{hint} (known: {', '.join(sorted(_DEFENSES))})")
    return _DEFENSES[name]


class Defense:
    """A training-time defense: validates its ``[defense]`` config and builds an objective."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def __init__(self, cfg: dict[str, Any], data=None):
        self.cfg = cfg
        self.data = data
        self.validate()

    def validate(self) -> None:
        pass

    def objective(self, adversaries: list):
        raise NotImplementedError


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_defended(cfg: dict, out: Path, log: Callable[[str], None] = _log) -> dict:
    """Adversary (loaded or trained) -> defended teacher -> KD probe -> verdict (also ``result.json``)."""
    from ..checkpoint import atomic_write_json, check_compatible, load_checkpoint
    from ..config import train_config
    from ..probe import run_probe, verdict_text
    from ..runs import data_from_config, new_model, save_model, test_metrics, train_normal
    from ..train import Frozen, fit

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
        log(f"[nasty] no --adversary given: training a normal {dcfg['adversary_model'] or cfg['model']['name']} first")
        model, metrics = train_normal(cfg, data, out / "normal", model_spec=dcfg["adversary_model"], log=log, desc="normal")
        adversaries.append((model, str(out / "normal")))
        normal_test = metrics["test"]

    init = dcfg["init_from"]
    if init is None:
        teacher = new_model(cfg["model"]["name"], data)
    else:
        path = adversaries[0][1] if init == "adversary" else init
        teacher, side = load_checkpoint(path)
        check_compatible(side, data, f"--init-from {path}")
        teacher.train()
        for p in teacher.parameters():
            p.requires_grad_(True)
    tcfg = train_config(cfg, dcfg["train"])
    frozen = [Frozen(m, len(data.y_train)) for m, _ in adversaries]
    res = fit(teacher, defense.objective(frozen), data, tcfg, run_dir=out / "defended", desc=f"defended:{defense.name}", log=log)
    defended_test = test_metrics(teacher, data)
    metrics = {"test": defended_test, "best_epoch": res.best_epoch, "val_accuracy": res.best_val_accuracy, "train_seconds": res.seconds}
    save_model(out / "defended", teacher, data, cfg, metrics,
               extra={"defense": {"name": defense.name, **{k: v for k, v in dcfg.items() if k != "train"}},
                      "adversaries": [p for _, p in adversaries]})

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
        "probe": None,
    }
    if cfg["probe"]["enabled"]:
        result["probe"] = run_probe(cfg, data, adversaries[0][0], teacher, out / "probe", log)
    result["verdict"] = verdict_text(result)
    atomic_write_json(out / "result.json", result)
    return result


from . import nasty  # noqa: E402,F401  (registration)
