"""Defense benchmark (issue 5): defenses x attacks over seeds, measured with `nasty audit`, and the
Pareto plot of teacher accuracy drop vs the best attack's gain over the label-only student.

Every step is a real `nasty` CLI call (printed, so each number has its command); finished teachers
and audit runs are reused, so the script can be stopped and restarted.

As in docs/results.md (Fashion-MNIST, 3 seeds; about 2 hours on 2 CPU cores):

    OMP_NUM_THREADS=1 python benchmarks/bench_defenses.py --out bench_runs/fm --seeds 0 1 2 --plot docs/pareto-training-defenses.png

Quick check that everything runs (digits, one seed, tiny schedules, a few minutes):

    python benchmarks/bench_defenses.py --tiny --out /tmp/bench_defenses_tiny

Per seed s it trains (or reuses) the normal CNN teacher and a normal MLP (the second adversary), then
the ``--settings`` training-time defenses, each fine-tuned from the normal teacher
(configs/fashion-mnist.toml): ``nasty`` (one adversary), ``selective3`` (class-selective on Pullover,
Coat, Shirt), ``multi-mean`` (CNN + MLP adversaries), ``budget0.5`` (the accuracy budget), and
optionally ``selective3-anchor`` (with ``--anchor 1.0``), ``selective3-mass``, ``multi-min``, ``budget0.5-selective3-multi``. Every teacher (the
normal one, each defended one, and the normal one behind each ``--output-defenses`` spec) is audited
with ``nasty audit --seeds 1 --first-seed s``: the ``--attacks`` against every ``--students``
architecture, white-box (``--query weights``) for training-time defenses and through the defended
probabilities (``--query probs``) for output defenses. The baselines (labels only, label smoothing)
are trained by the seed's first audit and reused by the others (``--baselines-from``). Writes
``OUT/defenses.json``, ``OUT/defenses.md`` (tables for docs/results.md) and the Pareto plot.
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

OUTPUT_DEFENSES = ["topk:2", "reverse-sigmoid:beta=1.0:gamma=0.1", "noise:scale=0.05"]
DEFAULT_SETTINGS = ["nasty", "selective3", "multi-mean", "budget0.5"]
DEFAULT_ATTACKS = "kd,averager,tllm,skeptical,hint"  # hint is white-box: skipped behind output defenses


def slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def settings(protect: str) -> dict[str, tuple[list[str], bool]]:
    """name -> (train-defended flags, uses the MLP as second adversary)."""
    return {
        "nasty": (["--defense", "nasty"], False),
        "selective3": (["--defense", "class-selective", "--protect-classes", protect], False),
        "selective3-anchor": (["--defense", "class-selective", "--protect-classes", protect, "--anchor", "1.0"], False),
        "selective3-mass": (["--defense", "class-selective", "--protect-classes", protect, "--protect-by", "mass"], False),
        "multi-mean": (["--defense", "multi-adversary", "--combine", "mean"], True),
        "multi-min": (["--defense", "multi-adversary", "--combine", "min"], True),
        "budget0.5": (["--defense", "budget", "--max-accuracy-drop", "0.5"], False),
        "budget0.5-selective3-multi": (["--defense", "budget", "--max-accuracy-drop", "0.5", "--protect-classes", protect], True),
    }


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.out: Path = args.out
        self.commands: dict[str, str] = {}

    # -------------------------------------------------------------- running
    def sh(self, cmd: list[str], key: str, done: Path | None, ok: tuple[int, ...] = (0,)) -> None:
        """Run a nasty command (printed) unless ``done`` exists; stop the benchmark on failure."""
        line = " ".join(shlex.quote(c) for c in cmd)
        self.commands[key] = line
        if done is not None and done.is_file():
            return
        print("$ " + line, flush=True)
        log = self.out / "logs" / (slug(key) + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        log.write_text(p.stdout + p.stderr)
        if p.returncode not in ok:
            msg = (p.stderr.strip().splitlines() or ["?"])[-1]
            sys.exit(f"command failed ({p.returncode}): {msg}\n  see {log}")
        print(f"  ({time.time() - t0:.0f} s)", flush=True)

    def nasty(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "nasty", *args]

    def teacher_flags(self) -> list[str]:
        return ["--config", self.a.config, *shlex.split(self.a.teacher_args)]

    def normal(self, seed: int, model: str | None = None) -> Path:
        run = self.out / f"seed{seed}" / ("normal" if model is None else f"normal-{slug(model)}")
        self.sh(self.nasty("train-teacher", *self.teacher_flags(), "--seed", str(seed), *(["--model", model] if model else []),
                           "--out", str(run), "--force"), str(run), run / "result.json")
        return run

    def defended(self, seed: int, name: str, flags: list[str], multi: bool) -> dict:
        run = self.out / f"seed{seed}" / name
        advs = [self.normal(seed)] + ([self.normal(seed, self.a.second_adversary)] if multi else [])
        adv_flags = [x for p in advs for x in ("--adversary", str(p))]
        self.sh(self.nasty("train-defended", *self.teacher_flags(), *shlex.split(self.a.defense_args), "--seed", str(seed),
                           *adv_flags, *flags, "--no-probe", "--out", str(run), "--force"), str(run), run / "result.json")
        return json.loads((run / "result.json").read_text())

    def audit(self, seed: int, tag: str, ckpt: Path, output_defense: str | None) -> dict:
        """`nasty audit` of one teacher: every chosen attack x student, training seed = the teacher's seed;
        the baselines are trained by the first audit of the seed and reused by the others."""
        out = self.out / f"seed{seed}" / "audits" / slug(tag)
        first = self.out / f"seed{seed}" / "audits" / "normal"
        query = "probs" if output_defense else "weights"  # white-box where the weights are the defense
        cmd = self.nasty("audit", str(ckpt), "--config", self.a.config, "--attacks", self.a.attacks, "--students",
                         self.a.students.replace(";", ","), "--seeds", "1", "--first-seed", str(seed), "--query", query,
                         *shlex.split(self.a.attack_args), "--out", str(out), "--json")
        if output_defense:
            cmd += ["--output-defense", output_defense]
        if out != first and (first / "runs" / "baselines").is_dir():
            cmd += ["--baselines-from", str(first)]
        # re-running resumes (finished runs are reused); --summary-only reads the audit.json already there
        self.sh(cmd, str(out), out / "audit.json" if self.a.summary_only else None, ok=(0, 1, 3))
        return json.loads((out / "audit.json").read_text())

    def run_seed(self, seed: int) -> dict:
        row: dict = {"seed": seed, "teachers": {}}
        normal = self.normal(seed)
        normal_res = json.loads((normal / "result.json").read_text())
        row["normal_accuracy"] = normal_res["accuracy"]
        row["normal_per_class"] = normal_res["per_class_accuracy"]
        a = self.audit(seed, "normal", normal, None)
        row["baselines"] = a["baselines"]
        row["teachers"]["normal"] = {"kind": "none", "accuracy": normal_res["accuracy"], "per_class_accuracy": normal_res["per_class_accuracy"],
                                     "audit": audit_rows(a)}
        for name, (flags, multi) in settings(self.a.protect).items():
            if name not in self.a.settings:
                continue
            res = self.defended(seed, name, flags, multi)
            ckpt = Path(res["defended_checkpoint"])
            a = self.audit(seed, name, ckpt, None)
            row["teachers"][name] = {
                "kind": "training", "accuracy": res["defended_accuracy"], "per_class_accuracy": res["defended_per_class_accuracy"],
                "protected": res.get("protected_classes"), "defense_info": {k: v for k, v in (res.get("defense_info") or {}).items() if k != "history"},
                "audit": audit_rows(a)}
        for spec in self.a.output_defenses:
            a = self.audit(seed, "out-" + spec, normal, spec)
            t = a["targets"]["teacher"]
            row["teachers"][spec] = {"kind": "output", "accuracy": t["accuracy"], "per_class_accuracy": t["per_class_accuracy"],
                                     "audit": audit_rows(a)}
        return row


def audit_rows(a: dict) -> list[dict]:
    """Per attack and student: accuracy, per-class accuracy and transferred classes from audit.json."""
    rows = []
    for method, att in a["targets"]["teacher"]["attacks"].items():
        for st, r in att.get("students", {}).items():
            rows.append({"method": method, "student": st, "accuracy": r["accuracy"], "per_class_accuracy": r["per_class_accuracy"],
                         "transferred": r["transferred_classes"]})
    return rows


# ------------------------------------------------------------------ summary
def class_mean(per: list[float | None], idx: list[int]) -> float:
    vals = [per[i] for i in idx if per[i] is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def pooled_baselines(rows: list[dict]) -> dict:
    """The baselines averaged over the seeds (accuracy and per-class accuracy), per method and student.
    One student run is noisy (a seed can land two points away from the others), so every attack of
    every seed is compared with the mean label-only / label-smoothing student."""
    out: dict = {}
    for b in ("scratch", "label-smoothing"):
        out[b] = {}
        for st in rows[0]["baselines"][b]:
            runs = [r["baselines"][b][st] for r in rows]
            per = [[x for x in col] for col in zip(*[r["per_class_accuracy"] for r in runs])]
            out[b][st] = {"accuracy": statistics.mean(r["accuracy"] for r in runs),
                          "accuracy_per_seed": [r["accuracy"] for r in runs],
                          "per_class_accuracy": [statistics.mean(c) if None not in c else None for c in per]}
    return out


def point(row: dict, name: str, classes: list[str], protect_idx: list[int], base: dict) -> dict:
    """One teacher on one seed: accuracy drop and each attack's gain over its student's (pooled) baselines."""
    t = row["teachers"][name]
    other_idx = [i for i in range(len(classes)) if i not in protect_idx]
    out = {"accuracy": t["accuracy"], "drop": row["normal_accuracy"] - t["accuracy"],
           "drop_other": class_mean(row["normal_per_class"], other_idx) - class_mean(t["per_class_accuracy"], other_idx),
           "attacks": []}
    for a in t["audit"]:
        sc, ls = base["scratch"][a["student"]], base["label-smoothing"][a["student"]]
        out["attacks"].append({
            "method": a["method"], "student": a["student"], "accuracy": a["accuracy"],
            "gain": a["accuracy"] - sc["accuracy"],
            "gain_vs_label_smoothing": a["accuracy"] - ls["accuracy"],
            "gain_protected": class_mean(a["per_class_accuracy"], protect_idx) - class_mean(sc["per_class_accuracy"], protect_idx),
            "gain_protected_vs_label_smoothing": class_mean(a["per_class_accuracy"], protect_idx) - class_mean(ls["per_class_accuracy"], protect_idx),
            "gain_other": class_mean(a["per_class_accuracy"], other_idx) - class_mean(sc["per_class_accuracy"], other_idx),
            "transferred": a["transferred"],
            "transferred_protected": [c for c in a["transferred"] if c in protect_idx],
        })
    if out["attacks"]:
        best = max(out["attacks"], key=lambda r: r["gain"])
        out["best_gain"], out["best_attack"] = best["gain"], f"{best['method']}/{best['student']}"
        out["best_gain_protected"] = max(r["gain_protected"] for r in out["attacks"])
        out["best_gain_vs_label_smoothing"] = max(r["gain_vs_label_smoothing"] for r in out["attacks"])
        out["best_gain_protected_vs_label_smoothing"] = max(r["gain_protected_vs_label_smoothing"] for r in out["attacks"])
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(rows: list[dict], classes: list[str], protect_idx: list[int]) -> dict:
    names = list(rows[0]["teachers"])
    base = pooled_baselines(rows)
    summary = {}
    for name in names:
        pts = [point(r, name, classes, protect_idx, base) for r in rows if name in r["teachers"]]
        entry = {"kind": rows[0]["teachers"][name]["kind"], "protected": bool(rows[0]["teachers"][name].get("protected")), "seeds": pts}
        for key in ("drop", "drop_other", "best_gain", "best_gain_protected", "best_gain_vs_label_smoothing",
                    "best_gain_protected_vs_label_smoothing"):
            entry[key] = mean_sd([p.get(key) for p in pts])
        kd = {}
        for p in pts:
            for a in p["attacks"]:
                if a["method"] == "kd":
                    kd.setdefault(a["student"], []).append(a["gain"])
        entry["kd_gain"] = {s: mean_sd(v) for s, v in kd.items()}
        # KD's transferred classes (union over students, the audit's rule) per seed: protected / other
        entry["kd_transferred"] = []
        for p in pts:
            tr = set().union(*[set(a["transferred"]) for a in p["attacks"] if a["method"] == "kd"]) if p["attacks"] else set()
            entry["kd_transferred"].append((len(tr & set(protect_idx)), len(tr - set(protect_idx))))
        summary[name] = entry
    return summary


def fmt(ms: tuple[float, float]) -> str:
    m, s = ms
    return "n/a" if m != m else f"{m:+.2f} ± {s:.2f}"


def markdown(summary: dict, protect: str) -> str:
    students = sorted({s for e in summary.values() for s in e["kd_gain"]})
    head = ["teacher", "kind", "teacher drop", "drop, unprotected classes", "best attack gain over label-only",
            f"best gain on protected ({protect})", "best gain over label smoothing",
            "best gain on protected over label smoothing", "KD: protected classes transferred (per seed)"] + [f"KD gain {s}" for s in students]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in summary.items():
        lines.append("| " + " | ".join([name, e["kind"], fmt(e["drop"]), fmt(e["drop_other"]), fmt(e["best_gain"]),
                                         fmt(e["best_gain_protected"]), fmt(e["best_gain_vs_label_smoothing"]),
                                         fmt(e["best_gain_protected_vs_label_smoothing"]),
                                         " / ".join(f"{p}/{o}" for p, o in e["kd_transferred"])]
                                        + [fmt(e["kd_gain"].get(s, (float("nan"), 0))) for s in students]) + " |")
    return "\n".join(lines)


def pareto_plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.axhline(0, color="0.5", lw=0.8)
    ax.axvline(0.5, color="0.5", lw=0.8, ls=":")
    pts = []
    for name, e in summary.items():
        (x, xs), (y, ys) = e["drop"], e["best_gain"]
        if y != y:
            continue
        style = {"none": ("k", "s"), "training": ("C0", "o"), "output": ("C3", "^")}[e["kind"]]
        ax.errorbar(x, y, xerr=xs, yerr=ys, fmt=style[1], color=style[0], capsize=2, ms=6)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        pts.append((x, y))
        yp = e["best_gain_protected"][0]
        if yp == yp and e.get("protected"):
            ax.plot([x, x], [y, yp], color=style[0], lw=0.6, ls="--")
            ax.plot(x, yp, "o", mfc="none", color=style[0], ms=6)
    front, best = [], float("inf")
    for x, y in sorted(pts):
        if y < best:
            front.append((x, y))
            best = y
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="C2", lw=1)
    ax.plot([p[0] for p in front], [p[1] for p in front], "o", ms=11, mfc="none", color="C2")
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    if x0 < 0.5 and y0 < 0:  # the goal: no attack gains anything, at most 0.5 point of teacher accuracy
        ax.add_patch(plt.Rectangle((x0, y0), 0.5 - x0, -y0, color="C2", alpha=0.08, zorder=0))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("teacher test accuracy drop (points)")
    ax.set_ylabel("best attack's gain over the label-only student (points)")
    ax.set_title(title, fontsize=9)
    from matplotlib.lines import Line2D

    ax.legend(handles=[Line2D([], [], color="k", marker="s", ls=""), Line2D([], [], color="C0", marker="o", ls=""),
                       Line2D([], [], color="C3", marker="^", ls=""), Line2D([], [], color="C0", marker="o", mfc="none", ls=""),
                       Line2D([], [], color="C2")],
              labels=["no defense", "training-time defense", "output defense", "protected classes only", "Pareto front"],
              fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench_runs/defenses"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default="configs/fashion-mnist.toml")
    ap.add_argument("--protect", default="Pullover,Coat,Shirt", help="the 3 classes class-selective settings protect")
    ap.add_argument("--second-adversary", default="mlp:hidden=256", help="architecture of the second adversary")
    ap.add_argument("--students", default="mlp:hidden=128;cnn:width=0.25", help="';'-separated student architectures (every attack)")
    ap.add_argument("--attacks", default=DEFAULT_ATTACKS, help="comma-separated attacks of every audit")
    ap.add_argument("--settings", nargs="*", default=DEFAULT_SETTINGS, help=f"training-time settings (of: {', '.join(settings('x'))})")
    ap.add_argument("--output-defenses", nargs="*", default=OUTPUT_DEFENSES)
    ap.add_argument("--teacher-args", default="", help="extra flags for train-teacher and train-defended")
    ap.add_argument("--defense-args", default="", help="extra flags for train-defended only")
    ap.add_argument("--attack-args", default="--train-subset 3000 --epochs 40 --batch-size 64 --lr 0.05 --schedule cosine",
                    help="flags for every attack (the attacker's data and schedule)")
    ap.add_argument("--plot", type=Path, default=None, help="Pareto plot (default OUT/pareto.png)")
    ap.add_argument("--summary-only", action="store_true", help="do not re-run audits that have an audit.json (tables and plot only)")
    ap.add_argument("--tiny", action="store_true", help="digits, one seed, tiny schedules: checks that everything runs")
    args = ap.parse_args()
    if args.tiny:
        args.config, args.seeds, args.protect = "configs/digits.toml", args.seeds[:1], "3,5,8"
        args.second_adversary, args.students = "mlp:hidden=64", "mlp:hidden=32"
        args.teacher_args = args.teacher_args or "--epochs 3"
        args.defense_args = args.defense_args or "--defense-epochs 2"
        args.attack_args = "--train-subset 300 --epochs 2 --batch-size 64"
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    t0 = time.time()
    rows = [bench.run_seed(s) for s in args.seeds]
    from nasty.checkpoint import read_sidecar
    from nasty.defenses.selective import resolve_classes

    classes = read_sidecar(args.out / f"seed{args.seeds[0]}" / "normal")[1]["classes"]
    protect_idx = resolve_classes(args.protect.split(","), classes)
    summary = summarise(rows, classes, protect_idx)
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "config": args.config, "seeds": args.seeds,
              "protected": [classes[i] for i in protect_idx], "argv": sys.argv[1:], "seconds": time.time() - t0,
              "summary": summary, "baselines_pooled": pooled_baselines(rows), "rows": rows, "commands": bench.commands}
    (args.out / "defenses.json").write_text(json.dumps(result, indent=1))
    md = markdown(summary, ",".join(classes[i] for i in protect_idx))
    md += "\n\nBaselines (test accuracy per seed " + ", ".join(map(str, args.seeds)) + "; gains above are over their mean):\n" + "\n".join(
        f"- {b} {st}: " + ", ".join(f"{v:.2f}" for v in r["accuracy_per_seed"]) + f" (mean {r['accuracy']:.2f})"
        for b, per in result["baselines_pooled"].items() for st, r in per.items())
    (args.out / "defenses.md").write_text(md + "\n")
    plot = args.plot or args.out / "pareto.png"
    pareto_plot(summary, plot, f"{Path(args.config).stem}, seeds {','.join(map(str, args.seeds))}: mean ± std; "
                               "open circles: gain on the protected classes")
    print("\n" + md + f"\n\nwrote {args.out / 'defenses.json'}, {args.out / 'defenses.md'}, {plot} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
