"""The leakage of a bench_served.py result under a second floor rule, as a check of the first. The probe's
rule takes the best floor of each seed (the max over labels alone and hard-label at three smoothings): it
picks each seed's luckiest floor, which favours the defense. Here the floor is the one variant with the best
mean over the seeds, paired by seed; the best thief is the one with the highest mean, as in the probe.

    python benchmarks/floor_rule.py docs/bench/served-digits-floors.json
"""

from __future__ import annotations

import json
import statistics
import sys

from nasty.pipelines.leakage import FLOORS, interval


def main(path: str) -> None:
    d = json.loads(open(path).read())
    acc, seeds = d["accuracy"], d["seeds"]
    for target, per_student in d["leakage"].items():
        for student, per in per_student.items():
            def floor(f: str, seed: int) -> float:
                if f in ("scratch", "label-smoothing"):
                    return acc[f"{student}/{seed}/-/{f}"]
                # a locked teacher's hard-label floors are its normal model's (trained once, under the first target)
                return acc.get(f"{student}/{seed}/{target}/{f}", acc.get(f"{student}/{seed}/normal/{f}"))
            means = {f: statistics.fmean(floor(f, s) for s in seeds) for f in FLOORS}
            best_floor = max(means, key=means.get)
            rows = []
            for attack in per:
                v = [acc[f"{student}/{s}/{target}/{attack}"] - floor(best_floor, s) for s in seeds
                     if acc.get(f"{student}/{s}/{target}/{attack}") is not None]
                r = interval(v)
                rows.append((r["mean"], attack, r["ci_high"]))
            mean, attack, high = max(rows)
            print(f"{target} / {student}: floor {best_floor} ({means[best_floor]:.2f}); best thief {attack} {mean:+.2f} (95% upper bound {high:+.2f})")


if __name__ == "__main__":
    main(sys.argv[1])
