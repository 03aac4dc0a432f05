#!/usr/bin/env python
"""Benchmark of the attack suite: every attack x students x seeds against a normal and a defended
teacher (checkpoint paths), on the data a thief holds (a labelled subset of the training split).

For every attack, student and seed it records the test accuracy minus the label-only twin (``scratch``,
same student, same seed, same data), minus the label-smoothing twin (CMIM's stricter bar), TLLM's
undistillable classes, the queries and the runtime. The summary says which attacks re-open the
defended teacher and how much of the normal teacher's KD gain each recovers.

Writes ``OUT/runs.jsonl`` (one line per finished run; ``--resume`` skips those), ``OUT/bench_attacks.json``
and ``OUT/bench_attacks.md``. Example (full scale, hours on 2 CPU cores):

    python benchmarks/bench_attacks.py --normal runs/fm/teacher --defended runs/fm/defended \\
        --dataset fashion-mnist --train-subset 3000 --students mlp,cnn:width=0.25 --seeds 0,1,2 \\
        --epochs 40 --schedule onecycle --surrogate npz:../shared/datasets/mnist.npz --out runs/bench-attacks

Tiny check (seconds): ``--dataset digits --epochs 1 --seeds 0`` with digits teachers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nasty.attacks import get_attack, run_attack  # noqa: E402
from nasty.attacks.base import load_surrogate  # noqa: E402
from nasty.checkpoint import atomic_write_json, check_compatible, load_checkpoint, read_sidecar  # noqa: E402
from nasty.data import load_dataset  # noqa: E402
from nasty.errors import NastyError  # noqa: E402
from nasty.metrics import evaluate  # noqa: E402
from nasty.train import TrainConfig  # noqa: E402

BASELINES = ("scratch", "label-smoothing")
ATTACKS = ("kd", "kd+mixup", "tllm", "skeptical", "averager", "hint", "attention", "ensemble", "copycat", "knockoff")
KINDS = ("normal", "defended")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--normal", action="append", required=True, help="normal teacher checkpoint (repeat for the ensemble attack)")
    p.add_argument("--defended", action="append", required=True, help="defended teacher checkpoint (repeat for the ensemble attack)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root")
    p.add_argument("--train-subset", type=int, default=3000, help="labelled images the attacker holds (default 3000)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--students", default="mlp,cnn:width=0.25")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="all", help=f"comma list of METHOD or METHOD+mixup/+cutmix (default all: {','.join(ATTACKS)})")
    p.add_argument("--query", default="logits", help="teacher access of the soft-label attacks (white-box ones use weights)")
    p.add_argument("--surrogate", help="knockoff's query distribution, e.g. npz:../shared/datasets/mnist.npz (default: the attacker's images, unlabelled)")
    p.add_argument("--knockoff-queries", type=int, default=10000, help="knockoff's query budget (capped to the pool)")
    p.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override an attack parameter, e.g. tllm.delta=5 or attention.beta=100 (repeatable)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--schedule", default="onecycle")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="runs/bench-attacks")
    p.add_argument("--resume", action="store_true", help="keep OUT/runs.jsonl and skip the runs it already holds")
    p.add_argument("--quiet", action="store_true", help="no per-epoch logs")
    return p.parse_args(argv)


def parse_params(items: list[str]) -> dict[str, dict]:
    """``["tllm.delta=5"]`` -> ``{"tllm": {"delta": 5}}`` (values are Python literals, else strings)."""
    import ast

    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not eq or not dot:
            raise NastyError(f"--param {item!r} is not METHOD.KEY=VALUE")
        get_attack(method)(**{name: _literal(ast, value)})  # validates the name and the value
        out.setdefault(method, {})[name] = _literal(ast, value)
    return out


def _literal(ast, value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def method_spec(spec: str) -> tuple[str, str]:
    """``"kd+mixup"`` -> ``("kd", "mixup")``."""
    name, _, aug = spec.partition("+")
    get_attack(name)
    return name, aug or "none"


def load_teachers(paths: list[str], data, what: str) -> list[torch.nn.Module]:
    out = []
    for path in paths:
        model, side = load_checkpoint(path)
        check_compatible(side, data, f"{what} teacher {path}")
        out.append(model.eval())
    return out


def run_key(kind: str, method: str, student: str, seed: int) -> str:
    return f"{kind}|{method}|{student}|{seed}"


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(m: float | None, s: float | None = None, signed: bool = True) -> str:
    if m is None:
        return "n/a"
    body = f"{m:+.2f}" if signed else f"{m:.2f}"
    return body + (f" ± {s:.2f}" if s is not None else "")


def summarize(rows: list[dict], students: list[str], methods: list[str], seeds: list[int]) -> dict:
    by = {run_key(r["kind"], r["method"], r["student"], r["seed"]): r for r in rows}
    summary: dict = {}
    for st in students:
        base = {b: [by.get(run_key("none", b, st, s), {}).get("accuracy") for s in seeds] for b in BASELINES}
        kd_gain = [by[run_key("normal", "kd", st, s)]["accuracy"] - base["scratch"][i]
                   for i, s in enumerate(seeds) if run_key("normal", "kd", st, s) in by and base["scratch"][i] is not None]
        gain_normal_kd, _ = mean_sd(kd_gain)
        per_method = {}
        for m in methods:
            entry: dict = {}
            for kind in KINDS:
                runs = [by.get(run_key(kind, m, st, s)) for s in seeds]
                done = [(r, base["scratch"][i], base["label-smoothing"][i]) for i, r in enumerate(runs) if r and not r.get("skipped")]
                skipped = next((r["skipped"] for r in runs if r and r.get("skipped")), None)
                if not done:
                    entry[kind] = {"skipped": skipped or "not run"}
                    continue
                d_scratch = [r["accuracy"] - b for r, b, _ in done if b is not None]
                d_ls = [r["accuracy"] - b for r, _, b in done if b is not None]
                e = {
                    "accuracy": mean_sd([r["accuracy"] for r, _, _ in done]),
                    "minus_scratch": mean_sd(d_scratch),
                    "minus_scratch_per_seed": d_scratch,
                    "minus_label_smoothing": mean_sd(d_ls),
                    "teacher_agreement": mean_sd([r.get("teacher_agreement") for r, _, _ in done]),
                    "train_seconds": mean_sd([r["train_seconds"] for r, _, _ in done]),
                    "queries": mean_sd([r["resources"]["queries"] for r, _, _ in done]),
                    "n_seeds": len(done),
                }
                if m == "tllm":
                    e["undistillable_count"] = mean_sd([len(r["undistillable_classes"]) for r, _, _ in done])
                    e["undistillable_classes"] = [r["undistillable_classes"] for r, _, _ in done]
                if gain_normal_kd and gain_normal_kd > 0 and e["minus_scratch"][0] is not None:
                    e["recovery_of_normal_kd_gain"] = e["minus_scratch"][0] / gain_normal_kd
                e["beats_label_only_every_seed"] = bool(d_scratch) and all(v > 0 for v in d_scratch)
                entry[kind] = e
            per_method[m] = entry
        summary[st] = {
            "baselines": {b: mean_sd(v) for b, v in base.items()},
            "normal_kd_gain": gain_normal_kd,
            "methods": per_method,
        }
    return summary


def markdown(summary: dict, meta: dict) -> str:
    lines = ["# Attack benchmark", "", f"Command: `{meta['command']}`", "",
             f"Data: {meta['dataset']}, attacker holds {meta['train_images']} labelled training images "
             f"({meta['val_images']} more for validation); test split {meta['test_images']} images. "
             f"Seeds {meta['seeds']}; {meta['epochs']} epochs, {meta['optimizer']} lr {meta['lr']} {meta['schedule']}, "
             f"batch {meta['batch_size']}; soft-label access `{meta['query']}`; white-box attacks use `weights`. "
             f"Machine: {meta['machine']}, {meta['threads']} torch threads.", "",
             "Teachers (test accuracy): " + ", ".join(f"{k} {v['path']} {v['accuracy']:.2f}%" for k, v in meta["teachers"].items()), "",
             "Cells: mean ± standard deviation over seeds of the student's test accuracy minus its label-only twin "
             "(`scratch`, same student, seed and data), in points. *Recovery*: the defended-teacher gain as a fraction "
             "of the gain KD from the normal teacher gives. *Re-opens*: the attack beats the label-only twin against the "
             "defended teacher for every seed. `copycat` and `knockoff` use no ground-truth labels (knockoff queries "
             f"{meta['knockoff_data']}, budget {meta['knockoff_queries']}).", ""]
    for st, s in summary.items():
        b = s["baselines"]
        lines += [f"## Student `{st}`", "",
                  f"Label-only (scratch) {fmt(*b['scratch'], signed=False)}%, label smoothing {fmt(*b['label-smoothing'], signed=False)}%; "
                  f"KD gain from the normal teacher: {fmt(s['normal_kd_gain'])} points.", "",
                  "| attack | normal: − scratch | defended: − scratch | defended: − label smoothing | recovery | re-opens defended | TLLM \\|U\\| (normal / defended) | runtime s (normal / defended) |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, e in s["methods"].items():
            n, d = e["normal"], e["defended"]
            if "skipped" in n and "skipped" in d:
                lines.append(f"| {m} | skipped: {str(n['skipped']).split(':')[0]} | | | | | | |")
                continue
            cell = lambda x, k: fmt(*x[k]) if k in x else f"skipped: {str(x.get('skipped')).split(':')[0]}"  # noqa: E731
            rec = d.get("recovery_of_normal_kd_gain")
            u = " / ".join(fmt(*x["undistillable_count"], signed=False) if "undistillable_count" in x else "–" for x in (n, d))
            rt = " / ".join(f"{x['train_seconds'][0]:.1f}" if "train_seconds" in x else "–" for x in (n, d))
            lines.append(f"| {m} | {cell(n, 'minus_scratch')} | {cell(d, 'minus_scratch')} | {cell(d, 'minus_label_smoothing')} | "
                         f"{'n/a' if rec is None else f'{100 * rec:.0f}%'} | {'yes' if d.get('beats_label_only_every_seed') else 'no'} | "
                         f"{u if m == 'tllm' else '–'} | {rt} |")
        lines.append("")
    best = [(st, m, e["defended"]["recovery_of_normal_kd_gain"]) for st, s in summary.items() for m, e in s["methods"].items()
            if e["defended"].get("recovery_of_normal_kd_gain") is not None]
    if best:
        st, m, r = max(best, key=lambda t: t[2])
        verdict = "meets" if r >= 0.9 else "does not meet"
        lines += [f"Best recovery against the defended teacher: `{m}` with student `{st}`, {100 * r:.0f}% of the normal "
                  f"teacher's KD gain ({verdict} the 90% target).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    students = [s.strip() for s in args.students.split(",") if s.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = list(ATTACKS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        method_spec(m)
    overrides = parse_params(args.param)
    out = Path(args.out)
    runs_file = out / "runs.jsonl"
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise NastyError(f"{out} is not empty; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    _, side = read_sidecar(args.normal[0])
    norm = (side["normalization"]["mean"], side["normalization"]["std"])
    for path in args.normal + args.defended:
        _, s2 = read_sidecar(path)
        if s2["normalization"] != side["normalization"]:
            raise NastyError(f"{path} normalises its inputs differently from {args.normal[0]}; the teachers must share one")
    data = load_dataset(args.dataset, args.data_root, val_fraction=args.val_fraction, split_seed=args.split_seed,
                        train_subset=args.train_subset, normalization=norm)
    teachers = {"normal": load_teachers(args.normal, data, "normal"), "defended": load_teachers(args.defended, data, "defended")}
    x_queries = x_val_queries = None
    knockoff_data = "the attacker's images (unlabelled)"
    if args.surrogate:
        sur = load_surrogate(args.surrogate, args.data_root, data, val_fraction=args.val_fraction, split_seed=args.split_seed)
        x_queries, x_val_queries, knockoff_data = sur.x_train, sur.x_val, f"{args.surrogate} (surrogate)"
    knockoff_pool = len(x_queries) if x_queries is not None else len(data.y_train)

    done: dict[str, dict] = {}
    if runs_file.is_file():
        for line in runs_file.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[run_key(r["kind"], r["method"], r["student"], r["seed"])] = r
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    plan = [("none", b, st, s) for st in students for s in seeds for b in BASELINES]
    plan += [(k, m, st, s) for k in KINDS for m in methods for st in students for s in seeds]
    t_start = time.perf_counter()
    for i, (kind, spec, st, seed) in enumerate(plan, 1):
        key = run_key(kind, spec, st, seed)
        if key in done:
            continue
        name, aug = method_spec(spec)
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                          schedule=args.schedule, seed=seed)
        kw: dict = {"query": args.query, "augment": aug}
        ts = teachers.get(kind, [])
        cls = get_attack(name)
        if cls.accepts == ("weights",):
            kw["query"] = "weights"
        if name == "copycat":
            kw.update(labels=False, query="label")
        if name == "knockoff":
            kw.update(labels=False, x_queries=x_queries, x_val_queries=x_val_queries, data_source=knockoff_data,
                      query_budget=min(args.knockoff_queries, knockoff_pool))
        if name in overrides:
            kw["params"] = dict(overrides[name])
        teacher_list = ts if name == "ensemble" else ts[:1]
        row: dict = {"kind": kind, "method": spec, "student": st, "seed": seed}
        try:
            _, res = run_attack(name, data=data, teachers=teacher_list, student=st, train=cfg, log=None if args.quiet else log, **kw)
            row.update({k: res[k] for k in ("accuracy", "per_class_accuracy", "resources", "train_seconds", "params", "notes")})
            row["teacher_agreement"] = res.get("teacher_agreement")
            for k in ("undistillable_classes", "delta", "accuracy_undistillable", "accuracy_distillable"):
                if k in res:
                    row[k] = res[k]
            msg = f"acc {res['accuracy']:.2f} in {res['train_seconds']:.1f}s"
        except NastyError as e:  # e.g. ensemble with one teacher, attention with an MLP student
            row["skipped"] = str(e)  # the Markdown shows its first clause
            msg = f"skipped: {e}"
        with open(runs_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[key] = row
        print(f"[{i}/{len(plan)}] {kind} {spec} {st} seed {seed}: {msg} ({time.perf_counter() - t_start:.0f}s total)",
              file=sys.stderr, flush=True)

    rows = list(done.values())
    summary = summarize(rows, students, methods, seeds)
    meta = {
        "command": " ".join(["python benchmarks/bench_attacks.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "dataset": args.dataset, "train_images": int(len(data.y_train)), "val_images": int(len(data.y_val)),
        "test_images": int(len(data.y_test)), "seeds": seeds, "epochs": args.epochs, "optimizer": args.optimizer, "lr": args.lr,
        "schedule": args.schedule, "batch_size": args.batch_size, "query": args.query, "knockoff_data": knockoff_data,
        "knockoff_queries": args.knockoff_queries, "param_overrides": overrides, "students": students, "methods": methods,
        "machine": f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "teachers": {f"{k}{i if len(v) > 1 else ''}": {"path": p, "accuracy": evaluate(m, data.x_test, data.y_test, data.num_classes)["accuracy"]}
                     for k, v, paths in (("normal", teachers["normal"], args.normal), ("defended", teachers["defended"], args.defended))
                     for i, (m, p) in enumerate(zip(v, paths))},
    }
    atomic_write_json(out / "bench_attacks.json", {"meta": meta, "summary": summary, "runs": rows})
    (out / "bench_attacks.md").write_text(markdown(summary, meta))
    print(f"wrote {out / 'bench_attacks.json'} and {out / 'bench_attacks.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NastyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
