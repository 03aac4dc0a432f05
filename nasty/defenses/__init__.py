"""Defense registry and ``train_defended``: train a teacher whose soft outputs mislead students.

Training-time defenses (one module each) subclass :class:`Defense` and return an objective for
the one training loop. ``train_defended`` goes from data to a defended teacher in one call: it
loads or trains the normal adversary, trains the defended teacher, and runs the KD probe.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, ClassVar

from ..errors import NastyError
from ..registry import Registry

DEFENSES = Registry("defense")
PAPER_OMEGA = 0.04  # omega when none is given and none is chosen on validation (Ma et al. 2021, CIFAR-10)
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
        if "omega" in cfg and cfg["omega"] is None:  # not chosen on validation: the paper's value
            cfg = {**cfg, "omega": PAPER_OMEGA}
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


def _matching_adversary(cfg: dict, adversaries: list) -> str:
    """``--init-from adversary``: the adversary of the defended model's own architecture (never another one)."""
    from ..models import model_spec, parse_model_spec

    name, kwargs = parse_model_spec(cfg["model"]["name"])
    for model, path in adversaries:
        spec = model_spec(model)
        if spec["name"] == name and spec["kwargs"] == kwargs:
            return path
    raise NastyError(f"--init-from adversary: no adversary is a {cfg['model']['name']} (adversaries: "
                     f"{', '.join(model_spec(m)['name'] for m, _ in adversaries)}); pass --init-from CKPT or list {cfg['model']['name']} among the adversaries")


def _check_adversary_specs(cfg: dict) -> None:
    """``--init-from adversary`` with adversaries still to be trained: one of them must be the defended architecture."""
    from ..models import parse_model_spec

    dcfg = cfg["defense"]
    if dcfg["init_from"] != "adversary" or dcfg["adversary"] or dcfg["lock"] == "two-head":
        return
    specs = split_model_specs(dcfg["adversary_model"]) or [cfg["model"]["name"]]
    if parse_model_spec(cfg["model"]["name"]) not in [parse_model_spec(s) for s in specs]:
        raise NastyError(f"--init-from adversary: no adversary is a {cfg['model']['name']} (--adversary-model {dcfg['adversary_model']}); "
                         f"add {cfg['model']['name']} to --adversary-model or drop --init-from")


def _train_network(defense, cfg: dict, data, adversaries: list, run_dir: Path, log) -> tuple[Any, dict, Any]:
    """The nasty network of ``--lock none`` (served alone) or ``two-net`` (locked afterwards)."""
    from ..checkpoint import check_compatible, load_checkpoint
    from ..config import train_config
    from ..runs import new_model
    from ..train import Frozen, fit, seed_everything

    dcfg = defense.cfg
    init = dcfg["init_from"]
    tcfg = train_config(cfg, dcfg["train"])
    seed_everything(tcfg.seed, tcfg.deterministic)
    if init is None:
        teacher = new_model(cfg["model"]["name"], data)
    else:
        path = _matching_adversary(cfg, adversaries) if init == "adversary" else init
        teacher, side = load_checkpoint(path)
        check_compatible(side, data, f"--init-from {path}")
        teacher.train()
        for p in teacher.parameters():
            p.requires_grad_(True)
    tcfg = defense.train_config(tcfg)
    frozen = [Frozen(m, len(data.y_train)) for m, _ in adversaries]
    res = fit(teacher, defense.objective(frozen), data, tcfg, run_dir=run_dir, desc=f"defended:{defense.name}", log=log)
    info = defense.finish(teacher)
    return teacher, info, res


def train_defended(cfg: dict, out: Path, log: Callable[[str], None] = _log) -> dict:
    """Adversary (loaded or trained) -> defended teacher (locked to the normal model's decisions unless
    ``lock = "none"``; strength chosen on validation unless ``omega`` is set) -> KD probe -> verdict
    (also ``result.json``)."""
    from ..checkpoint import atomic_write_json, check_compatible, load_checkpoint, read_sidecar
    from ..config import train_config
    from ..metrics import served_quality
    from ..probe import run_probe, verdict_text
    from ..runs import data_from_config, save_model, test_metrics, train_normal
    from .lock import assemble, check_lock_config, choose_strength, describe_lock, lock_summary, train_head

    dcfg = cfg["defense"]
    lock = dcfg["lock"]
    check_lock_config(cfg)
    _check_adversary_specs(cfg)
    defense_cls = get_defense(dcfg["name"])
    omegas = [dcfg["omega"]] if dcfg["omega"] is not None else (list(dcfg["omega_grid"]) if lock != "none" else [PAPER_OMEGA])
    # checkpoints fix the normalisation: the first adversary's (or the init checkpoint's) wins
    norm = None
    for i, path in enumerate([*dcfg["adversary"], *([dcfg["init_from"]] if dcfg["init_from"] not in (None, "adversary") else [])]):
        _, side = read_sidecar(path)
        what = describe_lock(side)
        if what:
            raise NastyError(f"{path} is {what}, not a normal model; pass the normal model it was built from")
        if i == 0:
            norm = (side["normalization"]["mean"], side["normalization"]["std"])
    data = data_from_config(cfg, normalization=norm)
    defense_cls({**dcfg, "omega": omegas[0]}, data)  # validate before anything trains
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
    normal = adversaries[0][0]
    curve = validation_curve(adversaries[0][1])
    tseed = train_config(cfg, dcfg["train"])

    candidates = []
    for omega in omegas:
        defense = defense_cls({**dcfg, "omega": omega}, data)
        defense.reference_curve, defense.log = curve, log
        run_dir = out / "defended" if len(omegas) == 1 else out / "defended" / f"omega{omega:g}"
        if lock == "two-head":
            head, info = train_head(defense, normal, [m for m, _ in adversaries], data, defense.cfg, tseed.seed, tseed.deterministic,
                                    run_dir, log)
            served, seconds = assemble(normal, head, data, "two-head", defense.cfg), None
        else:
            net, info, res = _train_network(defense, cfg, data, adversaries, run_dir, log)
            served, seconds = (net if lock == "none" else assemble(normal, net, data, "two-net", defense.cfg)), res.seconds
            info = {**info, "selected_epoch": info.get("selected_epoch", res.best_epoch),
                    "val_accuracy": info.get("val_accuracy", res.best_val_accuracy)}
        candidates.append((omega, served, info, defense, seconds))
    tuning = None
    best = 0
    if len(candidates) > 1:
        best, tuning = choose_strength([(c[0], c[1]) for c in candidates], cfg, data, out, log)
        log(f"[tune] chose omega={candidates[best][0]:g} on the validation split")
    omega, teacher, info, defense, seconds = candidates[best]
    if lock != "none":
        info = {**info, "lock": lock_summary(teacher)}
    if tuning is not None:
        info = {**info, "tuning": tuning}
    defended_test = test_metrics(teacher, data)
    metrics = {"test": defended_test, "best_epoch": info.get("selected_epoch"), "val_accuracy": info.get("val_accuracy"),
               "train_seconds": seconds}
    save_model(out / "defended", teacher, data, cfg, metrics,
               extra={"defense": {"name": defense.name, **{k: v for k, v in dcfg.items() if k != "train"}, "omega": omega},
                      "adversaries": [p for _, p in adversaries], "defense_info": info})

    result: dict[str, Any] = {
        "normal_accuracy": normal_test["accuracy"],
        "defended_accuracy": defended_test["accuracy"],
        "accuracy_drop": normal_test["accuracy"] - defended_test["accuracy"],
        "normal_per_class_accuracy": normal_test["per_class_accuracy"],
        "defended_per_class_accuracy": defended_test["per_class_accuracy"],
        "normal_quality": served_quality(normal, data.x_test, data.y_test),
        "defended_quality": served_quality(teacher, data.x_test, data.y_test),
        "defense": defense.name,
        "lock": lock,
        "omega": omega,
        "defended_checkpoint": str(out / "defended"),
        "normal_checkpoint": adversaries[0][1],
        "train_seconds": seconds,
        "defense_info": info,
        "probe": None,
    }
    if getattr(defense, "protected", None):
        from .selective import split_accuracy

        result["protected_classes"] = [data.classes[c] for c in defense.protected]
        result["normal_split_accuracy"] = split_accuracy(normal_test, defense.protected)
        result["defended_split_accuracy"] = split_accuracy(defended_test, defense.protected)
    if cfg["probe"]["enabled"]:
        result["probe"] = run_probe(cfg, data, normal, teacher, out / "probe", log)
    result["verdict"] = verdict_text(result)
    atomic_write_json(out / "result.json", result)
    return result


from . import budget, multi, nasty, selective  # noqa: E402,F401  (registration)
from .output import DefendedModel, list_output_defenses, parse_output_defense  # noqa: E402,F401
