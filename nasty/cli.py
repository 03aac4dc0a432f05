"""The ``nasty`` command line. Progress and logs go to stderr; ``--json`` prints one object on stdout.

Bad input never gives a traceback: it gives one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .errors import NastyError


def _log(msg: str) -> None:
    from .distributed import is_main

    if is_main():  # under torchrun only rank 0 talks
        click.echo(msg, err=True)


def _emit(obj: Any, as_json: bool, human: Callable[[], None]) -> None:
    from .distributed import is_main

    if not is_main():
        return
    if as_json:
        click.echo(json.dumps(obj, indent=None, default=str))
    else:
        human()


def _common(f):
    """Options shared by the training commands."""
    opts = [
        click.option("--config", "config", type=click.Path(dir_okay=False), help="TOML config (one experiment); flags override it."),
        click.option("--dataset", help="digits (default), mnist, fashion-mnist, cifar10, cifar100, svhn, npz:PATH, imagefolder:PATH."),
        click.option("--data-root", help="Folder holding the dataset files (default $NASTY_DATA_ROOT or ./data)."),
        click.option("--download", is_flag=True, default=None, help="Allow torchvision to download missing data (needs internet)."),
        click.option("--train-subset", type=int, help="Keep a stratified subset of N labelled training images."),
        click.option("--data-augment", help="Training-data augmentation: auto (the dataset's default), none, crop or crop-flip "
                     "(the config's [data] augment)."),
        click.option("--model", help="Architecture, with options: e.g. cnn, resnet20, 'cnn:width=0.25'."),
        click.option("--epochs", type=int),
        click.option("--batch-size", type=int),
        click.option("--lr", type=float),
        click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"])),
        click.option("--schedule", type=click.Choice(["constant", "cosine", "multistep", "onecycle"])),
        click.option("--seed", type=int),
        click.option("--deterministic", is_flag=True, default=None, help="Deterministic algorithms (reproducible on CPU)."),
        click.option("--out", type=click.Path(file_okay=False), help="Output directory (one run = one directory)."),
        click.option("--force", is_flag=True, help="Overwrite a non-empty --out."),
        click.option("--resume", is_flag=True, help="Continue the interrupted run in --out (same options) from its last completed epoch."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout at the end."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _base_overrides(kw: dict) -> dict:
    return {
        "data": {"dataset": kw.get("dataset"), "data_root": kw.get("data_root"), "download": kw.get("download"),
                 "train_subset": kw.get("train_subset"), "augment": kw.get("data_augment")},
        "model": {"name": kw.get("model")},
        "train": {k: kw.get(k) for k in ("epochs", "batch_size", "lr", "optimizer", "schedule", "seed", "deterministic")},
    }


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise NastyError(f"{name} must be positive, got {value}")


def _param_value(item: str, text: str) -> Any:
    """The value of ``--param KEY=VALUE``: a Python literal (number, string, list ...) or else the text
    itself; NaN/inf anywhere in it is refused (the method's class checks the rest)."""
    import ast

    from .registry import check_param

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    check_param("--param", item.partition("=")[0], value, None)
    return value


def _run_dir(kw: dict, cfg: dict, default_name: str) -> Path:
    """The run's output folder: a fresh one (``--force`` to overwrite), or with ``--resume`` the
    folder of an interrupted run whose ``run.json`` must hold the same config. Every training in
    the command then saves its state after each epoch and resumes from it (see ``nasty.train.fit``)."""
    from .checkpoint import atomic_write_json
    from .runs import clean_leftovers, has_content, lock_out_dir, prepare_out_dir
    from .train import _first_difference, checkpointing

    from . import distributed

    command = click.get_current_context().info_name
    if distributed.enabled() and not kw["out"]:
        raise NastyError("under torchrun pass --out: every rank must use the same run folder")
    if not distributed.is_main():  # under torchrun rank 0 prepares the folder; the others wait for it
        distributed.barrier()
        click.get_current_context().with_resource(checkpointing(save=True, resume=bool(kw.get("resume"))))
        return Path(kw["out"])
    if kw.get("resume"):
        if kw["force"]:
            raise NastyError("--resume continues the run in --out and --force deletes it: pass one of them")
        if not kw["out"]:
            raise NastyError("--resume needs --out, the folder of the interrupted run")
        out = Path(kw["out"])
        if out.exists() and not out.is_dir():
            raise NastyError(f"--out {out} exists and is not a directory")
        saved = out / "run.json"
        if saved.is_file():
            try:
                prev = json.loads(saved.read_text())
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise NastyError(f"cannot resume: {saved} is damaged; pass --force to start over") from None
            if not isinstance(prev, dict) or prev.get("command") != command:
                raise NastyError(f"cannot resume: {out} holds a run of `{prev.get('command') if isinstance(prev, dict) else '?'}`, not `{command}`")
            diff = _first_difference(prev.get("config"), json.loads(json.dumps(cfg)))
            if diff:
                raise NastyError(f"cannot resume {out}: option {diff}; pass the options of the interrupted run, or --force to start over")
        elif out.is_dir() and has_content(out):
            raise NastyError(f"cannot resume: {out} holds no run.json (not a run of this version of nasty); pass --force to start over")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise NastyError(f"cannot create output directory {out}: {e.strerror}") from None
        lock_out_dir(out)  # one run at a time in a folder
        clean_leftovers(out)  # temporary files of the killed run; its complete files are kept
    else:
        out = prepare_out_dir(kw["out"], kw["force"], default_name, inputs=cfg)
    atomic_write_json(out / "run.json", {"command": command, "config": cfg})
    distributed.barrier()
    click.get_current_context().with_resource(checkpointing(save=True, resume=bool(kw.get("resume"))))
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="nasty")
def cli() -> None:
    """nasty: make image classifiers undistillable, attack them, and audit what a thief can copy."""


@cli.command("train-teacher")
@_common
@click.option("--label-smoothing", type=float, help="Label smoothing of the cross-entropy.")
def train_teacher(**kw) -> None:
    """Train a normal teacher (cross-entropy)."""
    from .config import load_config
    from .runs import data_from_config, train_normal

    over = _base_overrides(kw)
    over["train"]["label_smoothing"] = kw["label_smoothing"]
    cfg = load_config(kw["config"], over)
    data = data_from_config(cfg)
    out = _run_dir(kw, cfg, f"teacher-{cfg['data']['dataset'].replace(':', '-').replace('/', '-')}")
    _, metrics = train_normal(cfg, data, out, log=_log)
    result = {"accuracy": metrics["test"]["accuracy"], "per_class_accuracy": metrics["test"]["per_class_accuracy"],
              "val_accuracy": metrics["val_accuracy"], "best_epoch": metrics["best_epoch"], "checkpoint": str(out)}
    from .checkpoint import atomic_write_json

    atomic_write_json(out / "result.json", result)
    _emit(result, kw["as_json"], lambda: click.echo(f"teacher test accuracy {result['accuracy']:.2f}% -> {out}"))


def _float_list(flag: str, text: str | None) -> list[float] | None:
    """``"0.1,0.3"`` -> ``[0.1, 0.3]``; finite numbers only (one-line error otherwise)."""
    if text is None:
        return None
    import math

    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            v = float(part)
        except ValueError:
            raise NastyError(f"{flag}: {part!r} is not a number") from None
        if not math.isfinite(v):
            raise NastyError(f"{flag}: {part!r} is not a finite number")
        out.append(v)
    return out


@cli.command("train-defended")
@_common
@click.option("--defense", "defense_name", help="Training-time defense (see `nasty defenses`); default nasty.")
@click.option("--tau", type=float, help="Temperature of the KL to the adversary.")
@click.option("--omega", type=float, help="Weight of the KL term (strength of the defense).")
@click.option("--omega-warmup", type=int, help="Ramp omega linearly over this many epochs.")
@click.option("--kl-cap", type=float, help="Cap each sample's KL to the adversary.")
@click.option("--adversary", multiple=True, type=click.Path(), help="Normal teacher checkpoint (repeatable). Without it one is trained first.")
@click.option("--adversary-model", help="Architecture(s) of the adversaries trained when --adversary is absent, comma-separated "
              "(e.g. cnn,mlp; the first is the normal reference; default: --model).")
@click.option("--protect-classes", help="class-selective/budget: classes to protect, indices or names (e.g. 3,5,7 or Shirt,Coat).")
@click.option("--protect-by", type=click.Choice(["label", "mass", "both"]), help="Where the KL acts: images labelled with a protected "
              "class (default), the adversary's probability mass on them, or both.")
@click.option("--anchor", type=float, help="class-selective/budget: weight of KL(adversary || teacher) on unprotected images "
              "(keeps their soft labels normal; default 0).")
@click.option("--combine", type=click.Choice(["mean", "sum", "min"]), help="multi-adversary/budget: how several adversaries' KL terms combine.")
@click.option("--max-accuracy-drop", type=float, help="budget: validation accuracy (points) the teacher may lose to the adversary; omega adapts.")
@click.option("--dual-lr", type=float, help="budget: step of the per-epoch omega update (default 0.5).")
@click.option("--omega-max", type=float, help="budget: upper bound of omega (default 1.0).")
@click.option("--init-from", help="--lock none/two-net: fine-tune the nasty network from a checkpoint, or 'adversary' for the (trained) "
              "adversary of the same architecture, instead of training from scratch (a two-head lock's head always starts fresh).")
@click.option("--defense-epochs", type=int, help="Epochs of the defended phase (default: [defense.train] or --epochs).")
@click.option("--defense-lr", type=float, help="Learning rate of the defended phase.")
@click.option("--lock", type=click.Choice(["two-head", "two-net", "none"]), help="Serve the nasty part's soft outputs with the normal "
              "model's decisions (two-head: a nasty head on the normal backbone, the default; two-net: a nasty network beside the normal one; "
              "none: the paper's single nasty network, which pays accuracy).")
@click.option("--nasty-head", help="two-head: the nasty head, linear (default) or mlp:hidden=H.")
@click.option("--lock-rule", type=click.Choice(["swap", "margin"]), help="How the decision is imposed on the nasty logits (default swap).")
@click.option("--lock-margin", type=float, help="margin lock: how far the decided class is put above the others (default 0).")
@click.option("--omega-grid", help="Candidates for omega, chosen by a KD probe on the validation split when --omega is not given "
              "(comma-separated; default 0.1,0.3,1).")
@click.option("--cmi", type=float, help="two-head: weight of the head's conditional mutual information given the class "
              "(outputs that say nothing beyond the decision; default 10, 0 turns it off).")
@click.option("--head-epochs", type=int, help="two-head: epochs of the nasty head on cached features (default: about 3000 steps).")
@click.option("--probe-students", help="Comma-separated student architectures for the KD probe.")
@click.option("--probe-subset", type=int, help="Labelled images the probe's students train on.")
@click.option("--no-probe", is_flag=True, help="Skip the KD probe.")
def train_defended_cmd(**kw) -> None:
    """Train a defended ("nasty") teacher, then probe it with KD students and print a verdict."""
    from .config import load_config
    from .defenses import train_defended

    _positive("--tau", kw["tau"])
    _positive("--max-accuracy-drop", kw["max_accuracy_drop"])
    over = _base_overrides(kw)
    over["defense"] = {"name": kw["defense_name"], "tau": kw["tau"], "omega": kw["omega"], "omega_warmup": kw["omega_warmup"],
                       "kl_cap": kw["kl_cap"], "adversary": list(kw["adversary"]) or None, "adversary_model": kw["adversary_model"],
                       "init_from": kw["init_from"], "protect_by": kw["protect_by"], "anchor": kw["anchor"], "combine": kw["combine"],
                       "protect_classes": [c.strip() for c in kw["protect_classes"].split(",") if c.strip()] if kw["protect_classes"] else None,
                       "max_accuracy_drop": kw["max_accuracy_drop"], "dual_lr": kw["dual_lr"], "omega_max": kw["omega_max"],
                       "lock": kw["lock"], "nasty_head": kw["nasty_head"], "lock_rule": kw["lock_rule"], "lock_margin": kw["lock_margin"],
                       "omega_grid": _float_list("--omega-grid", kw["omega_grid"]), "head_epochs": kw["head_epochs"], "cmi": kw["cmi"],
                       "train": {k: v for k, v in (("epochs", kw["defense_epochs"]), ("lr", kw["defense_lr"])) if v is not None}}
    over["probe"] = {"enabled": False if kw["no_probe"] else None, "train_subset": kw["probe_subset"],
                     "students": [s.strip() for s in kw["probe_students"].split(",") if s.strip()] if kw["probe_students"] else None}
    cfg = load_config(kw["config"], over)
    from .checkpoint import load_checkpoint

    # refuse unreadable or hostile checkpoints before --force clears the output folder
    for path in [*cfg["defense"]["adversary"], *([cfg["defense"]["init_from"]] if cfg["defense"]["init_from"] not in (None, "adversary") else [])]:
        load_checkpoint(path)
    out = _run_dir(kw, cfg, f"defended-{cfg['data']['dataset'].replace(':', '-').replace('/', '-')}")
    result = train_defended(cfg, out, log=_log)
    result["out_dir"] = str(out)
    _emit(result, kw["as_json"], lambda: click.echo(result["verdict"] + f"\nrun saved in {out}"))


@cli.command("attack")
@_common
@click.option("--method", help="Attack (see `nasty attacks`); default kd.")
@click.option("--teacher", multiple=True, type=click.Path(), help="Teacher checkpoint (repeatable for ensembles).")
@click.option("--student", help="Student architecture, e.g. mlp or 'cnn:width=0.25'.")
@click.option("--temperature", type=float, help="Distillation temperature T.")
@click.option("--alpha", type=float, help="Weight of the distillation term.")
@click.option("--query", help="What the teacher exposes: logits, probs, topk:K, label, weights.")
@click.option("--param", "params", multiple=True, help="Method parameter KEY=VALUE (repeatable).")
@click.option("--output-defense", help="Post-process the teacher's probabilities when queried, e.g. topk:2,round:3 (see nasty.defenses.output).")
@click.option("--labels/--no-labels", "labels", default=None, help="Whether the attacker holds the labels of its images (default: yes; no with --surrogate).")
@click.option("--surrogate", help="Query the teacher on another dataset's images instead (unlabelled), e.g. mnist or npz:PATH.")
@click.option("--queries", type=int, help="Query budget: train on this many images (a fixed seeded subset).")
@click.option("--augment", help="Distillation-time augmentation for soft-label attacks: none, mixup or cutmix (optionally :ALPHA).")
@click.option("--mode", help="tllm: oneshot or online identification.")
@click.option("--delta", type=float, help="tllm: a class is undistillable when KD loses more than DELTA points on it.")
@click.option("--discard", help="tllm: what to discard for undistillable classes: kd-term, ce-full or drop.")
@click.option("--head-stage", type=int, help="skeptical: student stage (1-based) whose auxiliary head learns from the teacher.")
@click.option("--kd-delay", type=int, help="skeptical: labels-only warm-up epochs before distillation.")
def attack_cmd(**kw) -> None:
    """Train a student against a teacher with one attack and score it on the test split."""

    from .attacks import check_requirements, get_attack, run_attack
    from .attacks.base import load_surrogate
    from .checkpoint import atomic_write_json, check_compatible, load_checkpoint, read_sidecar
    from .config import load_config, train_config
    from .defenses.output import parse_output_defense
    from .runs import data_from_config, save_model

    _positive("--temperature", kw["temperature"])
    output_defense = parse_output_defense(kw["output_defense"]) if kw["output_defense"] else None
    over = _base_overrides(kw)
    over["attack"] = {"method": kw["method"], "teacher": list(kw["teacher"]) or None, "student": kw["student"],
                      "temperature": kw["temperature"], "alpha": kw["alpha"], "query": kw["query"],
                      "surrogate": kw["surrogate"], "queries": kw["queries"], "augment": kw["augment"]}
    options: dict[str, Any] = {k: kw[k] for k in ("mode", "delta", "discard", "head_stage", "kd_delay") if kw[k] is not None}
    for item in kw["params"]:
        key, eq, value = item.partition("=")
        if not eq:
            raise NastyError(f"--param {item!r} is not KEY=VALUE")
        options[key] = _param_value(item, value)
    over["attack"]["options"] = options or None
    cfg = load_config(kw["config"], over)
    a = cfg["attack"]
    cls = get_attack(a["method"])
    params = dict(a["options"])
    for k in ("temperature", "alpha"):
        if k in cls.params and k not in params:
            params[k] = a[k]
    cls(**params)  # validate the method's parameters before loading anything
    _positive("--queries", a["queries"])
    if cls.accepts == ("weights",) and a["query"] == "logits" and not _explicit_query(kw):
        a["query"] = "weights"  # a checkpoint on disk is white-box access; say so in the result
        _log(f"{a['method']} is a white-box attack: using --query weights")
    if a["surrogate"] and kw["labels"]:
        raise NastyError("--surrogate images carry no labels of the teacher's task; drop --labels")
    labels = not a["surrogate"] if kw["labels"] is None else kw["labels"]
    check_requirements(cls, query=a["query"], labels=labels, n_teachers=len(a["teacher"]), augment=a["augment"],
                       unlabelled_queries=bool(a["surrogate"]))
    norm = None
    if a["teacher"]:
        _, side = read_sidecar(a["teacher"][0])
        norm = (side["normalization"]["mean"], side["normalization"]["std"])
    data = data_from_config(cfg, normalization=norm)
    teachers = []
    for path in a["teacher"]:
        model, side = load_checkpoint(path)
        check_compatible(side, data, f"teacher {path}")
        teachers.append(model)
    x_queries = x_val_queries = None
    source = None
    if a["surrogate"]:
        sur = load_surrogate(a["surrogate"], cfg["data"]["data_root"], data, val_fraction=cfg["data"]["val_fraction"],
                             split_seed=cfg["data"]["split_seed"], download=cfg["data"]["download"])
        x_queries, x_val_queries, source = sur.x_train, sur.x_val, f"{a['surrogate']} (surrogate, unlabelled)"
    out = _run_dir(kw, cfg, f"attack-{a['method']}")
    atomic_write_json(out / "config.json", cfg)
    student, result = run_attack(a["method"], data=data, teachers=teachers, student=a["student"], train=train_config(cfg),
                                 params=params, query=a["query"], out_dir=out, log=_log,
                                 output_defense=output_defense, labels=labels, x_queries=x_queries, x_val_queries=x_val_queries,
                                 data_source=source, augment=a["augment"], query_budget=a["queries"])
    result["teacher"] = list(a["teacher"])
    save_model(out, student, data, cfg, {"test": {k: result[k] for k in ("accuracy", "per_class_accuracy")}})
    atomic_write_json(out / "result.json", result)
    _emit(result, kw["as_json"], lambda: click.echo(f"{a['method']} student {a['student']}: test accuracy {result['accuracy']:.2f}%"
                                                     + (f", agreement with teacher {result['teacher_agreement']:.2f}%" if "teacher_agreement" in result else "")
                                                     + (f", undistillable classes {result['undistillable_classes']}" if "undistillable_classes" in result else "")
                                                     + f" -> {out}"))


def _explicit_query(kw: dict) -> bool:
    """Whether --query or the config file's [attack] query was given (not the schema default)."""
    if kw["query"] is not None:
        return True
    if not kw["config"]:
        return False
    import tomllib

    return "query" in tomllib.loads(Path(kw["config"]).read_text()).get("attack", {})


@cli.command("lock")
@click.option("--decision", required=True, type=click.Path(), help="The normal model: it makes every decision.")
@click.option("--nasty", "nasty_part", required=True, type=click.Path(), help="The nasty network whose soft outputs are served.")
@click.option("--lock-rule", type=click.Choice(["swap", "margin"]), default="swap", show_default=True)
@click.option("--lock-margin", type=float, default=0.0, show_default=True)
@click.option("--out", required=True, help="Folder of the locked checkpoint.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out.")
@click.option("--json", "as_json", is_flag=True)
def lock_cmd(decision: str, nasty_part: str, lock_rule: str, lock_margin: float, out: str, force: bool, as_json: bool) -> None:
    """Lock an existing nasty network to a normal model's decisions (one two-net artifact)."""
    import math

    from .checkpoint import save_checkpoint
    from .defenses.lock import lock_checkpoints
    from .runs import prepare_out_dir

    if not (math.isfinite(lock_margin) and 0 <= lock_margin <= 100):
        raise NastyError(f"--lock-margin must be in [0, 100], got {lock_margin}")
    model, side, nside = lock_checkpoints(decision, nasty_part, lock_rule, lock_margin)
    folder = prepare_out_dir(out, force, "locked")
    norm = side["normalization"]
    save_checkpoint(folder, model, classes=side["classes"], input_shape=tuple(side["input_shape"]), mean=norm["mean"], std=norm["std"],
                    dataset=side["dataset"], config={"lock": {"decision": str(decision), "nasty": str(nasty_part)}},
                    extra={"defense": nside.get("defense", {"name": "locked"}), "lock": {"decision": str(decision), "nasty": str(nasty_part),
                                                                                          "rule": lock_rule, "margin": lock_margin}})
    res = {"checkpoint": str(folder), "decision": str(decision), "nasty": str(nasty_part), "lock_rule": lock_rule}
    _emit(res, as_json, lambda: click.echo(f"locked teacher -> {folder} (decisions from {decision}, soft outputs from {nasty_part})"))


@cli.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--dataset", help="Dataset (default: the checkpoint's).")
@click.option("--data-root")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(checkpoint: str, dataset: str | None, data_root: str | None, split: str, as_json: bool) -> None:
    """Overall and per-class accuracy and the confusion matrix of a checkpoint."""
    from .checkpoint import check_compatible, load_checkpoint
    from .data import load_dataset
    from .metrics import evaluate

    from .checkpoint import split_settings

    model, side = load_checkpoint(checkpoint)
    name = dataset or side["dataset"]
    split_cfg = split_settings(side)  # type-checked: the sidecar may be hostile
    data = load_dataset(name, data_root or split_cfg["data_root"], val_fraction=split_cfg["val_fraction"],
                        split_seed=split_cfg["split_seed"],
                        normalization=(side["normalization"]["mean"], side["normalization"]["std"]))
    check_compatible(side, data)
    x, y = data.split(split)
    res = {"checkpoint": checkpoint, "dataset": name, "split": split, "classes": data.classes, **evaluate(model, x, y, data.num_classes)}

    def human() -> None:
        click.echo(f"{name} {split}: accuracy {res['accuracy']:.2f}% on {res['n']} images")
        width = max(len(c) for c in data.classes)
        for c, acc in zip(data.classes, res["per_class_accuracy"]):
            click.echo(f"  {c:<{width}}  {'n/a' if acc is None else f'{acc:6.2f}%'}")
        click.echo("confusion matrix (rows: true class, columns: predicted):")
        for row in res["confusion_matrix"]:
            click.echo("  " + " ".join(f"{v:5d}" for v in row))

    _emit(res, as_json, human)


@cli.command("convert")
@click.argument("source", type=click.Path())
@click.option("--model", "model_spec", required=True, help="Architecture of the legacy weights, with options: e.g. resnet20, 'cnn:width=0.5'.")
@click.option("--dataset", default="digits", show_default=True, help="Dataset the model was trained on (classes, input shape, normalisation).")
@click.option("--data-root", help="Folder holding the dataset files.")
@click.option("--key", help="Entry of the file that holds the state dict (default: the file itself, else state_dict, model_state_dict, model or net).")
@click.option("--mean", help="Per-channel normalisation mean the model was trained with, comma-separated (default: the dataset's training statistics).")
@click.option("--std", help="Per-channel normalisation std, comma-separated (with --mean).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for model.safetensors + model.json.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out.")
@click.option("--json", "as_json", is_flag=True)
def convert_cmd(source: str, model_spec: str, dataset: str, data_root: str | None, key: str | None, mean: str | None,
                std: str | None, out: str, force: bool, as_json: bool) -> None:
    """Convert a legacy PyTorch state dict (.pt/.pth) into a safetensors checkpoint.

    The file is read with torch.load(weights_only=True) only, which refuses any pickle that would
    call code; this is the one place nasty reads a pickle-based file.
    """
    from .checkpoint import load_legacy_state, read_legacy_state_dict
    from .config import load_config
    from .runs import data_from_config, new_model, prepare_out_dir, save_model, test_metrics

    def floats(name: str, text: str) -> list[float]:
        try:
            vals = [float(v) for v in text.split(",")]
        except ValueError:
            raise NastyError(f"{name} must be comma-separated numbers, got {text!r}") from None
        if not all(v == v and abs(v) != float("inf") for v in vals):
            raise NastyError(f"{name} must be finite numbers, got {text!r}")
        return vals

    if (mean is None) != (std is None):
        raise NastyError("--mean and --std go together")
    norm = (floats("--mean", mean), floats("--std", std)) if mean is not None and std is not None else None
    if norm and not all(v > 0 for v in norm[1]):
        raise NastyError("--std must be positive")
    state = read_legacy_state_dict(source, key)  # refuses hostile pickles before anything else happens
    cfg = load_config(None, {"data": {"dataset": dataset, "data_root": data_root}, "model": {"name": model_spec}})
    data = data_from_config(cfg, normalization=norm)
    model = new_model(model_spec, data)
    info = load_legacy_state(model, state, source)
    folder = prepare_out_dir(out, force, "converted")
    metrics = {"test": test_metrics(model, data)}
    save_model(folder, model, data, cfg, metrics, extra={"converted": info})
    result = {"checkpoint": str(folder), "accuracy": metrics["test"]["accuracy"], **info}
    _emit(result, as_json, lambda: click.echo(f"converted {source} -> {folder} (test accuracy {result['accuracy']:.2f}% on {data.name})"))


@cli.command("models")
@click.option("--json", "as_json", is_flag=True)
def models_cmd(as_json: bool) -> None:
    """List the registered architectures."""
    from .models import list_models, model_doc

    rows = {m: model_doc(m) for m in list_models()}
    _emit(rows, as_json, lambda: [click.echo(f"{k:14s} {v}") for k, v in rows.items()])


@cli.command("datasets")
@click.option("--json", "as_json", is_flag=True)
def datasets_cmd(as_json: bool) -> None:
    """List the known datasets and where their files must be."""
    from .data import list_datasets

    rows = list_datasets()
    _emit(rows, as_json, lambda: [click.echo(f"{k:16s} {v}") for k, v in rows.items()])


@cli.command("attacks")
@click.option("--json", "as_json", is_flag=True)
def attacks_cmd(as_json: bool) -> None:
    """List the registered attacks and what each needs."""
    from .attacks import ATTACKS

    rows = {k: {"summary": c.summary, "access": list(c.accepts) if c.needs_teacher else [], "needs_labels": c.needs_labels,
                "params": c.params} for k, c in sorted(ATTACKS.items())}
    _emit(rows, as_json, lambda: [click.echo(f"{k:16s} {v['summary']}  [access: {', '.join(v['access']) or 'none'}]") for k, v in rows.items()])


@cli.command("defenses")
@click.option("--json", "as_json", is_flag=True)
def defenses_cmd(as_json: bool) -> None:
    """List the registered training-time defenses."""
    from .defenses import list_defenses

    rows = list_defenses()
    _emit(rows, as_json, lambda: [click.echo(f"{k:16s} {v}") for k, v in rows.items()])


@cli.command("audit")
@click.argument("teacher", type=click.Path())
@click.option("--config", "config", type=click.Path(dir_okay=False), help="TOML config: its [data] and [train] set the thief's data and training.")
@click.option("--dataset", help="Dataset (default: the teacher's).")
@click.option("--data-root", help="Folder holding the dataset files.")
@click.option("--download", is_flag=True, default=None, help="Allow torchvision to download missing data.")
@click.option("--train-subset", type=int, help="The thief holds a stratified subset of N labelled training images.")
@click.option("--attacks", default="all", show_default=True, help="Comma-separated attacks (see `nasty attacks`) or 'all'.")
@click.option("--students", default="mlp", show_default=True, help="Comma-separated student architectures.")
@click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Training seeds per attack and student (0..N-1); fewer than 5 gives approximate intervals, 1 unreliable ones.")
@click.option("--reference", type=click.Path(), help="An undefended teacher of the same task, attacked the same way.")
@click.option("--query", default="logits", show_default=True, help="What the teacher exposes: logits, probs, topk:K, label, weights.")
@click.option("--surrogate", help="Label-free attacks (copycat, knockoff) query the teacher on this dataset's images.")
@click.option("--queries", type=click.IntRange(min=1), help="Query budget of the label-free attacks (a fixed seeded subset of their images).")
@click.option("--output-defense", help="The teacher answers through this output defense, e.g. topk:2 or reverse-sigmoid (not the reference).")
@click.option("--first-seed", type=click.IntRange(min=0), default=0, show_default=True, help="Training seeds are FIRST..FIRST+SEEDS-1.")
@click.option("--baselines-from", multiple=True, type=click.Path(file_okay=False),
              help="Reuse the baseline runs of another audit of the same task (checked run by run; repeatable).")
@click.option("--fuse/--no-fuse", default=True, show_default=True, help="Train the single-pass attacks of one seed together, in one pass over the data.")
@click.option("--margin", type=float, default=0.0, show_default=True, help="Gain rule: tested gain > MARGIN points over both baselines, in [-100, 100).")
@click.option("--fidelity", type=float, default=0.9, show_default=True, help="Fidelity rule (label-free attacks): fraction of the teacher's class accuracy.")
@click.option("--fail-on", type=int, help="Exit 1 when an attack transfers more than N classes.")
@click.option("--correction", type=click.Choice(["holm", "bh", "none"]), default="holm", show_default=True,
              help="Multiple-comparison control over the classes and students of each attack (Holm: family-wise; bh: false discovery rate).")
@click.option("--power", type=float, default=0.8, show_default=True, help="Power at which the detectable gain of an untransferred class is reported.")
@click.option("--safe-below", type=float, help="A class not transferred is 'safe at this power' only when its detectable gain is below this (points).")
@click.option("--bootstrap", type=click.IntRange(min=100), default=None, hidden=True,
              help="Ignored since audit.json schema 2 (the intervals are analytic); still checked (>= 100) for old scripts.")
@click.option("--param", "params", multiple=True, help="Attack parameter ATTACK.KEY=VALUE (repeatable), e.g. kd.temperature=8.")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]))
@click.option("--schedule", type=click.Choice(["constant", "cosine", "multistep", "onecycle"]))
@click.option("--deterministic", is_flag=True, default=None)
@click.option("--out", type=click.Path(file_okay=False), help="Audit folder (default runs/audit-<teacher>); re-run to resume.")
@click.option("--force", is_flag=True, help="Discard what --out holds and start afresh.")
@click.option("--verbose", is_flag=True, help="Log every epoch of every run.")
@click.option("--json", "as_json", is_flag=True, help="Print the headline per attack as one JSON object.")
def audit_cmd(**kw) -> int:
    """Audit a teacher: which classes can each attack copy? Writes audit.json/.md/.html.

    Exit codes: 0 ok, 1 an attack transfers more than --fail-on classes, 2 bad input, 3 incomplete.
    """

    from .audit.render import terminal_table
    from .audit.run import AuditSettings, run_audit, slug
    from .checkpoint import read_sidecar
    from .config import load_config

    params: dict[str, dict] = {}
    for item in kw["params"]:
        key, eq, value = item.partition("=")
        attack, dot, name = key.partition(".")
        if not eq or not dot or not attack or not name:
            raise NastyError(f"--param {item!r} is not ATTACK.KEY=VALUE (e.g. kd.temperature=8)")
        params.setdefault(attack, {})[name] = _param_value(item, value)
    _, side = read_sidecar(kw["teacher"])
    over = _base_overrides(kw)
    if kw["dataset"] is None and kw["config"] is None:
        over["data"]["dataset"] = side["dataset"]
        from .checkpoint import split_settings

        for k, v in split_settings(side).items():  # type-checked: the sidecar may be hostile
            if over["data"].get(k) is None and v is not None:
                over["data"][k] = v
    cfg = load_config(kw["config"], over)
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    settings = AuditSettings(teacher=kw["teacher"], cfg=cfg, attacks=split(kw["attacks"]), students=split(kw["students"]),
                             seeds=kw["seeds"], reference=kw["reference"], query=kw["query"], margin=kw["margin"],
                             fidelity=kw["fidelity"], fail_on=kw["fail_on"], n_boot=kw["bootstrap"], params=params,
                             correction=kw["correction"], power=kw["power"], safe_below=kw["safe_below"],
                             surrogate=kw["surrogate"], queries=kw["queries"], output_defense=kw["output_defense"], fuse=kw["fuse"],
                             first_seed=kw["first_seed"], baselines_from=list(kw["baselines_from"]))
    teacher_dir = Path(kw["teacher"]).parent if Path(kw["teacher"]).suffix else Path(kw["teacher"])
    out = Path(kw["out"]) if kw["out"] else Path("runs") / f"audit-{slug(teacher_dir.resolve().name)}"
    if kw["force"] and out.is_dir() and any(out.iterdir()):
        from .runs import check_replaceable

        check_replaceable(out, cfg)  # --force deletes only an old run, never an input or the current folder
    from .runs import lock_out_dir

    lock_out_dir(out, beside=True)  # one audit at a time in a folder
    audit = run_audit(settings, out, force=kw["force"], log=_log, verbose=kw["verbose"])
    headline = {"out_dir": str(out), "status": audit["status"], "gate": audit["gate"],
                "targets": {g: {a: {k: v[k] for k in ("method", "rule", "status", "reason", "transferred_classes", "transferred_count")}
                                for a, v in t["attacks"].items()} for g, t in audit["targets"].items()}}
    _emit(headline, kw["as_json"], lambda: click.echo(terminal_table(audit) + f"\nreport: {out / 'audit.html'}"))
    return 1 if audit["gate"]["failed"] else 0


@cli.command("report")
@click.argument("audit_json", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), help="Folder for audit.md and audit.html (default: beside the JSON).")
@click.option("--format", "formats", default="md,html", show_default=True, help="Comma-separated: md, html.")
def report_cmd(audit_json: str, out: str | None, formats: str) -> None:
    """Re-render audit.md and audit.html from an audit.json."""
    from .audit.render import terminal_table, write_reports
    from .audit.schema import load_audit

    fmts = tuple(f.strip() for f in formats.split(",") if f.strip())
    bad = [f for f in fmts if f not in ("md", "html")]
    if bad or not fmts:
        raise NastyError(f"unknown --format {bad[0] if bad else formats!r} (choose md, html)")
    from .audit.render import render_html, render_markdown

    audit = load_audit(audit_json)
    folder = Path(out) if out else (Path(audit_json) if Path(audit_json).is_dir() else Path(audit_json).parent)
    try:  # an audit.json is a file like any other: render everything in memory before writing anything
        table = terminal_table(audit)
        for fmt in fmts:
            (render_markdown if fmt == "md" else render_html)(audit)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as e:
        raise NastyError(f"{audit_json}: malformed audit ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    written = write_reports(audit, folder, fmts)
    click.echo(table)
    click.echo("wrote " + ", ".join(str(p) for p in written))


class _Finite(click.ParamType):
    """A float option (``click.FLOAT`` or a ``FloatRange``) that also refuses NaN and infinities:
    ``--margin nan`` would otherwise pass every comparison it meets and give a silent wrong answer."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = inner.name

    def get_metavar(self, *a: Any, **k: Any):
        return self.inner.get_metavar(*a, **k)

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        import math

        v = self.inner.convert(value, param, ctx)
        if isinstance(v, float) and not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


def _finite_floats(group: click.Group) -> None:
    """Wrap every float option of every command of ``group`` (recursively) in :class:`_Finite`:
    one rule for all float options, also for those added later."""
    for cmd in group.commands.values():
        if isinstance(cmd, click.Group):
            _finite_floats(cmd)
        for p in cmd.params:
            if isinstance(p.type, click.types.FloatParamType):
                p.type = _Finite(p.type)


_finite_floats(cli)  # here for every command defined above; main() repeats it for any added later


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors, documented exit codes (0 ok, 1 gate failed, 2 bad input, 3 could not complete)."""
    _finite_floats(cli)
    args = sys.argv[1:] if argv is None else argv
    if not args:
        with click.Context(cli, info_name="nasty") as ctx:
            click.echo(cli.get_help(ctx))
        return 0
    try:
        rv = cli.main(args=args, prog_name="nasty", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.UsageError as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except NastyError as e:
        click.echo(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except MemoryError:
        click.echo("error: out of memory (the data, the model or one batch did not fit); use fewer or smaller images "
                   "(--train-subset), a smaller --model or a lower --batch-size", err=True)
        return 3
    except Exception as e:  # a bug: still one line, the traceback only on request
        if os.environ.get("NASTY_DEBUG"):
            raise
        click.echo(f"error: internal error {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (set NASTY_DEBUG=1 for the traceback)", err=True)
        return 3


def entry() -> None:
    sys.exit(main())
