"""Leakage against what the served probabilities are worth, from bench_served.py results (one row of
two panels per results file: a dataset or a teacher).

    python benchmarks/plot_served.py docs/bench/served-digits-floors.json docs/bench/served-digits-teacher2-floors.json \
        docs/bench/served-fashion-mnist-floors.json --out docs/pareto.png

x: ECE (left) and top-5 accuracy (right) of the served probabilities on the test split; y: the best
self-tuning thief's gain over the best floor of the seed (points): the largest mean over seeds of the probe
students, with a bar up to the largest 95% upper bound (the number the target bounds: +1, the dotted
line). Labels only is the floor itself (leakage 0 by definition); the normal teacher's point is the
positive control (KD); the default ``--keep`` is drawn in green.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nasty.defenses.lock import LOCK_PARAMS
from nasty.pipelines.leakage import best_attack

DEFAULT = LOCK_PARAMS["keep"].default  # the served variant train-defended serves unless told otherwise: drawn in green


def points(doc: dict) -> dict[str, dict]:
    """Per served variant of a bench_served.py result: its quality (top1, top5, ece, nll) and, over the probe
    students, the largest mean of the best thief (``mean``, with its ``attack`` and ``student``) and the
    largest 95% upper bound (``ci_high``: the target's number, possibly another student's); labels only at 0."""
    out = {}
    for name, per_student in doc["leakage"].items():
        best = None
        for student, per in per_student.items():
            attack, stats = best_attack(per)
            if stats is None:
                continue
            if best is None or stats["mean"] > best["mean"]:
                best = {**(best or {}), "mean": stats["mean"], "attack": attack, "student": student}
            best["ci_high"] = max(best.get("ci_high", float("-inf")), stats["ci_high"])
        if best is not None and name in doc["quality"]:
            out[name] = {**doc["quality"][name], **best}
    if "labels-only" in doc["quality"]:
        out["labels-only"] = {**doc["quality"]["labels-only"], "mean": 0.0, "ci_high": 0.0, "attack": None, "student": None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/pareto.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(args.results), 2, figsize=(11, 4.2 * len(args.results)), squeeze=False)
    for row, path in zip(axes, args.results):
        doc = json.loads(path.read_text())
        pts = points(doc)
        title = f"{path.stem}: {doc['labelled']} labelled of {doc['queries']} images, {len(doc['seeds'])} seeds"
        for ax, metric, label in ((row[0], "ece", "calibration error of the served probabilities (ECE, %)"),
                                  (row[1], "top5", "top-5 accuracy of the served probabilities (%)")):
            for name, p in pts.items():
                colour = {"normal": "tab:red", "labels-only": "tab:grey", DEFAULT: "tab:green"}.get(name, "tab:blue")
                ax.errorbar(p[metric], p["mean"], yerr=[[0.0], [p["ci_high"] - p["mean"]]], fmt="o", color=colour, capsize=3)
                ax.annotate(name + (" (default)" if name == DEFAULT else ""), (p[metric], p["mean"]), textcoords="offset points",
                            xytext=(5, 4), fontsize=8)
            ax.axhline(0, color="grey", lw=0.8, ls="--")
            ax.axhline(1, color="grey", lw=0.8, ls=":")
            ax.set_xlabel(label)
            ax.set_ylabel("best thief's gain over the floor (points)")
            ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    for path in args.results:
        for name, p in points(json.loads(path.read_text())).items():
            print(f"{path.stem}\t{name}\tECE {p['ece']:.2f}\ttop-5 {p['top5']:.2f}\tleakage {p['mean']:+.2f} (95% UB {p['ci_high']:+.2f}, "
                  f"{p['attack']} on {p['student']})")


if __name__ == "__main__":
    main()
