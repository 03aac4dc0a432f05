"""Core benchmark (issue 2): normal vs defended teacher on Fashion-MNIST and the KD probe, over seeds.

Every step is a real `nasty` CLI call (printed, so each number has its command). Runs that already
have a result.json are reused, so the script can be stopped and restarted.

    python benchmarks/bench_core.py --out bench_runs/fm --seeds 0 1 2 \
        --sweep "omega=0.1" "omega=0.2" --final "omega=0.2"

Writes bench_runs/fm/core.json and prints Markdown tables (mean ± std over seeds) for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "configs/fashion-mnist.toml"


def sh(cmd: list[str], log: Path) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"command failed ({rc}); see {log}")


def setting_args(setting: str) -> list[str]:
    """"omega=0.2,tau=4,epochs=4" -> train-defended flags."""
    flags = {"omega": "--omega", "tau": "--tau", "epochs": "--defense-epochs", "lr": "--defense-lr", "warmup": "--omega-warmup",
             "kl_cap": "--kl-cap", "init": "--init-from"}
    out = []
    for part in filter(None, setting.split(",")):
        k, _, v = part.partition("=")
        out += [flags[k], v]
    return out


def normal(out: Path, seed: int) -> Path:
    run = out / f"seed{seed}" / "normal"
    if not (run / "result.json").is_file():
        sh([sys.executable, "-m", "nasty", "train-teacher", "--config", CONFIG, "--seed", str(seed), "--out", str(run), "--force"],
           out / f"seed{seed}.normal.log")
    return run


def defended(out: Path, seed: int, setting: str) -> dict:
    name = setting.replace("=", "").replace(",", "_") or "default"
    run = out / f"seed{seed}" / name
    if not (run / "result.json").is_file():
        t0 = time.time()
        sh([sys.executable, "-m", "nasty", "train-defended", "--config", CONFIG, "--seed", str(seed), "--adversary",
            str(normal(out, seed)), *setting_args(setting), "--out", str(run), "--force"], out / f"seed{seed}.{name}.log")
        print(f"  ({time.time() - t0:.0f} s)", flush=True)
    res = json.loads((run / "result.json").read_text())
    res["setting"], res["seed"] = setting, seed
    return res


def ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(rows: list[dict]) -> str:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["setting"], []).append(r)
    students = [s["student"] for s in rows[0]["probe"]["students"]]
    head = "| setting | seeds | normal teacher | defended teacher | drop | " + " | ".join(
        f"{s}: scratch / KD normal / KD defended (KD defended − scratch)" for s in students) + " |"
    lines = [head, "|" + "---|" * (5 + len(students))]
    for setting, rs in by.items():
        cells = [setting or "config default", ",".join(str(r["seed"]) for r in rs), ms([r["normal_accuracy"] for r in rs]),
                 ms([r["defended_accuracy"] for r in rs]), ms([r["accuracy_drop"] for r in rs])]
        for i, _ in enumerate(students):
            p = [r["probe"]["students"][i] for r in rs]
            cells.append(f"{ms([x['scratch_accuracy'] for x in p])} / {ms([x['kd_normal_accuracy'] for x in p])} / "
                         f"{ms([x['kd_defended_accuracy'] for x in p])} ({ms([x['kd_gain_defended'] for x in p])})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench_runs/fm"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sweep", nargs="*", default=[], help="settings tried on the first seed only")
    ap.add_argument("--final", nargs="*", default=[""], help="settings run on every seed")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sweep = [defended(args.out, args.seeds[0], s) for s in args.sweep]
    final = [defended(args.out, seed, s) for s in args.final for seed in args.seeds]
    summary = {"machine": f"{platform.machine()} CPU, {platform.processor() or 'unknown'}", "config": CONFIG,
               "seeds": args.seeds, "sweep": sweep, "final": final}
    (args.out / "core.json").write_text(json.dumps(summary, indent=1))
    if sweep:
        print("\n## Sweep (seed %d)\n\n%s" % (args.seeds[0], table(sweep)))
    if final:
        print("\n## Final\n\n" + table(final))


if __name__ == "__main__":
    main()
