"""Calibration table of the audit's statistics on synthetic audits (no training).

Each cell runs REPS synthetic audits of one attack (10 classes x 2 students, N test images per class, S seeds)
through the audit's own decision code (nasty.audit.stats via nasty.audit.simulate) and reports:

- null: the per-attack rate of any false "transferred" class (nominal 0.025) under each correction, and the
  coverage of the 95% intervals (lower end: one-sided 97.5%; both ends: 95%);
- planted: a gain of G points on class 0 (accuracy 80%): the rate at which it is found, and the power the report
  claims for it (from each audit's own standard errors), under each correction;
- the median detectable gain (80% power, Holm) of the null classes.

Two baseline settings: "tied" (label-only and label-smoothing students equally good: the usual case, where the
two-baseline test is conservative) and "one better" (label smoothing 5 points worse: each test is exact).

    OMP_NUM_THREADS=1 python benchmarks/bench_audit_calibration.py --reps 400 --out docs/bench/audit-calibration.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np

from nasty.audit import simulate as sim
from nasty.audit import stats


def cell(model: sim.Model, reps: int, seed: int, planted: float | None, det_reps: int) -> dict:
    rng = np.random.default_rng(seed)
    audits = [sim.audit_once(model, rng, correction="none", detectable=False) for _ in range(reps)]
    out: dict = {}
    rows = [r for fams in audits for f in fams for r in f]
    null_rows = [r for r in rows if sim.true_gain(model, r["class"]) <= 0]
    out["coverage_lower"] = float(np.mean([r["gain_ci"][0] <= sim.true_gain(model, r["class"]) for r in rows]))
    out["coverage"] = float(np.mean([r["gain_ci"][0] <= sim.true_gain(model, r["class"]) <= r["gain_ci"][1] for r in rows]))
    for corr in stats.CORRECTIONS:
        false, found, claimed = [], [], []
        for fams in audits:
            fams = copy.deepcopy(fams)
            m = stats.decide_family(fams, rule="gain", correction=corr, detectable=False)
            a_star = stats.per_test_alpha(corr, m)
            false.append(any(r["transferred"] for f in fams for r in f if sim.true_gain(model, r["class"]) <= 0))
            for f in fams:
                r = f[0]
                if planted:
                    found.append(r["transferred"])
                    claimed.append(float(stats.iut_power(planted, stats.power_parts(r), a_star)))
        out[corr] = {"false_rate": float(np.mean(false))}
        if planted:
            out[corr].update(found=float(np.mean(found)), claimed_power=float(np.mean(claimed)))
    det = []
    for fams in audits[:det_reps]:
        fams = copy.deepcopy(fams)
        stats.decide_family(fams, rule="gain", correction="holm")
        det += [r["detectable"] for f in fams for r in f if r["detectable"] is not None and sim.true_gain(model, r["class"]) <= 0
                and r["class"] == 0]
    out["detectable_class0_median"] = float(np.median(det)) if det else None
    out["null_rows"] = len(null_rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--seeds", default="1,2,3,5,10")
    ap.add_argument("--n", type=int, default=1000, help="test images per class")
    ap.add_argument("--gain", type=float, default=2.0, help="planted gain, points")
    ap.add_argument("--sd-seed", type=float, default=0.2, help="seed-to-seed logit sd of a class (0.2: about 2 points)")
    ap.add_argument("--det-reps", type=int, default=40)
    ap.add_argument("--out", default="docs/bench/audit-calibration.json")
    a = ap.parse_args()
    t0 = time.perf_counter()
    res = {"command": "python benchmarks/bench_audit_calibration.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()), "machine": platform.processor() or platform.machine(),
        "model": {k: v for k, v in sim.Model().__dict__.items() if k != "shift"}, "cells": []}
    res["model"].update(n_per_class=a.n, sd_seed=a.sd_seed)
    print(f"| seeds | baselines | coverage lower / both | false rate holm / bh / none | +{a.gain:g} found (claimed) holm | bh | none | detectable, class 0, holm |")
    print("|---|---|---|---|---|---|---|---|")
    for S in [int(x) for x in a.seeds.split(",")]:
        for name, shift in (("tied", {}), ("one better", {("label-smoothing", c): -5.0 for c in range(10)})):
            base = dict(seeds=S, n_per_class=a.n, sd_seed=a.sd_seed)
            null = cell(sim.Model(shift=dict(shift), **base), a.reps, 100 + S, None, a.det_reps)
            plant = cell(sim.Model(shift={**shift, ("attack", 0): a.gain}, **base), a.reps, 200 + S, a.gain, 0)
            res["cells"].append({"seeds": S, "baselines": name, "null": null, "planted": plant})
            f = lambda c: f"{plant[c]['found']:.3f} ({plant[c]['claimed_power']:.3f})"  # noqa: E731
            det = null["detectable_class0_median"]
            print(f"| {S} | {name} | {null['coverage_lower']:.3f} / {null['coverage']:.3f} | "
                  f"{null['holm']['false_rate']:.3f} / {null['bh']['false_rate']:.3f} / {null['none']['false_rate']:.3f} | "
                  f"{f('holm')} | {f('bh')} | {f('none')} | {'n/a' if det is None else f'{det:.1f}'} |", flush=True)
    res["seconds"] = time.perf_counter() - t0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out} ({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
