"""The ``nasty`` command line. Progress and logs go to stderr; ``--json`` prints one object on stdout.

Bad input never gives a traceback: it gives one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable

import click

from . import config, distributed, safe_io
from . import escape as esc
from .attacks import ATTACKS
from .audit.plan import AUDIT_PARAMS
from .audit.ray_executor import RayExecutor
from .audit.render import render_html, render_markdown, terminal_table, write_reports
from .audit.run import AuditSettings, run_audit
from .audit.schema import load_audit
from .checkpoint import atomic_write_json, load_checkpoint, read_sidecar, split_settings
from .data import list_datasets
from .defenses import list_defenses
from .defenses.lock import LOCK_PARAMS
from .errors import USER_PATH_ERRNOS, NastyError, error_line, short_paths
from .export import export_cmd
from .models import list_models, model_doc, model_prefixes
from .params import Param, click_option, option_value
from .pipelines.attack import plan_attack, run_attack_plan
from .pipelines.checkpoints import convert_job, eval_job, lock_job
from .pipelines.defended import train_defended
from .registry import parse_assignment, slug
from .resume import Checkpointing, first_difference
from .runs import check_replaceable, clean_leftovers, data_from_config, has_content, lock_out_dir, prepare_out_dir, train_normal


def _log(msg: str) -> None:
    if distributed.is_main():  # under torchrun only rank 0 talks
        click.echo(esc.term(msg), err=True)  # a log message is one line: data in it cannot forge another


def _emit(obj: Any, as_json: bool, human: Callable[[], None]) -> None:
    if not distributed.is_main():
        return
    if as_json:
        click.echo(json.dumps(obj, indent=None, default=str))
    else:
        human()


# ----------------------------------------------------------------------------------------------
# options generated from the parameter declarations (nasty.params.Param; the schema is nasty.config)

DATA_KEYS = ("dataset", "data_root", "download", "train_subset", "augment")
TRAIN_KEYS = ("epochs", "batch_size", "lr", "optimizer", "schedule", "seed", "deterministic")


def _declared(section: str, keys: tuple[str, ...] | None = None) -> list[tuple[str, str, Param]]:
    params = config.TRAIN_SCHEMA if section == "train" else config.SCHEMA[section]
    return [(section, k, p) for k, p in params.items() if (keys is None or k in keys) and p.flag != ""]


def _attack_flags() -> list[tuple[str, str, Param]]:
    """The attack parameters declared with a flag (a :class:`Param`), across all attacks; one option per name."""
    seen: dict[str, Param] = {}
    for cls in ATTACKS.values():
        for k, p in cls.params.items():
            if isinstance(p, Param) and p.flag != "":
                if seen.setdefault(k, p).kind != p.kind:
                    raise ValueError(f"attack parameter {k} is declared with two kinds")
    return [("attack.options", k, p) for k, p in seen.items()]


def _generated(decl: list[tuple[str, str, Param]]):
    """Decorator adding one click option per declared parameter (destination ``section__key``)."""

    def deco(f):
        for sec, key, p in reversed(decl):
            f = click_option(key, p, dest=f"{sec.replace('.', '_')}__{key}")(f)
        return f

    return deco


def _overrides(kw: dict, decl: list[tuple[str, str, Param]]) -> dict:
    """The config overrides of the given options, each checked against its declaration and named by its flag."""
    over: dict[str, dict] = {}
    for sec, key, p in decl:
        value = option_value(key, p, kw.get(f"{sec.replace('.', '_')}__{key}"))
        if value is None:
            continue
        value = p.validate(p.flag_name(key), value) if p.kind != "train" else value
        section, _, sub = sec.partition(".")
        target = over.setdefault(section, {})
        if sub:
            target = target.setdefault(sub, {})
        target[key] = value
    return over


COMMON_OPTIONS = _declared("data", DATA_KEYS) + _declared("model") + _declared("train", TRAIN_KEYS)


def _common(f):
    """Options shared by the training commands: the config file, data, model, training, run folder."""
    opts = [
        click.option("--config", "config", type=click.Path(dir_okay=False), help="TOML config (one experiment); flags override it."),
        _generated(COMMON_OPTIONS),
        click.option("--out", type=click.Path(file_okay=False), help="Output directory (one run = one directory)."),
        click.option("--force", is_flag=True, help="Overwrite a non-empty --out."),
        click.option("--resume", is_flag=True, help="Continue the interrupted run in --out (same options) from its last completed epoch."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout at the end."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _load(kw: dict, extra: dict | None = None) -> dict:
    """The resolved config of a command: defaults, then ``--config``, then the generated options and ``extra``."""
    over = _overrides(kw, COMMON_OPTIONS)
    for sec, table in (extra or {}).items():
        over.setdefault(sec, {}).update({k: v for k, v in table.items() if v is not None})
    return config.load_config(kw.get("config"), over)


def _run_dir(kw: dict, cfg: dict, default_name: str) -> tuple[Path, Checkpointing]:
    """The run's output folder and what its trainings do with it: a fresh folder (``--force`` to
    overwrite) whose trainings save their state after every epoch, or with ``--resume`` the folder of
    an interrupted run whose ``run.json`` must hold the same config, continued from those states."""
    command = click.get_current_context().info_name
    ck = Checkpointing(save=True, resume=bool(kw.get("resume")))
    if distributed.enabled() and not kw["out"]:
        raise NastyError("under torchrun pass --out: every rank must use the same run folder")
    if not distributed.is_main():  # under torchrun rank 0 prepares the folder; the others wait for it
        distributed.barrier()
        return Path(kw["out"]), ck
    if kw.get("resume"):
        out = _resume_dir(kw, cfg, command)
    else:
        out = prepare_out_dir(kw["out"], kw["force"], default_name, inputs=cfg)
    atomic_write_json(out / "run.json", {"command": command, "config": cfg})
    distributed.barrier()
    return out, ck


def _resume_dir(kw: dict, cfg: dict, command: str) -> Path:
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
        diff = first_difference(prev.get("config"), json.loads(json.dumps(cfg)))
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
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="nasty")
def cli() -> None:
    """nasty: make image classifiers undistillable, attack them, and audit what a thief can copy."""


@cli.command("train-teacher")
@_common
@_generated(_declared("train", ("label_smoothing",)))
def train_teacher(**kw) -> None:
    """Train a normal teacher (cross-entropy)."""
    cfg = _load(kw, _overrides(kw, _declared("train", ("label_smoothing",))))
    data = data_from_config(cfg)
    out, ck = _run_dir(kw, cfg, f"teacher-{slug(cfg['data']['dataset'])}")
    _, metrics = train_normal(cfg, data, out, log=_log, ck=ck)
    result = {"accuracy": metrics["test"]["accuracy"], "per_class_accuracy": metrics["test"]["per_class_accuracy"],
              "val_accuracy": metrics["val_accuracy"], "best_epoch": metrics["best_epoch"], "checkpoint": str(out)}
    atomic_write_json(out / "result.json", result)
    _emit(result, kw["as_json"], lambda: click.echo(esc.term(f"teacher test accuracy {result['accuracy']:.2f}% -> {out}")))


DEFENSE_OPTIONS = _declared("defense") + _declared("probe", ("students", "train_subset", "labelled", "queries", "seeds", "attacks", "jobs"))


@cli.command("train-defended")
@_common
@_generated(DEFENSE_OPTIONS)
@click.option("--defense-epochs", type=int, help="Epochs of the defended phase (default: [defense.train] or --epochs).")
@click.option("--defense-lr", type=float, help="Learning rate of the defended phase.")
@click.option("--no-probe", is_flag=True, help="Skip the KD probe.")
def train_defended_cmd(**kw) -> None:
    """Train a defended ("nasty") teacher, then probe it with KD students and print a verdict."""
    over = _overrides(kw, DEFENSE_OPTIONS)
    train = {k: v for k, v in (("epochs", kw["defense_epochs"]), ("lr", kw["defense_lr"])) if v is not None}
    if train:
        over.setdefault("defense", {})["train"] = train
    if kw["no_probe"]:
        over.setdefault("probe", {})["enabled"] = False
    cfg = _load(kw, over)
    # refuse unreadable or hostile checkpoints before --force clears the output folder
    for path in [*cfg["defense"]["adversary"], *([cfg["defense"]["init_from"]] if cfg["defense"]["init_from"] not in (None, "adversary") else [])]:
        load_checkpoint(path)
    out, ck = _run_dir(kw, cfg, f"defended-{slug(cfg['data']['dataset'])}")
    result = train_defended(cfg, out, log=_log, ck=ck)
    result["out_dir"] = str(out)
    _emit(result, kw["as_json"], lambda: click.echo(result["verdict"] + f"\nrun saved in {esc.term(out)}"))


ATTACK_OPTIONS = _declared("attack") + _attack_flags()


@cli.command("attack")
@_common
@_generated(ATTACK_OPTIONS)
@click.option("--param", "params", multiple=True, help="Method parameter KEY=VALUE (repeatable).")
@click.option("--output-defense", help="Post-process the teacher's probabilities when queried, e.g. topk:2,round:3 (see nasty.defenses.output).")
@click.option("--labels/--no-labels", "labels", default=None, help="Whether the attacker holds the labels of its images (default: yes; no with --surrogate).")
def attack_cmd(**kw) -> None:
    """Train a student against a teacher with one attack and score it on the test split."""
    over = _overrides(kw, ATTACK_OPTIONS)
    options = over.get("attack", {}).pop("options", {})
    for item in kw["params"]:
        key, value = parse_assignment(item, "--param")
        options[key] = value
    if options:
        over.setdefault("attack", {})["options"] = options
    cfg = _load(kw, over)
    plan = plan_attack(cfg, output_defense=kw["output_defense"], labels=kw["labels"], query_given=_explicit_query(kw), log=_log)
    a = cfg["attack"]
    out, ck = _run_dir(kw, cfg, f"attack-{a['method']}")
    result = run_attack_plan(plan, out, _log, ck)
    _emit(result, kw["as_json"], lambda: click.echo(esc.term(f"{a['method']} student {a['student']}: test accuracy {result['accuracy']:.2f}%"
                                                     + (f", agreement with teacher {result['teacher_agreement']:.2f}%" if "teacher_agreement" in result else "")
                                                     + (f", undistillable classes {result['undistillable_classes']}" if "undistillable_classes" in result else "")
                                                     + f" -> {out}")))


def _explicit_query(kw: dict) -> bool:
    """Whether --query or the config file's [attack] query was given (not the schema default)."""
    if kw.get("attack__query") is not None:
        return True
    if not kw["config"]:
        return False
    return "query" in tomllib.loads(Path(kw["config"]).read_text()).get("attack", {})


@cli.command("lock")
@click.option("--decision", required=True, type=click.Path(), help="The normal model: it makes every decision.")
@click.option("--nasty", "nasty_part", required=True, type=click.Path(), help="The nasty network whose soft outputs are served.")
@click.option("--lock-rule", type=click.Choice(["swap", "margin"]), default="swap", show_default=True)
@click.option("--lock-margin", type=float, default=0.0, show_default=True)
@click.option("--keep", default=LOCK_PARAMS["keep"].default, show_default=True, help=LOCK_PARAMS["keep"].help)
@click.option("--out", required=True, help="Folder of the locked checkpoint.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out.")
@click.option("--json", "as_json", is_flag=True)
def lock_cmd(decision: str, nasty_part: str, lock_rule: str, lock_margin: float, keep: str, out: str, force: bool, as_json: bool) -> None:
    """Lock an existing nasty network to a normal model's decisions (one two-net artifact)."""
    res = lock_job(decision, nasty_part, out, rule=lock_rule, margin=lock_margin, keep=keep, force=force)
    _emit(res, as_json, lambda: click.echo(esc.term(f"locked teacher -> {res['checkpoint']} (decisions from {decision}, soft outputs from {nasty_part})")))


@cli.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--dataset", help="Dataset (default: the checkpoint's).")
@click.option("--data-root")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(checkpoint: str, dataset: str | None, data_root: str | None, split: str, as_json: bool) -> None:
    """Overall and per-class accuracy and the confusion matrix of a checkpoint."""
    res, data = eval_job(checkpoint, dataset, data_root, split)

    def human() -> None:
        click.echo(f"{esc.term(res['dataset'])} {split}: accuracy {res['accuracy']:.2f}% on {res['n']} images")
        names = [esc.term(c) for c in data.classes]  # class names come from the data (folder names): one line each
        width = max(len(c) for c in names)
        for c, acc in zip(names, res["per_class_accuracy"]):
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
    result, data = convert_job(source, model_spec, out, dataset=dataset, data_root=data_root, key=key, mean=mean, std=std, force=force)
    _emit(result, as_json, lambda: click.echo(esc.term(f"converted {source} -> {result['checkpoint']} (test accuracy {result['accuracy']:.2f}% on {data.name})")))


@cli.command("models")
@click.option("--json", "as_json", is_flag=True)
def models_cmd(as_json: bool) -> None:
    """List the registered architectures."""
    rows = {m: model_doc(m) for m in list_models()}
    rows.update({f"{p}:NAME": d for p, d in model_prefixes().items()})
    width = max(map(len, rows))
    _emit(rows, as_json, lambda: [click.echo(f"{k:{width}s} {v}") for k, v in rows.items()])


@cli.command("datasets")
@click.option("--json", "as_json", is_flag=True)
def datasets_cmd(as_json: bool) -> None:
    """List the known datasets and where their files must be."""
    rows = list_datasets()
    _emit(rows, as_json, lambda: [click.echo(f"{k:16s} {v}") for k, v in rows.items()])


@cli.command("attacks")
@click.option("--json", "as_json", is_flag=True)
def attacks_cmd(as_json: bool) -> None:
    """List the registered attacks and what each needs."""
    rows = {k: {"summary": c.summary, "access": list(c.accepts) if c.needs_teacher else [], "needs_labels": c.needs_labels,
                "params": c.defaults()} for k, c in sorted(ATTACKS.items())}
    _emit(rows, as_json, lambda: [click.echo(f"{k:16s} {v['summary']}  [access: {', '.join(v['access']) or 'none'}]") for k, v in rows.items()])


@cli.command("defenses")
@click.option("--json", "as_json", is_flag=True)
def defenses_cmd(as_json: bool) -> None:
    """List the registered training-time defenses."""
    rows = list_defenses()
    _emit(rows, as_json, lambda: [click.echo(f"{k:16s} {v}") for k, v in rows.items()])


AUDIT_DATA_TRAIN = _declared("data", ("dataset", "data_root", "download", "train_subset")) + _declared("train", TRAIN_KEYS[:-2] + ("deterministic",))
AUDIT_OPTIONS = [("audit", k, p) for k, p in AUDIT_PARAMS.items()]


@cli.command("audit")
@click.argument("teacher", type=click.Path())
@click.option("--config", "config", type=click.Path(dir_okay=False), help="TOML config: its [data] and [train] set the thief's data and training.")
@_generated(AUDIT_DATA_TRAIN)
@_generated(AUDIT_OPTIONS)
@click.option("--bootstrap", type=click.IntRange(min=100), default=None, hidden=True,
              help="Ignored since audit.json schema 2 (the intervals are analytic); still checked (>= 100) for old scripts.")
@click.option("--param", "params", multiple=True, help="Attack parameter ATTACK.KEY=VALUE (repeatable), e.g. kd.temperature=8.")
@click.option("--out", type=click.Path(file_okay=False), help="Audit folder (default runs/audit-<teacher>); re-run to resume.")
@click.option("--force", is_flag=True, help="Discard what --out holds and start afresh.")
@click.option("--verbose", is_flag=True, help="Log every epoch of every run.")
@click.option("--json", "as_json", is_flag=True, help="Print the headline per attack as one JSON object.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Train the runs in this process (local) or as Ray tasks (ray; pip install 'nasty[ray]'; docs/distributed.md).")
@click.option("--address", help="With --executor ray: join this Ray cluster (HEAD:6379) instead of starting Ray on this machine.")
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=None, help="With --executor ray: CPUs (threads) per task (a shared pass or a multi-stage run)  [default: 1]")
@click.option("--gpus-per-task", type=click.FloatRange(min=0), default=None, help="With --executor ray: GPUs per task (fractions share a GPU)  [default: 0]")
def audit_cmd(**kw) -> int:
    """Audit a teacher: which classes can each attack copy? Writes audit.json/.md/.html.

    The thief's data is the teacher's dataset and split unless --dataset or --config says otherwise.

    Exit codes: 0 ok, 1 an attack transfers more than --fail-on classes, 2 bad input, 3 incomplete.
    """

    given = {key: option_value(key, p, kw[f"audit__{key}"]) for _, key, p in AUDIT_OPTIONS}
    given = {key: p.validate(p.flag_name(key), given[key]) for _, key, p in AUDIT_OPTIONS if given[key] is not None}  # up front
    executor = None
    ray_only = [f"--{k.replace('_', '-')}" for k in ("address", "cpus_per_task", "gpus_per_task") if kw[k] is not None]
    if kw["executor"] != "ray" and ray_only:
        raise NastyError(f"{ray_only[0]} applies to --executor ray only")
    if kw["executor"] == "ray":  # before anything is loaded or trained: Ray installed, the cluster reachable
        executor = RayExecutor(address=kw["address"], cpus_per_task=kw["cpus_per_task"] or 1,
                               gpus_per_task=kw["gpus_per_task"] if kw["gpus_per_task"] is not None else 0.0)
    params: dict[str, dict] = {}
    for item in kw["params"]:
        key, value = parse_assignment(item, "--param", "ATTACK.KEY=VALUE (e.g. kd.temperature=8)")
        attack, dot, name = key.partition(".")
        if not dot or not attack or not name:
            raise NastyError(f"--param {item!r} is not ATTACK.KEY=VALUE (e.g. kd.temperature=8)")
        params.setdefault(attack, {})[name] = value
    _, side = read_sidecar(kw["teacher"])
    over = _overrides(kw, AUDIT_DATA_TRAIN)
    if kw["data__dataset"] is None and kw["config"] is None:
        data_over = over.setdefault("data", {})
        data_over["dataset"] = side["dataset"]
        for k, v in split_settings(side).items():  # type-checked: the sidecar may be hostile
            if data_over.get(k) is None and v is not None:
                data_over[k] = v
    cfg = config.load_config(kw["config"], over)
    settings = AuditSettings(teacher=kw["teacher"], cfg=cfg, n_boot=kw["bootstrap"], params=params,
                             **{k: v for k, v in given.items() if v is not None})
    teacher_dir = Path(kw["teacher"]).parent if Path(kw["teacher"]).suffix else Path(kw["teacher"])
    out = Path(kw["out"]) if kw["out"] else Path("runs") / f"audit-{slug(teacher_dir.resolve().name)}"
    if kw["force"] and out.is_dir() and any(out.iterdir()):
        check_replaceable(out, cfg)  # --force deletes only an old run, never an input or the current folder
    lock_out_dir(out, beside=True)  # one audit at a time in a folder
    audit = run_audit(settings, out, force=kw["force"], log=_log, verbose=kw["verbose"], executor=executor)
    headline = {"out_dir": str(out), "status": audit["status"], "gate": audit["gate"],
                "targets": {g: {a: {k: v.get(k) for k in ("method", "rule", "status", "reason", "transferred_classes", "transferred_count",
                                                          "pooled")}
                                for a, v in t["attacks"].items()} for g, t in audit["targets"].items()}}
    _emit(headline, kw["as_json"], lambda: click.echo(terminal_table(audit) + f"\nreport: {esc.term(out / 'audit.html')}"))
    return 1 if audit["gate"]["failed"] else 0


@cli.command("report")
@click.argument("audit_json", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), help="Folder for audit.md and audit.html (default: beside the JSON).")
@click.option("--format", "formats", default="md,html", show_default=True, help="Comma-separated: md, html.")
def report_cmd(audit_json: str, out: str | None, formats: str) -> None:
    """Re-render audit.md and audit.html from an audit.json."""
    fmts = tuple(f.strip() for f in formats.split(",") if f.strip())
    bad = [f for f in fmts if f not in ("md", "html")]
    if bad or not fmts:
        raise NastyError(f"unknown --format {bad[0] if bad else formats!r} (choose md, html)")
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
    click.echo(esc.term("wrote " + ", ".join(str(p) for p in written)))


cli.add_command(export_cmd)


class _Finite(click.ParamType):
    """A float option (``click.FLOAT`` or a ``FloatRange``) that also refuses NaN and infinities:
    ``--margin nan`` would otherwise pass every comparison it meets and give a silent wrong answer."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = inner.name

    def get_metavar(self, *a: Any, **k: Any):
        return self.inner.get_metavar(*a, **k)

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        try:  # first, so that a range (FloatRange) does not answer "-inf is not in the range" instead
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return self.inner.convert(value, param, ctx)


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


def _os_error_line(e: OSError) -> str:
    return short_paths(f"{e.filename}: {e.strerror or e}" if e.filename is not None else f"{e.strerror or e}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors, documented exit codes (0 ok, 1 gate failed, 2 bad input, 3 could not complete).
    A run folder replaced with ``--force`` is deleted only when the command succeeded (exit 0), and put
    back otherwise (:func:`nasty.safe_io.settle`)."""
    rc = _main(argv)
    safe_io.settle(rc == 0)
    return rc


def _main(argv: list[str] | None = None) -> int:
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
        click.echo(f"error: {esc.term(e.format_message())}", err=True)
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except NastyError as e:
        click.echo(f"error: {esc.term(error_line(e))}", err=True)
        return e.exit_code
    except OSError as e:
        if e.errno in USER_PATH_ERRNOS:  # the path the user gave explains it (too long, no permission ...): bad input
            click.echo(f"error: {_os_error_line(e)}", err=True)
            return 2
        return _internal(e)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except MemoryError:
        click.echo("error: out of memory (the data, the model or one batch did not fit); use fewer or smaller images "
                   "(--train-subset), a smaller --model or a lower --batch-size", err=True)
        return 3
    except Exception as e:  # a bug: still one line, the traceback only on request
        return _internal(e)


def _internal(e: Exception) -> int:
    if os.environ.get("NASTY_DEBUG"):
        raise e
    click.echo(f"error: internal error {type(e).__name__}: {esc.term(short_paths(str(e).splitlines()[0])) if str(e) else ''} "
               "(set NASTY_DEBUG=1 for the traceback)", err=True)
    return 3


def entry() -> None:
    sys.exit(main())
