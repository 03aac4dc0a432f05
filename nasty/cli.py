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
    click.echo(msg, err=True)


def _emit(obj: Any, as_json: bool, human: Callable[[], None]) -> None:
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
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout at the end."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _base_overrides(kw: dict) -> dict:
    return {
        "data": {"dataset": kw.get("dataset"), "data_root": kw.get("data_root"), "download": kw.get("download"),
                 "train_subset": kw.get("train_subset")},
        "model": {"name": kw.get("model")},
        "train": {k: kw.get(k) for k in ("epochs", "batch_size", "lr", "optimizer", "schedule", "seed", "deterministic")},
    }


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise NastyError(f"{name} must be positive, got {value}")


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
    from .runs import data_from_config, prepare_out_dir, train_normal

    over = _base_overrides(kw)
    over["train"]["label_smoothing"] = kw["label_smoothing"]
    cfg = load_config(kw["config"], over)
    data = data_from_config(cfg)
    out = prepare_out_dir(kw["out"], kw["force"], f"teacher-{cfg['data']['dataset'].replace(':', '-').replace('/', '-')}")
    _, metrics = train_normal(cfg, data, out, log=_log)
    result = {"accuracy": metrics["test"]["accuracy"], "per_class_accuracy": metrics["test"]["per_class_accuracy"],
              "val_accuracy": metrics["val_accuracy"], "best_epoch": metrics["best_epoch"], "checkpoint": str(out)}
    from .checkpoint import atomic_write_json

    atomic_write_json(out / "result.json", result)
    _emit(result, kw["as_json"], lambda: click.echo(f"teacher test accuracy {result['accuracy']:.2f}% -> {out}"))


@cli.command("train-defended")
@_common
@click.option("--defense", "defense_name", help="Training-time defense (see `nasty defenses`); default nasty.")
@click.option("--tau", type=float, help="Temperature of the KL to the adversary.")
@click.option("--omega", type=float, help="Weight of the KL term (strength of the defense).")
@click.option("--omega-warmup", type=int, help="Ramp omega linearly over this many epochs.")
@click.option("--kl-cap", type=float, help="Cap each sample's KL to the adversary.")
@click.option("--adversary", multiple=True, type=click.Path(), help="Normal teacher checkpoint (repeatable). Without it one is trained first.")
@click.option("--adversary-model", help="Architecture of the adversary trained when --adversary is absent (default: --model).")
@click.option("--init-from", help="Fine-tune from a checkpoint, or 'adversary' for the (trained) adversary, instead of training from scratch.")
@click.option("--defense-epochs", type=int, help="Epochs of the defended phase (default: [defense.train] or --epochs).")
@click.option("--defense-lr", type=float, help="Learning rate of the defended phase.")
@click.option("--probe-students", help="Comma-separated student architectures for the KD probe.")
@click.option("--probe-subset", type=int, help="Labelled images the probe's students train on.")
@click.option("--no-probe", is_flag=True, help="Skip the KD probe.")
def train_defended_cmd(**kw) -> None:
    """Train a defended ("nasty") teacher, then probe it with KD students and print a verdict."""
    from .config import load_config
    from .defenses import train_defended
    from .runs import prepare_out_dir

    _positive("--tau", kw["tau"])
    over = _base_overrides(kw)
    over["defense"] = {"name": kw["defense_name"], "tau": kw["tau"], "omega": kw["omega"], "omega_warmup": kw["omega_warmup"],
                       "kl_cap": kw["kl_cap"], "adversary": list(kw["adversary"]) or None, "adversary_model": kw["adversary_model"],
                       "init_from": kw["init_from"],
                       "train": {k: v for k, v in (("epochs", kw["defense_epochs"]), ("lr", kw["defense_lr"])) if v is not None}}
    over["probe"] = {"enabled": False if kw["no_probe"] else None, "train_subset": kw["probe_subset"],
                     "students": [s.strip() for s in kw["probe_students"].split(",") if s.strip()] if kw["probe_students"] else None}
    cfg = load_config(kw["config"], over)
    out = prepare_out_dir(kw["out"], kw["force"], f"defended-{cfg['data']['dataset'].replace(':', '-').replace('/', '-')}")
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
def attack_cmd(**kw) -> None:
    """Train a student against a teacher with one attack and score it on the test split."""
    import ast

    from .attacks import get_attack, run_attack
    from .checkpoint import atomic_write_json, check_compatible, load_checkpoint, read_sidecar
    from .config import load_config, train_config
    from .runs import data_from_config, prepare_out_dir, save_model

    _positive("--temperature", kw["temperature"])
    over = _base_overrides(kw)
    over["attack"] = {"method": kw["method"], "teacher": list(kw["teacher"]) or None, "student": kw["student"],
                      "temperature": kw["temperature"], "alpha": kw["alpha"], "query": kw["query"]}
    options: dict[str, Any] = {}
    for item in kw["params"]:
        key, eq, value = item.partition("=")
        if not eq:
            raise NastyError(f"--param {item!r} is not KEY=VALUE")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    over["attack"]["options"] = options or None
    cfg = load_config(kw["config"], over)
    a = cfg["attack"]
    cls = get_attack(a["method"])
    params = dict(a["options"])
    for k in ("temperature", "alpha"):
        if k in cls.params and k not in params:
            params[k] = a[k]
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
    out = prepare_out_dir(kw["out"], kw["force"], f"attack-{a['method']}")
    atomic_write_json(out / "config.json", cfg)
    student, result = run_attack(a["method"], data=data, teachers=teachers, student=a["student"], train=train_config(cfg),
                                 params=params, query=a["query"], out_dir=out, log=_log)
    result["teacher"] = list(a["teacher"])
    save_model(out, student, data, cfg, {"test": {k: result[k] for k in ("accuracy", "per_class_accuracy")}})
    atomic_write_json(out / "result.json", result)
    _emit(result, kw["as_json"], lambda: click.echo(f"{a['method']} student {a['student']}: test accuracy {result['accuracy']:.2f}%"
                                                     + (f", agreement with teacher {result['teacher_agreement']:.2f}%" if "teacher_agreement" in result else "")
                                                     + f" -> {out}"))


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

    model, side = load_checkpoint(checkpoint)
    name = dataset or side["dataset"]
    split_cfg = side.get("config", {}).get("data", {}) if isinstance(side.get("config"), dict) else {}
    data = load_dataset(name, data_root or split_cfg.get("data_root"), val_fraction=split_cfg.get("val_fraction", 0.1),
                        split_seed=split_cfg.get("split_seed", 0),
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
    from .attacks import _ATTACKS

    rows = {k: {"summary": c.summary, "access": list(c.accepts) if c.needs_teacher else [], "needs_labels": c.needs_labels,
                "params": c.params} for k, c in sorted(_ATTACKS.items())}
    _emit(rows, as_json, lambda: [click.echo(f"{k:16s} {v['summary']}  [access: {', '.join(v['access']) or 'none'}]") for k, v in rows.items()])


@cli.command("defenses")
@click.option("--json", "as_json", is_flag=True)
def defenses_cmd(as_json: bool) -> None:
    """List the registered training-time defenses."""
    from .defenses import list_defenses

    rows = list_defenses()
    _emit(rows, as_json, lambda: [click.echo(f"{k:16s} {v}") for k, v in rows.items()])


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors, documented exit codes (0 ok, 1 gate failed, 2 bad input, 3 could not complete)."""
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
        click.echo("error: out of memory; lower --batch-size or use a smaller --model", err=True)
        return 3
    except Exception as e:  # a bug: still one line, the traceback only on request
        if os.environ.get("NASTY_DEBUG"):
            raise
        click.echo(f"error: internal error {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (set NASTY_DEBUG=1 for the traceback)", err=True)
        return 3


def entry() -> None:
    sys.exit(main())
