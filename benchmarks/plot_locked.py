"""Leakage vs what the served probabilities still give a legitimate user, from bench_locked.py results.

    python benchmarks/plot_locked.py docs/bench/locked-digits.json docs/bench/locked-fashion.json --out docs/pareto-locked.png

x: top-5 accuracy (ties broken at random) and calibration error (ECE) of the served probabilities (test
split; train-defended's result.json gives them: ``normal_quality``, ``defended_quality``,
``template_quality``, ``labels_only_quality``); y: the best attack's gain over the label-only twin
(points; mean over seeds of the worst student), i.e. leakage. Served defenses: the normal teacher, the
paper's single nasty network (KD only was measured), the decision-locked teacher (every attack of the
benchmark), the class template and labels only (0 by definition: it is the label-only baseline).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

LOCKED = ["kd", "kd-probs", "rehead-affine", "rehead-mlp", "top1-confidence", "augment-average", "averager", "skeptical", "tllm-drop"]


def leakage(rows: list[dict]) -> dict[str, float]:
    """Per served defense: mean over seeds of max over students and attacks of the gain over labels."""
    def floor(r: dict, student: str) -> float:  # the better label-only baseline, relative to scratch
        return max(0.0, r["gains"][student].get("label-smoothing", 0.0))

    def best(r: dict, names: list[str]) -> float | None:  # None: none of these attacks was run
        got = [r["gains"][s][n] - floor(r, s) for s in r["gains"] for n in names if n in r["gains"][s]]
        return max(got) if got else None

    out = {"label": 0.0}
    for k, names in (("normal", ["normal-kd", "normal-rehead-affine"]), ("locked", LOCKED),
                     ("template", ["template-kd", "template-rehead-affine"])):
        vals = [best(r, names) for r in rows]
        if None not in vals:
            out[k] = statistics.mean(vals)
    if all(r.get("single_probe") for r in rows):
        out["single"] = statistics.mean(max(s["kd_gain_defended"] - floor(r, s["student"]) for s in r["single_probe"]["students"]) for r in rows)
    return out


def points(rows: list[dict], metric: str) -> dict[str, tuple[float, float]]:
    """Per served defense with both numbers: (mean over seeds of the served quality ``metric`` from the rows'
    ``quality``, which bench_locked.py takes from train-defended's result.json, leakage). Labels only is the
    point at leakage 0."""
    return {k: (statistics.mean(r["quality"][k][metric] for r in rows), y) for k, y in leakage(rows).items()
            if all(k in r["quality"] and metric in r["quality"][k] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", default="docs/pareto-locked.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(args.results), 2, figsize=(10, 4 * len(args.results)), squeeze=False)
    for row, path in zip(axes, args.results):
        doc = json.loads(Path(path).read_text())
        rows = doc["rows"]
        name = Path(doc["info"]["config"]).stem
        for ax, metric, label in ((row[0], "top5", "top-5 accuracy of the served probabilities (%)"),
                                  (row[1], "ece", "calibration error of the served probabilities (ECE, %)")):
            for k, (x, y) in points(rows, metric).items():
                ax.scatter(x, y, s=60)
                ax.annotate(k, (x, y), textcoords="offset points", xytext=(5, 5))
            ax.axhline(0, color="grey", lw=0.8, ls="--")
            ax.set_xlabel(label)
            ax.set_ylabel("best attack's gain over labels (points)")
            ax.set_title(f"{name}, {len(rows)} seeds")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
