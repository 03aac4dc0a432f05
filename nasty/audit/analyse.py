"""Audit stage 3, the analysis: the finished runs -> the audit object (:mod:`nasty.audit.schema`).

Per attack, student and class: the gain over both baselines (or the fidelity to the teacher) with
its interval, p-value and decision (:mod:`nasty.audit.stats`), and the texts the reports print.
"""

from __future__ import annotations

import time

import numpy as np

from ..attacks import get_attack
from ..errors import AuditIncomplete
from . import stats
from .schema import SCHEMA, SCHEMA_VERSION
from .settings import AuditSettings


def analyse(s: AuditSettings, data, attacks: list[str], runs: dict, teacher_pred: dict[str, np.ndarray],
            skipped: dict, failed: dict, notes: list[str], config: dict, skipped_students: dict | None = None) -> dict:
    """Turn the runs into the audit object (see :mod:`nasty.audit.schema`)."""
    an = _Analysis(s, data, runs, config)
    targets = {g: an.target(g, tp, attacks, skipped, failed, skipped_students or {}) for g, tp in teacher_pred.items()}
    failing = [a for a, v in targets["teacher"]["attacks"].items() if v["status"] == "ok" and s.fail_on is not None
               and v["transferred_count"] > s.fail_on]
    seeds, y = s.seed_list, an.y
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "complete" if not an.problems else "incomplete",
        "problems": an.problems,
        "notes": [*notes, *_seed_notes(len(seeds))],
        "config": {**{k: v for k, v in config.items() if k != "params"}, "attacks": attacks, "students": list(s.students),
                   "seeds": seeds, "margin": s.margin, "fidelity": s.fidelity, "fail_on": s.fail_on,
                   "statistics": {"method": "t over seeds with the crossed seeds x test-samples variance (Satterthwaite df)",
                                  "level": stats.LEVEL, "alpha": stats.ALPHA, "correction": s.correction,
                                  "correction_name": CORRECTION_TEXT[s.correction], "power": s.power,
                                  "safe_below": s.safe_below, "intervals": stats.reliability(len(seeds)),
                                  "recommended_seeds": stats.DEFAULT_SEEDS}},
        "method": method_text(s),
        "dataset": {"name": data.name, "classes": list(data.classes), "test_size": int(len(y)),
                    "test_per_class": [int(v) for v in np.bincount(y, minlength=an.C)], "train_images": int(len(data.y_train))},
        "baselines": an.baselines,
        "targets": targets,
        "defense_effect": _defense_effect(targets, attacks),
        "gate": {"fail_on": s.fail_on, "failed": bool(failing), "failing_attacks": failing},
    }


class _Analysis:
    """The runs of one audit, read per (group, attack, student) across its seeds."""

    def __init__(self, s: AuditSettings, data, runs: dict, config: dict):
        self.s, self.data, self.runs, self.config = s, data, runs, config
        self.y = data.y_test.numpy()
        self.C = data.num_classes
        self.problems: list[str] = []
        self.baselines: dict[str, dict] = {b: {} for b in stats.BASELINES}
        self.base_corr: dict[str, dict[str, np.ndarray]] = {}
        for st in s.students:
            self.base_corr[st] = {}
            for b in stats.BASELINES:
                m = self.pred_matrix("baselines", b, st)
                if m is None:
                    raise AuditIncomplete(f"baseline {b} for {st} is missing")
                self.base_corr[st][b] = stats.correctness(m, self.y)
                self.baselines[b][st] = self.summary("baselines", b, st, None)

    def pred_matrix(self, group: str, method: str, student: str) -> np.ndarray | None:
        rows = [self.runs.get((group, method, student, k)) for k in self.s.seed_list]
        if any(r is None for r in rows):
            return None
        return np.stack([r["_pred"] for r in rows])

    def summary(self, group: str, method: str, student: str, tpred: np.ndarray | None) -> dict:
        rows = [self.runs[(group, method, student, k)] for k in self.s.seed_list]
        accs = [float(r["accuracy"]) for r in rows]
        out = {"accuracy": float(np.mean(accs)), "accuracy_sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
               "accuracy_per_seed": accs,
               "per_class_accuracy": _per_class(np.stack([stats.correctness(r["_pred"], self.y) for r in rows]).mean(0), self.y, self.C),
               "train_seconds": float(sum(r.get("train_seconds", 0.0) for r in rows))}
        if tpred is not None:
            out["teacher_agreement"] = float(np.mean([100.0 * np.mean(r["_pred"] == tpred) for r in rows]))
        return out

    def target(self, g: str, tp: np.ndarray, attacks: list[str], skipped: dict, failed: dict, skipped_students: dict) -> dict:
        s = self.s
        t_corr = stats.correctness(tp, self.y)
        entry = {"checkpoint": s.teacher if g == "teacher" else s.reference,
                 "accuracy": float(100.0 * t_corr.mean()), "per_class_accuracy": _per_class(t_corr, self.y, self.C), "attacks": {}}
        for a in attacks:
            att = self.attack_header(a)
            if (g, a) in skipped:
                att.update(status="skipped", reason=skipped[(g, a)])
            elif (g, a) in failed:
                att.update(status="failed", reason="; ".join(failed[(g, a)]))
                self.problems.append(f"{a} vs {g} failed ({failed[(g, a)][0]})")
            else:
                self.attack_students(att, g, a, tp, t_corr, skipped_students.get((g, a), {}))
                if att["status"] == "ok":
                    self.decide(att)
            entry["attacks"][a] = att
        return entry

    def attack_header(self, a: str) -> dict:
        s, cls = self.s, get_attack(a)
        rule = "gain" if cls.uses_labels else "fidelity"
        return {"method": a, "summary": cls.summary, "rule": rule,
                "threshold": (f"gain > {s.margin:g} points over both baselines" if rule == "gain"
                              else f"fidelity: accuracy / teacher's > {s.fidelity:g}")
                + f", one-sided, {CORRECTION_TEXT[s.correction]}-adjusted p < {stats.ALPHA:g}",
                "assumes": assumptions(a, s.query, self.data, s.surrogate), "params": self.config["params"][a],
                "status": "ok", "reason": None, "transferred_classes": [], "transferred_count": 0, "num_classes": self.C,
                "students": {}}

    def attack_students(self, att: dict, g: str, a: str, tp: np.ndarray, t_corr: np.ndarray, not_run: dict) -> None:
        """Per student: the per-class tests of the attack's runs (not yet decided)."""
        s = self.s
        if not_run:
            att["skipped_students"] = dict(not_run)
        for st in s.students:
            if st in not_run:
                continue
            m = self.pred_matrix(g, a, st)
            if m is None:
                att.update(status="failed", reason=f"runs missing for {st}")
                self.problems.append(f"{a} vs {g}: runs missing for {st}")
                break
            rows = stats.class_decisions(self.y, stats.correctness(m, self.y), self.base_corr[st], t_corr, num_classes=self.C,
                                         rule=att["rule"], margin=s.margin, fidelity=s.fidelity, correction=s.correction,
                                         power=s.power, safe_below=s.safe_below, decide=False)
            row = {**self.summary(g, a, st, tp), "classes": rows}
            extra = _extra(self.runs, g, a, st, s.seed_list)
            if extra:
                row["extra"] = extra
            att["students"][st] = row

    def decide(self, att: dict) -> None:
        """One family: every class of every student of this attack (against this target)."""
        s = self.s
        att["correction"] = s.correction
        att["family_size"] = stats.decide_family([r["classes"] for r in att["students"].values()], rule=att["rule"],
                                                 correction=s.correction, margin=s.margin, fidelity=s.fidelity,
                                                 power=s.power, safe_below=s.safe_below)
        union: set[int] = set()
        for r in att["students"].values():
            r["transferred_classes"] = [x["class"] for x in r["classes"] if x["transferred"]]
            r["transferred_count"] = len(r["transferred_classes"])
            union.update(r["transferred_classes"])
        att["transferred_classes"] = sorted(union)
        att["transferred_count"] = len(union)
        found = [set(v) for st_row in att["students"].values() for v in st_row.get("extra", {}).get("undistillable_classes", [])]
        if found:
            att["undistillable_classes"] = sorted(set.union(*found))


def _defense_effect(targets: dict, attacks: list[str]) -> dict | None:
    """With a reference: per attack, the classes the defense protects, those it leaves, those it opens."""
    if "reference" not in targets:
        return None
    defense_effect = {}
    for a in attacks:
        t, r = targets["teacher"]["attacks"][a], targets["reference"]["attacks"][a]
        if t["status"] == r["status"] == "ok":
            tt, rr = set(t["transferred_classes"]), set(r["transferred_classes"])
            defense_effect[a] = {"protected_classes": sorted(rr - tt), "still_transferred": sorted(rr & tt),
                                 "newly_transferred": sorted(tt - rr)}
    return defense_effect


def _seed_notes(n: int) -> list[str]:
    rel = stats.reliability(n)
    if rel == "unreliable":
        return ["One seed: every interval is UNRELIABLE. It captures the test-set noise only, not the training "
                "noise between seeds, and in simulation a false 'transferred' is several times more frequent than nominal. "
                f"Use --seeds {stats.DEFAULT_SEEDS} or more."]
    if rel == "approximate":
        return [f"{n} seeds: intervals and detectable gains are approximate (the seed-to-seed variance "
                f"rests on {n - 1} degree{'s' if n > 2 else ''} of freedom, so they are wide); "
                f"{stats.DEFAULT_SEEDS} or more seeds are recommended."]
    return []


def _per_class(correct: np.ndarray, y: np.ndarray, num_classes: int) -> list[float | None]:
    return [float(100.0 * correct[y == c].mean()) if (y == c).any() else None for c in range(num_classes)]


def _extra(runs: dict, g: str, a: str, st: str, seeds: list[int]) -> dict:
    """Attack-specific outputs worth reporting (e.g. TLLM's identified classes), per seed."""
    out: dict[str, list] = {}
    for k in seeds:
        r = runs[(g, a, st, k)]
        for key in ("undistillable_classes",):
            if key in r:
                out.setdefault(key, []).append(r[key])
    return out


def describe_defense(side: dict, post) -> dict:
    """What protects a target: the training-time defense recorded in its checkpoint, and the output
    defense its answers pass through (``None`` where there is none)."""
    d = side.get("defense") if isinstance(side.get("defense"), dict) else None
    training = None
    if d:
        keys = ("tau", "omega", "protect_classes", "protect_by", "anchor", "combine", "max_accuracy_drop", "kl_cap")
        training = {"name": d.get("name"), **{k: d[k] for k in keys if d.get(k) not in (None, [], "") and not (k == "anchor" and not d[k])}}
        if training["name"] not in ("class-selective", "budget"):
            training.pop("protect_by", None)
        if training["name"] != "multi-adversary":
            training.pop("combine", None)
        training["adversaries"] = len(side.get("adversaries") or d.get("adversary") or [])
        info = side.get("defense_info") or {}
        if isinstance(info, dict) and "omega" in info:
            training["omega_selected"] = info["omega"]
        model = side.get("model") if isinstance(side.get("model"), dict) else {}
        kw = model.get("kwargs") if isinstance(model.get("kwargs"), dict) else {}
        if model.get("name") == "locked":
            training["lock"] = f"{kw.get('form', '?')}, {kw.get('lock', '?')}"
            training["white_box"] = ("the artifact contains the normal model: white-box (--query weights) results are "
                                     "attacks on the normal model, not a test of the defense")
    return {"training": training, "output": post.describe() if post is not None else None}


def defense_text(defense: dict | None) -> str:
    """One line naming a target's defenses and their parameters."""
    if not defense or (not defense.get("training") and not defense.get("output")):
        return "none (a normally trained model answering with its own outputs)"
    parts = []
    t = defense.get("training")
    if t:
        params = ", ".join(f"{k} {','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in t.items() if k not in ("name", "white_box"))
        parts.append(f"training-time: {t['name']} ({params})")
        if t.get("white_box"):
            parts.append(f"note: {t['white_box']}")
    if defense.get("output"):
        parts.append(f"output: {defense['output']}")
    return "; ".join(parts)


def assumptions(method: str, query: str, data, surrogate: str | None = None) -> str:
    """Plain-language statement of what the attack assumes of the thief in this audit."""
    cls = get_attack(method)
    access = query.split(":")[0]
    what = {"weights": "the teacher's weights (white-box)", "logits": "the teacher's logits", "probs": "the teacher's full probability vector",
            "topk": f"the teacher's top-{query.partition(':')[2] or 'K'} probabilities", "label": "only the teacher's predicted label"}[access]
    if cls.needs_teacher and tuple(cls.accepts) == ("weights",):
        what = "the teacher's weights (white-box)"
    if not cls.needs_teacher:
        what = "no access to the teacher"
    if cls.uses_labels:
        images = f"and the ground-truth labels of {len(data.y_train)} training images of the teacher's distribution"
    elif surrogate:
        images = f"on unlabelled images of another dataset ({surrogate}), no labels"
    else:
        images = f"on {len(data.y_train)} unlabelled training images of the teacher's distribution, no labels"
    return f"The thief holds {what} {images}. {cls.summary[0].upper() + cls.summary[1:]}."


CORRECTION_TEXT = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "un"}


def method_text(s: AuditSettings) -> dict:
    """The statistical method in words, as recorded in audit.json (see :mod:`nasty.audit.stats` for the formulas)."""
    corr = {"holm": "Holm's step-down procedure over every (student, class) test of one attack: the chance that an attack "
                    "shows any false 'transferred' class is at most alpha (family-wise error rate).",
            "bh": "Benjamini-Hochberg over every (student, class) test of one attack: the expected share of false "
                  "'transferred' classes among those reported is at most alpha (false discovery rate).",
            "none": "none: each class is tested at alpha on its own; with 10 classes x 2 students an attack that transfers "
                    "nothing shows a false 'transferred' class far more often than alpha."}[s.correction]
    return {
        "gain": "gain g_c = acc(attack, c) - acc(better baseline, c), percentage points on test class c, averaged over seeds; "
                "the better baseline is the label-only (scratch) or label-smoothing student with the higher accuracy on c.",
        "fidelity": "for attacks that never read the labels: r_c = acc(attack, c) / acc(teacher, c).",
        "interval": "95% t-interval with the seed as the unit of replication: for D = attack - baseline (per seed and test "
                    "image), Var(mean D) = V_S + V_I with V_S = max(MS_S, MS_E)/(S n) (seed-to-seed variance of the per-seed "
                    "gains) and V_I = max(MS_I - MS_E, 0)/(S n) (test-image variance shared by all seeds), two-way ANOVA mean "
                    "squares over S seeds x n test images; Satterthwaite df = V^2 / (V_S^2/(S-1) + V_I^2/(n-1)). The gain's "
                    "interval is the smaller of the bounds against the two baselines. With one seed only test-set noise is "
                    "captured (unreliable).",
        "test": f"one-sided p-value of 'gain > {s.margin:g} points' (fidelity rule: 'r_c > {s.fidelity:g}', tested as "
                f"mean(attack - {s.fidelity:g} x teacher) > 0); against two baselines the larger of the two p-values "
                "(intersection-union test).",
        "correction": corr,
        "decision": f"transferred when the adjusted p-value is below {stats.ALPHA:g} (with no correction: exactly when the "
                    "lower end of the 95% interval is above the margin). An attack's transferred classes are the union "
                    "over its students (the thief keeps the best student per class).",
        "power": f"for a class that is not transferred, 'detectable' is the smallest gain over the better baseline (fidelity "
                 f"rule: the smallest fidelity) that this audit would call transferred with probability {s.power:g}, given "
                 "the class's standard error and df, when it is the only transferable class of the attack (noncentral t)."
                 + (f" 'Safe at this power' means detectable < {s.safe_below:g} points." if s.safe_below is not None else
                    " Not transferred means not shown to transfer: a class is only as safe as its detectable gain is small."),
    }
