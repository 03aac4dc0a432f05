"""Positive control (issue 19): a thief's regime in which KD from the *normal* teacher visibly beats both
floors a decision-keeping defense leaves (labels only, and hard-label extraction), so that a defense
has something to take away and an audit something to find.

One normal teacher per config (the config's model and [train] recipe, seed 0), trained on a stratified
``--teacher-subset`` of the training split; the thief draws its images from the training images the
teacher never saw (``nasty.pipelines.common.thief_data``). For each regime ``N:M`` (N labelled images of
M), each probe student and each seed: scratch and label-smoothing (the N labelled images), hard-label
(the labels plus the teacher's top-1 on the M - N queries), and KD (soft outputs on all M, labels on
N; tuned on the thief's validation split with ``--tune``, otherwise alpha 0.9, T 4). Leakage = KD
minus the better floor of the same seed. Student seeds = SEEDS; every run uses the config's [probe.train].
These are section 12's floors (hard-label with its smoothing tuned from 0.3), kept so that its numbers
reproduce; the probe and bench_served.py measure over the floor family of ``nasty.pipelines.leakage.FLOORS``
(hard-label at each smoothing, every one trained), which is higher by about 0.3-0.4 points on digits.

    OMP_NUM_THREADS=1 python benchmarks/bench_positive_control.py --config configs/fashion-mnist.toml \
        --teacher-subset 50000 --regimes 100:300,100:1000 --seeds 0 1 2 3 4 --tune

Writes OUT/positive-control.json (every run's accuracy, the means, sds and 95% t-intervals) and prints a
Markdown table. Runs already in the JSON are reused (the script can be stopped and restarted).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from nasty.attacks import get_attack, run_attack
from nasty.errors import TrainingDiverged
from nasty.config import load_config, train_config
from nasty.frozen import TeacherOutputCache
from nasty.pipelines.common import open_teacher, teacher_normalization, thief_data
from nasty.pipelines.leakage import interval
from nasty.runs import data_from_config, train_normal

FLOORS = ("scratch", "label-smoothing", "hard-label")


def ci(values: list[float]) -> tuple[float, float, float, float]:
    """Mean, sd and the 95% t-interval over seeds: the probe's own (nasty.pipelines.leakage.interval)."""
    r = interval(values)
    return r["mean"], r["sd"], r["ci_low"], r["ci_high"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--data-root", default=os.environ.get("NASTY_DATA_ROOT"))
    ap.add_argument("--teacher-subset", type=int, required=True, help="training images of the teacher (the rest are the thief's pool)")
    ap.add_argument("--regimes", required=True, help="N:M,N:M (labelled:queries)")
    ap.add_argument("--students", default=None, help="comma-separated (default: the config's probe students)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--tune", action="store_true", help="KD tunes alpha, T and its epoch on the thief's validation split")
    ap.add_argument("--epochs", type=int, default=None, help="student epochs (default: the config's [probe.train])")
    ap.add_argument("--out", default=None)
    ap.add_argument("--defended", default=None, help="a defended checkpoint (e.g. train-defended --adversary TEACHER_DIR): "
                    "--attacks run against it too, each minus the same floors")
    ap.add_argument("--attacks", default="kd,rehead,top1-confidence,skeptical,averager,tllm",
                    help="attacks against --defended (tunable ones tune themselves with --tune)")
    args = ap.parse_args()

    over = {"data": {"data_root": args.data_root}} if args.data_root else {}
    cfg = load_config(args.config, over)
    cfg = {**cfg, "data": {**cfg["data"], "train_subset": None}}  # the thief's side: the teacher's subset is --teacher-subset
    name = cfg["data"]["dataset"]
    out = Path(args.out or f"bench_runs/positive-control/{name}")
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = out / f"teacher-subset{args.teacher_subset}"
    tcfg_all = {**cfg, "data": {**cfg["data"], "train_subset": args.teacher_subset}}
    if not (teacher_dir / "model.json").is_file():
        tdata = data_from_config(tcfg_all)
        t0 = time.perf_counter()
        train_normal(tcfg_all, tdata, teacher_dir, log=lambda m: None)
        print(f"teacher trained in {time.perf_counter() - t0:.0f} s", flush=True)
    norm = teacher_normalization(teacher_dir)
    data, note = thief_data(cfg, [teacher_dir], norm)
    teacher, _ = open_teacher(teacher_dir, data)
    teacher_acc = json.loads((teacher_dir / "model.json").read_text())["metrics"]["test"]["accuracy"]
    print(f"teacher {cfg['model']['name']} on {args.teacher_subset} images: test accuracy {teacher_acc:.2f}%; {note}", flush=True)
    students = args.students.split(",") if args.students else cfg["probe"]["students"]
    ptrain = dict(cfg["probe"]["train"])
    if args.epochs:
        ptrain["epochs"] = args.epochs
    res_file = out / "positive-control.json"
    store = json.loads(res_file.read_text()) if res_file.is_file() else {}
    store.update({"config": args.config, "dataset": name, "teacher_subset": args.teacher_subset, "teacher_accuracy": teacher_acc,
                  "thief_pool": int(len(data.y_train)), "students_train": ptrain, "tune": args.tune,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
                  "torch": torch.__version__})
    runs = store.setdefault("runs", {})
    cache = TeacherOutputCache()
    defended = open_teacher(args.defended, data)[0] if args.defended else None
    def_attacks = args.attacks.split(",") if defended is not None else []
    if defended is not None:
        store["defended"] = args.defended
    for regime in args.regimes.split(","):
        n, m = (int(v) for v in regime.split(":"))
        for student in students:
            for seed in args.seeds:
                tc = train_config(cfg, ptrain, seed=seed)
                for method, target in [*((f, teacher) for f in (*FLOORS, "kd")), *((a, defended) for a in def_attacks)]:
                    tuned = args.tune and "tune" in get_attack(method).params
                    key = f"{n}:{m}/{student}/{seed}/" + ("defended:" if target is defended else "") + method + ("/tuned" if tuned else "")
                    if key in runs:
                        continue
                    params = {"tune": True} if tuned else {}
                    t0 = time.perf_counter()
                    try:
                        _, r = run_attack(method, data=data, teachers=[] if method in FLOORS[:2] else [target], student=student, train=tc,
                                          params=params, labelled=n, query_budget=m, teacher_cache=cache, log=lambda msg: None)
                    except TrainingDiverged as e:
                        runs[key] = {"failed": str(e).splitlines()[0]}
                        print(f"{key}: FAILED {runs[key]['failed']}", flush=True)
                        continue
                    runs[key] = {"accuracy": r["accuracy"], "seconds": time.perf_counter() - t0, "best_epoch": r.get("best_epoch"),
                                 **({"tuned": r["tuned"]} if "tuned" in r else {})}
                    print(f"{key}: {r['accuracy']:.2f} ({runs[key]['seconds']:.0f} s)" + (f" tuned {r['tuned']}" if "tuned" in r else ""),
                          flush=True)
                    res_file.write_text(json.dumps(store, indent=1))
    summary = {}
    print(f"\n| regime N:M | student | scratch | label smoothing | hard-label | KD{' (tuned)' if args.tune else ''} | KD - better floor, mean ± sd [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for regime in args.regimes.split(","):
        for student in students:
            acc = {meth: [runs[f"{regime}/{student}/{s}/{meth}" + ("/tuned" if meth == "kd" and args.tune else "")]["accuracy"]
                          for s in args.seeds] for meth in (*FLOORS, "kd")}
            leak = [acc["kd"][i] - max(acc[f][i] for f in FLOORS) for i in range(len(args.seeds))]
            mean, sd, lo, hi = ci(leak)
            summary[f"{regime}/{student}"] = {"mean": {k: statistics.fmean(v) for k, v in acc.items()}, "leakage": leak,
                                              "leakage_mean": mean, "leakage_sd": sd, "ci95": [lo, hi]}
            print(f"| {regime} | {student} | " + " | ".join(f"{statistics.fmean(acc[k]):.2f}" for k in (*FLOORS, "kd"))
                  + f" | **{mean:+.2f} ± {sd:.2f}** [{lo:+.2f}, {hi:+.2f}] |")
            for a in def_attacks:
                tuned = args.tune and "tune" in get_attack(a).params
                vals = [runs.get(f"{regime}/{student}/{s}/defended:{a}" + ("/tuned" if tuned else ""), {}) for s in args.seeds]
                ok = [(i, v["accuracy"]) for i, v in enumerate(vals) if "accuracy" in v]
                dl = [acc_v - max(acc[f][i] for f in FLOORS) for i, acc_v in ok]
                dm, dsd, dlo, dhi = ci(dl) if dl else (math.nan,) * 4
                summary[f"{regime}/{student}/defended:{a}"] = {"leakage": dl, "leakage_mean": dm, "leakage_sd": dsd, "ci95": [dlo, dhi],
                                                                 "failed": len(vals) - len(ok)}
                print(f"|  | defended: {a} | | | | {statistics.fmean(v for _, v in ok) if ok else math.nan:.2f} | "
                      f"{dm:+.2f} ± {dsd:.2f} [{dlo:+.2f}, {dhi:+.2f}]" + (f" ({len(vals) - len(ok)} failed)" if len(ok) < len(vals) else "") + " |")
    store["summary"] = summary
    store["seeds"] = args.seeds
    res_file.write_text(json.dumps(store, indent=1))


if __name__ == "__main__":
    main()
