"""Decision-locked defense benchmark (issue 10): the default `nasty train-defended` (two-head lock, omega
chosen on validation) against plain KD and the adaptive attacks, beside the paper's single nasty
network, the normal teacher and a class template, over teacher seeds.

Every number comes from a real `nasty` CLI call (printed, with its log). Runs that already have a
result.json are reused, so the script can be stopped and restarted.

    OMP_NUM_THREADS=1 python benchmarks/bench_locked.py --config configs/digits.toml --seeds 0 1 2 3 4 \
        --single-omega 0.1 --out bench_runs/locked-digits
    OMP_NUM_THREADS=2 python benchmarks/bench_locked.py --defaults-only --seeds 0 1 2 3 4 --out bench_runs/defaults-2t

Writes OUT/locked.json and prints Markdown tables (mean ± sd over seeds) for docs/results.md.
Student seed = teacher seed; gains are student accuracy minus its label-only twin (same seed,
data and schedule), in points on the test split.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ATTACKS = [  # (name, method, --param list, teacher: locked|normal, extra flags)
    ("label-smoothing", "label-smoothing", [], "normal", []),  # the second label-only baseline (CMIM's bar); uses no teacher
    ("kd", "kd", [], "locked", []),
    ("rehead-affine", "rehead", [], "locked", []),
    ("rehead-mlp", "rehead", ["corrector=mlp"], "locked", []),
    ("top1-confidence", "top1-confidence", [], "locked", []),
    ("augment-average", "augment-average", [], "locked", []),
    ("averager", "averager", [], "locked", []),
    ("skeptical", "skeptical", [], "locked", []),
    ("tllm-drop", "tllm", ["discard=drop"], "locked", []),
    ("kd-probs", "kd", [], "locked", ["--query", "probs"]),
    ("normal-kd", "kd", [], "normal", []),
    ("normal-rehead-affine", "rehead", [], "normal", []),
    ("template-kd", "kd", [], "normal", ["--output-defense", "template"]),
    ("template-rehead-affine", "rehead", [], "normal", ["--output-defense", "template"]),
]


def sh(cmd: list[str], log: Path) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"command failed ({rc}); see {log}")


def result(run: Path, cmd: list[str]) -> dict:
    if not (run / "result.json").is_file():
        sh(cmd + ["--out", str(run), "--force"], run.with_suffix(".log"))
    return json.loads((run / "result.json").read_text())


def nasty(*args: str) -> list[str]:
    return [sys.executable, "-m", "nasty", *args]


def student_flags(cfg: dict) -> list[str]:
    """`nasty attack` flags that reproduce the probe's students: data subset and [probe.train]."""
    t = {**cfg.get("train", {}), **cfg.get("probe", {}).get("train", {})}
    flags = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "schedule": "--schedule", "optimizer": "--optimizer"}
    out = [f for k, v in t.items() if k in flags for f in (flags[k], str(v))]
    sub = cfg.get("probe", {}).get("train_subset")
    return out + (["--train-subset", str(sub)] if sub else [])


def mean_sd(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{statistics.mean(xs):+.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:+.2f}"


def run_seed(args, cfg: dict, seed: int) -> dict:
    root = Path(args.out) / f"seed{seed}"
    t0 = time.time()
    source = ["--dataset", args.dataset] if args.dataset else ["--config", args.config]
    locked = result(root / "locked", nasty("train-defended", *source, "--seed", str(seed), *shlex.split(args.flags)))
    normal_ckpt = locked["normal_checkpoint"]
    row: dict = {"seed": seed, "normal_accuracy": locked["normal_accuracy"], "served_accuracy": locked["defended_accuracy"],
                 "omega": locked["omega"], "quality": {"normal": locked["normal_quality"], "locked": locked["defended_quality"],
                                                       **{k: locked[f"{r}_quality"] for k, r in REFERENCES.items() if f"{r}_quality" in locked}},
                 "probe": locked["probe"], "gains": {}}
    if args.defaults_only:
        row["seconds"] = time.time() - t0
        return row
    if args.skip_single:
        row["single_probe"] = None
    else:
        single = result(root / "single", nasty("train-defended", "--config", args.config, "--seed", str(seed), "--adversary", normal_ckpt,
                                               "--lock", "none", "--omega", str(args.single_omega)))
        row["single_accuracy"] = single["defended_accuracy"]
        row["quality"]["single"] = single["defended_quality"]
        row["single_probe"] = single["probe"]
    data = ["--config", args.config, "--seed", str(seed), *student_flags(cfg)]
    for st in cfg["probe"]["students"]:
        slug = st.replace(":", "-").replace("=", "")
        base = result(root / slug / "scratch", nasty("attack", "--method", "scratch", "--teacher", normal_ckpt, "--student", st, *data))
        gains = {"scratch_accuracy": base["accuracy"]}
        for name, method, params, teacher, extra in ATTACKS:
            if args.attacks and name not in args.attacks:
                continue
            t = locked["defended_checkpoint"] if teacher == "locked" else normal_ckpt
            cmd = nasty("attack", "--method", method, "--teacher", t, "--student", st, *data, *extra,
                        *[f for p in params for f in ("--param", p)])
            r = result(root / slug / name, cmd)
            gains[name] = r["accuracy"] - base["accuracy"]
        row["gains"][st] = gains
    row["seconds"] = time.time() - t0
    return row


REFERENCES = {"template": "template", "label": "labels_only"}  # row name here -> result.json's <name>_quality


def quality_of_references(args, seed: int) -> dict:
    """top-1/top-5/ECE/NLL of the class template and of labels only, served over the normal teacher (for a
    result.json written before train-defended reported them itself)."""
    import torch

    from nasty.checkpoint import load_checkpoint
    from nasty.defenses import DefendedModel
    from nasty.metrics import served_quality
    from nasty.runs import data_from_config
    from nasty.config import load_config

    cfg = load_config(args.config, {})
    res = json.loads((Path(args.out) / f"seed{seed}" / "locked" / "result.json").read_text())
    normal, side = load_checkpoint(res["normal_checkpoint"])
    data = data_from_config(cfg, normalization=(side["normalization"]["mean"], side["normalization"]["std"]))
    torch.set_num_threads(1)
    return {name: served_quality(DefendedModel(normal, spec), data.x_test, data.y_test) for name, spec in (("template", "template"), ("label", "label"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/digits.toml")
    ap.add_argument("--dataset", help="with --defaults-only: `train-defended --dataset D` with no other flags instead of --config")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--single-omega", type=float, default=0.1, help="omega of the paper's single network (--lock none)")
    ap.add_argument("--defaults-only", action="store_true", help="only the default train-defended per seed (thread-count check)")
    ap.add_argument("--flags", default="", help="extra train-defended flags of the locked teacher (a variant: --lock two-net ...)")
    ap.add_argument("--skip-single", action="store_true", help="do not train the paper's single network")
    ap.add_argument("--attacks", nargs="*", help="only these rows of the attack table (default: all)")
    ap.add_argument("--out", default="bench_runs/locked")
    args = ap.parse_args()
    if args.dataset and not args.defaults_only:
        sys.exit("--dataset is for --defaults-only")
    cfg = {"probe": {"students": ["mlp", "cnn:width=0.25"]}} if args.dataset else tomllib.loads(Path(args.config).read_text())
    rows = [run_seed(args, cfg, s) for s in args.seeds]
    if not args.defaults_only:
        for r in rows:
            if not all(k in r["quality"] for k in REFERENCES):
                r["quality"].update(quality_of_references(args, r["seed"]))
    info = {"command": " ".join(shlex.quote(a) for a in sys.argv), "config": args.dataset or args.config, "seeds": args.seeds,
            "threads": os.environ.get("OMP_NUM_THREADS", "default"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "python": platform.python_version()}
    out = Path(args.out) / "locked.json"
    out.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    print(f"\n{info}\n")
    print("| seed | normal | served | omega | " + " | ".join(f"{s}: KD defended − labels" for s in cfg["probe"]["students"]) + " |")
    print("|---|---|---|---|" + "---|" * len(cfg["probe"]["students"]))
    for r in rows:
        print(f"| {r['seed']} | {r['normal_accuracy']:.2f} | {r['served_accuracy']:.2f} | {r['omega']:g} | "
              + " | ".join(f"{s['kd_gain_defended']:+.2f}" for s in r["probe"]["students"]) + " |")
    if args.defaults_only:
        return
    students = cfg["probe"]["students"]
    print("\nGain over the better label-only baseline (max of scratch and label-smoothing, per seed):")
    print("\n| attack (teacher) | " + " | ".join(students) + " |")
    print("|---|" + "---|" * len(students))
    for name, *_ in ATTACKS:
        if (args.attacks and name not in args.attacks) or name == "label-smoothing":
            continue
        print(f"| {name} | " + " | ".join(mean_sd([r["gains"][s][name] - max(0.0, r["gains"][s].get("label-smoothing", 0.0))
                                                  for r in rows]) for s in students) + " |")
    print("\nGain over scratch (labels only, plain CE):")
    print("\n| attack (teacher) | " + " | ".join(students) + " |")
    print("|---|" + "---|" * len(students))
    for name, *_ in ATTACKS:
        if args.attacks and name not in args.attacks:
            continue
        print(f"| {name} | " + " | ".join(mean_sd([r["gains"][s][name] for r in rows]) for s in students) + " |")
    if args.skip_single:
        return
    print("| single network (paper), KD | " + " | ".join(
        mean_sd([next(x["kd_gain_defended"] for x in r["single_probe"]["students"] if x["student"] == s) for r in rows]) for s in students) + " |")
    print("\n| served | top-1 | top-5 | ECE | NLL |\n|---|---|---|---|---|")
    for k in ("normal", "locked", "single", "template", "label"):
        q = [r["quality"][k] for r in rows]
        print(f"| {k} | " + " | ".join(f"{statistics.mean(x[m] for x in q):.2f} ± {statistics.stdev(x[m] for x in q) if len(q) > 1 else 0:.2f}"
                                       if all(m in x for x in q) else "–" for m in ("top1", "top5", "ece", "nll")) + " |")


if __name__ == "__main__":
    main()
