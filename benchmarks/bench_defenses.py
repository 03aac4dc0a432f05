"""Defense benchmark (issue 5): every defense and setting against every attack, over seeds, and the
Pareto plot of teacher accuracy drop vs the best attack's gain over the label-only student.

Every training step is a real `nasty` CLI call (printed, so each number has its command); runs that
already have a result.json are reused, so the script can be stopped and restarted.

Full run (Fashion-MNIST, 3 seeds; hours on 2 CPU cores -- far less on a GPU):

    python benchmarks/bench_defenses.py --out bench_runs/defenses --seeds 0 1 2 --plot docs/pareto.png

Quick check that everything runs (digits, one seed, tiny schedules, a few minutes):

    python benchmarks/bench_defenses.py --tiny --out /tmp/bench_defenses_tiny

Per seed it trains the normal CNN teacher and a normal MLP (the second adversary), then:

- training-time defenses, each fine-tuned from the normal teacher (configs/fashion-mnist.toml):
  nasty (one adversary), class-selective on 3 classes (Pullover, Coat, Shirt by default; by label
  and by probability mass), several adversaries (CNN + MLP; mean and min), the accuracy budget
  (0.5 points), and the budget combined with class-selective protection and both adversaries;
- output defenses on the normal teacher (stingy top-2, rounding, reverse sigmoid, noise, label only);

and attacks each teacher with every registered attack that accepts the access (logits for
trained defenses, the defended probabilities for output defenses; white-box attacks only where
the weights are the defense) for every ``--students`` architecture, plus KD for the
``--heldout-students`` (architectures used as no adversary). The baselines, per student: labels
only (``scratch``) and label smoothing. Writes ``OUT/defenses.json``, ``OUT/defenses.md`` (tables
for docs/results.md) and the Pareto plot.
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

OUTPUT_DEFENSES = ["topk:2", "round:2", "reverse-sigmoid:beta=1.0:gamma=0.1", "noise:scale=0.05", "label"]
BASELINES = ("scratch", "label-smoothing")
SKIP_ATTACKS = ("ensemble",)  # needs several teachers


def slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def settings(protect: str) -> dict[str, tuple[list[str], bool]]:
    """name -> (train-defended flags, uses the MLP as second adversary)."""
    return {
        "nasty": (["--defense", "nasty"], False),
        "selective3": (["--defense", "class-selective", "--protect-classes", protect], False),
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
    def sh(self, cmd: list[str], run: Path, *, may_fail: bool = False) -> dict | None:
        """Run a nasty command writing ``run``/result.json unless it exists; return the result (None: refused)."""
        res_file = run / "result.json"
        refused = run.with_name(run.name + ".refused")
        line = " ".join(shlex.quote(c) for c in cmd)
        self.commands[str(run)] = line
        if res_file.is_file():
            return json.loads(res_file.read_text())
        if refused.is_file():
            return None
        print("$ " + line, flush=True)
        run.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        (run.parent / (run.name + ".log")).write_text(p.stdout + p.stderr)
        if p.returncode != 0:
            msg = (p.stderr.strip().splitlines() or ["?"])[-1]
            if may_fail and p.returncode == 2:  # refused: bad fit between attack and access, not a bug
                print(f"  refused: {msg}", flush=True)
                refused.write_text(msg + "\n")
                return None
            sys.exit(f"command failed ({p.returncode}): {msg}\n  see {run.parent / (run.name + '.log')}")
        print(f"  ({time.time() - t0:.0f} s)", flush=True)
        return json.loads(res_file.read_text())

    def nasty(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "nasty", *args]

    def teacher_flags(self) -> list[str]:
        return ["--config", self.a.config, *shlex.split(self.a.teacher_args)]

    def normal(self, seed: int, model: str | None = None) -> Path:
        run = self.out / f"seed{seed}" / ("normal" if model is None else f"normal-{slug(model)}")
        self.sh(self.nasty("train-teacher", *self.teacher_flags(), "--seed", str(seed), *(["--model", model] if model else []),
                           "--out", str(run), "--force"), run)
        return run

    def defended(self, seed: int, name: str, flags: list[str], multi: bool) -> dict:
        run = self.out / f"seed{seed}" / name
        advs = [self.normal(seed)] + ([self.normal(seed, self.a.second_adversary)] if multi else [])
        adv_flags = [x for p in advs for x in ("--adversary", str(p))]
        res = self.sh(self.nasty("train-defended", *self.teacher_flags(), *shlex.split(self.a.defense_args), "--seed", str(seed),
                                 *adv_flags, *flags, "--no-probe", "--out", str(run), "--force"), run)
        assert res is not None
        return res

    def attack(self, seed: int, teacher: Path | None, tag: str, method: str, student: str, query: str | None,
               output_defense: str | None = None) -> dict | None:
        run = self.out / f"seed{seed}" / "attacks" / tag / f"{method}--{slug(student)}"
        cmd = self.nasty("attack", "--config", self.a.config, *shlex.split(self.a.attack_args), "--seed", str(seed),
                         "--method", method, "--student", student, "--out", str(run), "--force")
        if teacher is not None:
            cmd += ["--teacher", str(teacher), "--query", query or "logits"]
        if output_defense:
            cmd += ["--output-defense", output_defense]
        return self.sh(cmd, run, may_fail=True)

    # -------------------------------------------------------------- what to run
    def attacks_for(self, output_defense: str | None) -> list[tuple[str, str]]:
        """(method, access) pairs: soft outputs where the attack takes them, white-box only without an output defense."""
        from nasty.attacks import ATTACKS

        wanted = [m.strip() for m in self.a.attacks.split(",")] if self.a.attacks else sorted(ATTACKS)
        pairs = []
        for m in wanted:
            cls = ATTACKS[m]
            if m in BASELINES or m in SKIP_ATTACKS or not cls.needs_teacher:
                continue
            order = ("probs", "topk:2", "label") if output_defense else ("logits", "weights", "probs", "label")
            access = next((q for q in order if q.split(":")[0] in cls.accepts), None)
            if access is not None:
                pairs.append((m, access))
        return pairs

    def teacher_accuracy_with(self, normal: Path, spec: str) -> tuple[float, list[float | None]]:
        """Test accuracy of the normal teacher behind an output defense (argmax of the defended probabilities)."""
        from nasty.checkpoint import load_checkpoint
        from nasty.defenses import DefendedModel
        from nasty.metrics import evaluate
        from nasty.runs import data_from_config

        model, side = load_checkpoint(normal)
        cfg = json.loads((normal / "config.json").read_text())
        data = data_from_config(cfg, normalization=(side["normalization"]["mean"], side["normalization"]["std"]))
        m = evaluate(DefendedModel(model, spec), data.x_test, data.y_test, data.num_classes)
        return m["accuracy"], m["per_class_accuracy"]

    def run_seed(self, seed: int) -> dict:
        students, heldout = self.a.students.split(";"), [s for s in self.a.heldout_students.split(";") if s]
        row: dict = {"seed": seed, "baselines": {}, "teachers": {}}
        for s in students + heldout:
            row["baselines"][s] = {m: self.attack(seed, None, "baselines", m, s, None) for m in BASELINES}
        normal = self.normal(seed)
        normal_res = json.loads((normal / "result.json").read_text())
        row["normal_accuracy"] = normal_res["accuracy"]
        row["normal_per_class"] = normal_res["per_class_accuracy"]

        def attack_all(tag: str, teacher: Path, od: str | None, with_heldout: bool) -> list[dict]:
            rows = []
            for method, access in self.attacks_for(od):
                for s in students + (heldout if with_heldout and method == "kd" else []):
                    r = self.attack(seed, teacher, tag, method, s, access, od)
                    if r is not None:
                        rows.append({"method": method, "student": s, "access": access, "accuracy": r["accuracy"],
                                     "per_class_accuracy": r["per_class_accuracy"]})
            return rows

        row["teachers"]["normal"] = {"kind": "none", "accuracy": normal_res["accuracy"], "per_class_accuracy": normal_res["per_class_accuracy"],
                                     "attacks": attack_all("normal", normal, None, True)}
        for name, (flags, multi) in settings(self.a.protect).items():
            if self.a.only and name not in self.a.only:
                continue
            res = self.defended(seed, name, flags, multi)
            ckpt = Path(res["defended_checkpoint"])
            row["teachers"][name] = {
                "kind": "training", "accuracy": res["defended_accuracy"], "per_class_accuracy": res["defended_per_class_accuracy"],
                "protected": res.get("protected_classes"), "defense_info": {k: v for k, v in (res.get("defense_info") or {}).items() if k != "history"},
                "attacks": attack_all(name, ckpt, None, multi or name == "nasty"),
            }
        for spec in self.a.output_defenses:
            if self.a.only and spec not in self.a.only:
                continue
            acc, per = self.teacher_accuracy_with(normal, spec)
            row["teachers"][spec] = {"kind": "output", "accuracy": acc, "per_class_accuracy": per,
                                     "attacks": attack_all("out-" + slug(spec), normal, spec, False)}
        return row


# ------------------------------------------------------------------ summary
def class_mean(per: list[float | None], idx: list[int]) -> float:
    vals = [per[i] for i in idx if per[i] is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def point(row: dict, name: str, classes: list[str], protect_idx: list[int]) -> dict:
    """One teacher on one seed: accuracy drop and each attack's gain over its student's baselines."""
    t = row["teachers"][name]
    base = row["baselines"]
    other_idx = [i for i in range(len(classes)) if i not in protect_idx]
    out = {"accuracy": t["accuracy"], "drop": row["normal_accuracy"] - t["accuracy"],
           "drop_other": class_mean(row["normal_per_class"], other_idx) - class_mean(t["per_class_accuracy"], other_idx),
           "attacks": []}
    for a in t["attacks"]:
        sc, ls = base[a["student"]]["scratch"], base[a["student"]]["label-smoothing"]
        if sc is None:
            continue
        out["attacks"].append({
            "method": a["method"], "student": a["student"], "accuracy": a["accuracy"],
            "gain": a["accuracy"] - sc["accuracy"],
            "gain_vs_label_smoothing": a["accuracy"] - ls["accuracy"] if ls else None,
            "gain_protected": class_mean(a["per_class_accuracy"], protect_idx) - class_mean(sc["per_class_accuracy"], protect_idx),
            "gain_other": class_mean(a["per_class_accuracy"], other_idx) - class_mean(sc["per_class_accuracy"], other_idx),
        })
    if out["attacks"]:
        best = max(out["attacks"], key=lambda r: r["gain"])
        out["best_gain"], out["best_attack"] = best["gain"], f"{best['method']}/{best['student']}"
        out["best_gain_protected"] = max(r["gain_protected"] for r in out["attacks"])
        ls_gains = [r["gain_vs_label_smoothing"] for r in out["attacks"] if r["gain_vs_label_smoothing"] is not None]
        out["best_gain_vs_label_smoothing"] = max(ls_gains) if ls_gains else None
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(rows: list[dict], classes: list[str], protect_idx: list[int]) -> dict:
    names = list(rows[0]["teachers"])
    summary = {}
    for name in names:
        pts = [point(r, name, classes, protect_idx) for r in rows if name in r["teachers"]]
        entry = {"kind": rows[0]["teachers"][name]["kind"], "protected": bool(rows[0]["teachers"][name].get("protected")), "seeds": pts}
        for key in ("drop", "drop_other", "best_gain", "best_gain_protected", "best_gain_vs_label_smoothing"):
            entry[key] = mean_sd([p.get(key) for p in pts])
        kd = {}
        for p in pts:
            for a in p["attacks"]:
                if a["method"] == "kd":
                    kd.setdefault(a["student"], []).append(a["gain"])
        entry["kd_gain"] = {s: mean_sd(v) for s, v in kd.items()}
        summary[name] = entry
    return summary


def fmt(ms: tuple[float, float]) -> str:
    m, s = ms
    return "n/a" if m != m else f"{m:+.2f} ± {s:.2f}"


def markdown(summary: dict, protect: str) -> str:
    students = sorted({s for e in summary.values() for s in e["kd_gain"]})
    head = ["teacher", "kind", "teacher drop", "drop, unprotected classes", "best attack gain over label-only",
            f"best gain on protected ({protect})", "best gain over label smoothing"] + [f"KD gain {s}" for s in students]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in summary.items():
        lines.append("| " + " | ".join([name, e["kind"], fmt(e["drop"]), fmt(e["drop_other"]), fmt(e["best_gain"]),
                                         fmt(e["best_gain_protected"]), fmt(e["best_gain_vs_label_smoothing"])]
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
    ap.add_argument("--heldout-students", default="resnet20:width=0.5", help="';'-separated students for KD only (used as no adversary)")
    ap.add_argument("--attacks", default="", help="comma-separated attacks (default: every registered attack that fits)")
    ap.add_argument("--output-defenses", nargs="*", default=OUTPUT_DEFENSES)
    ap.add_argument("--only", nargs="*", default=[], help="run only these teacher settings (names or output-defense specs)")
    ap.add_argument("--teacher-args", default="", help="extra flags for train-teacher and train-defended")
    ap.add_argument("--defense-args", default="", help="extra flags for train-defended only")
    ap.add_argument("--attack-args", default="--train-subset 3000 --epochs 40 --batch-size 64 --lr 0.05 --schedule cosine",
                    help="flags for every attack (the attacker's data and schedule)")
    ap.add_argument("--plot", type=Path, default=None, help="Pareto plot (default OUT/pareto.png)")
    ap.add_argument("--tiny", action="store_true", help="digits, one seed, tiny schedules: checks that everything runs")
    args = ap.parse_args()
    if args.tiny:
        args.config, args.seeds, args.protect = "configs/digits.toml", args.seeds[:1], "3,5,8"
        args.second_adversary, args.students, args.heldout_students = "mlp:hidden=64", "mlp:hidden=32", "cnn:width=0.25"
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
              "summary": summary, "rows": rows, "commands": bench.commands}
    (args.out / "defenses.json").write_text(json.dumps(result, indent=1))
    md = markdown(summary, ",".join(classes[i] for i in protect_idx))
    (args.out / "defenses.md").write_text(md + "\n")
    plot = args.plot or args.out / "pareto.png"
    pareto_plot(summary, plot, f"{Path(args.config).stem}, seeds {','.join(map(str, args.seeds))}: mean ± std; "
                               "open circles: gain on the protected classes")
    print("\n" + md + f"\n\nwrote {args.out / 'defenses.json'}, {args.out / 'defenses.md'}, {plot} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
