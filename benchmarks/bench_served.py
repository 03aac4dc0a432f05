"""What the served outputs keep, what they are worth and what they leak (issue "Served outputs worth
serving"): one normal teacher, decision-locked teachers that keep the decision only, the normal model's
confidence, or that confidence in B calibrated bins (``--keep``), each attacked by every thief that reads
what is served, in the thief's regime of the config, over several student seeds; beside each, the
served utility (top-1, top-5, ECE, NLL on the test split) and the labels-only reference.

    OMP_NUM_THREADS=1 python benchmarks/bench_served.py --config configs/digits.toml --seeds 0 1 2 3 4 \
        --keeps decision confidence confidence:bins=10 --out bench-served --json docs/bench/served-digits.json

The teachers are trained with ``nasty train-defended`` (``--omega`` fixed, no probe; the first run trains
the normal teacher, the others reuse it as ``--adversary``); the attacks run through the probe's own
measurement (:func:`nasty.pipelines.leakage.measure`: floors, self-tuning thieves, leakage = accuracy minus
the best floor of the same seed and student, 95% t-intervals over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from nasty.checkpoint import load_checkpoint
from nasty.config import load_config
from nasty.metrics import served_quality
from nasty.pipelines.defended import served_utility
from nasty.pipelines.leakage import best_attack, measure, thief_pool
from nasty.runs import data_from_config

ATTACKS = ["kd", "rehead", "top1-confidence", "set-uniform", "confidence-label", "confidence-curriculum"]


def train(config: str, out: Path, keep: str, omega: float, adversary: Path | None) -> Path:
    if (out / "defended" / "model.json").is_file():
        return out
    cmd = [sys.executable, "-m", "nasty", "train-defended", "--config", config, "--out", str(out), "--force", "--no-probe",
           "--omega", str(omega), "--keep", keep] + (["--adversary", str(adversary)] if adversary else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/digits.toml")
    ap.add_argument("--keeps", nargs="+", default=["decision", "confidence", "confidence:bins=10"])
    ap.add_argument("--omega", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--teacher", type=Path, default=None, help="an existing normal teacher's checkpoint (default: train one)")
    ap.add_argument("--out", type=Path, default=Path("bench-served"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quality-only", action="store_true", help="recompute the served utility of the teachers in --out and "
                    "update --json (the leakage runs are kept)")
    args = ap.parse_args()
    t0 = time.time()
    first = train(args.config, args.out / args.keeps[0].replace(":", "-"), args.keeps[0], args.omega, args.teacher)
    normal_dir = args.teacher or first / "normal"
    runs = {args.keeps[0]: first}
    for keep in args.keeps[1:]:
        runs[keep] = train(args.config, args.out / keep.replace(":", "-"), keep, args.omega, normal_dir)
    cfg = load_config(args.config)
    if args.jobs:
        cfg["probe"]["jobs"] = args.jobs
    data = data_from_config(cfg)
    normal, _ = load_checkpoint(normal_dir)
    targets = {"normal": normal.eval()}
    for keep, d in runs.items():
        targets[keep] = load_checkpoint(d / "defended")[0].eval()
    attacks = {"normal": ["kd"], **{k: args.attacks.split(",") for k in runs}}
    pool, note = thief_pool(cfg, data)
    if args.quality_only:
        old = json.loads(args.json.read_text())
        res = {k: old.get(k, {}) for k in ("labelled", "queries", "seeds", "accuracy", "failed", "leakage", "floors")}
    else:
        res = measure(cfg, pool, targets, attacks, seeds=args.seeds, out=None, log=lambda m: print(m, file=sys.stderr, flush=True))
    quality = {name: served_quality(m, data.x_test, data.y_test) for name, m in targets.items()}
    quality["labels-only"] = served_utility(normal, normal, data)["labels_only_quality"]  # the reference train-defended reports
    meta = {"command": " ".join(sys.argv), "leakage_command": old["meta"]["command"] if args.quality_only else None, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "minutes": (time.time() - t0) / 60, "pool": note, "omega": args.omega}
    print(f"\nthief: {res['labelled']} labelled of {res['queries']} images; {note}; seeds {args.seeds}")
    print("| served | student | best attack: mean ± sd [95% CI] | every attack's mean | top-1 | top-5 | ECE | NLL |")
    print("|---|---|---|---|---|---|---|---|")
    for name in targets:
        q = quality[name]
        for s, per in res["leakage"][name].items():
            a, b = best_attack(per)
            best = "-" if b is None else f"{a} {b['mean']:+.2f} ± {b['sd']:.2f} [{b['ci_low']:+.2f}, {b['ci_high']:+.2f}]"
            every = ", ".join(f"{k} {v['mean']:+.2f}" for k, v in per.items() if v["n"])
            print(f"| {name} | {s} | {best} | {every} | {q['top1']:.2f} | {q['top5']:.2f} | {q['ece']:.2f} | {q.get('nll', float('nan')):.3f} |")
    for name, st in res["floors"].items():
        for s, per in st.items():
            print(f"floors of {name} / {s}: " + ", ".join(f"{f} {v['mean']:.2f}" for f, v in per.items()))
    q = quality["labels-only"]
    print(f"| labels-only | - | (the floor) | - | {q['top1']:.2f} | {q['top5']:.2f} | {q['ece']:.2f} | {q.get('nll', float('nan')):.3f} |")
    if res["failed"]:
        print(f"failed runs (not scored): {res['failed']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "quality": quality, **res}, indent=1, default=str))


if __name__ == "__main__":
    main()
