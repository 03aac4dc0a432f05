"""The positive control through the probe's own measurement: KD from a *normal* teacher minus the best floor
(labels alone, hard-label at label smoothing 0, 0.1 and 0.3: :data:`nasty.pipelines.leakage.FLOORS`), per
probe student, for one or more thief regimes ``N:M`` (N labelled of M images), over several seeds. A regime
is a benchmark for defenses only where this is at least +3 points: there the soft outputs are worth
something a defense can take away.

    nasty train-teacher --config configs/mnist-thief.toml --data-root DATA_ROOT --out TEACHER
    OMP_NUM_THREADS=1 NASTY_DATA_ROOT=DATA_ROOT python benchmarks/bench_control.py --config configs/mnist-thief.toml \
        --teacher TEACHER --regimes 20:200 50:300 --json docs/bench/control-mnist.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from nasty.attacks.run import thief_view
from nasty.checkpoint import load_checkpoint
from nasty.config import load_config
from nasty.errors import NastyError
from nasty.pipelines.leakage import measure, thief_pool
from nasty.runs import data_from_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--teacher", type=Path, required=True, help="the normal teacher's checkpoint (trained on the config's train_subset)")
    ap.add_argument("--regimes", nargs="+", default=None, help="N:M thief regimes (default: the config's probe.labelled:probe.queries)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = load_config(args.config)
    teacher = load_checkpoint(args.teacher)[0].eval()
    data = data_from_config(cfg)
    pool, note = thief_pool(cfg, data)
    regimes = args.regimes or [f"{cfg['probe']['labelled']}:{cfg['probe']['queries']}"]
    for regime in regimes:  # every regime's bounds before anything trains (a run used to stop at the third)
        try:
            n, m = (int(v) for v in regime.split(":"))
            thief_view(pool, n, m, "labels")
        except (ValueError, NastyError) as e:
            print(f"error: regime {regime!r}: {e if isinstance(e, NastyError) else 'expected N:M, two integers'}", file=sys.stderr)
            sys.exit(2)
    out = {"meta": {"command": " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M"), "pool": note}, "regimes": {}}
    print(f"{note}; seeds {args.seeds}")
    print("| regime N:M | student | KD − best floor: mean ± sd [95% CI] | floors (mean accuracy) | minutes |")
    print("|---|---|---|---|---|")
    for regime in regimes:
        n, m = (int(v) for v in regime.split(":"))
        cfg["probe"].update(labelled=n, queries=m, jobs=args.jobs)
        t0 = time.time()
        res = measure(cfg, pool, {"normal": teacher}, {"normal": ["kd"]}, seeds=args.seeds, out=None, log=lambda s: None)
        out["regimes"][regime] = {**res, "minutes": (time.time() - t0) / 60}
        for s, per in res["leakage"]["normal"].items():
            k = per["kd"]
            floors = ", ".join(f"{f} {v['mean']:.2f}" for f, v in res["floors"]["normal"][s].items())
            print(f"| {regime} | {s} | {k['mean']:+.2f} ± {k['sd']:.2f} [{k['ci_low']:+.2f}, {k['ci_high']:+.2f}] | {floors} | "
                  f"{(time.time() - t0) / 60:.1f} |", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
