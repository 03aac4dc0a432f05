"""Audit stage 3, the analysis: the finished runs -> the audit object (:mod:`nasty.audit.schema`).

Per attack, student and class: the gain over both baselines (or the fidelity to the teacher) with
its interval, p-value and decision (:mod:`nasty.audit.stats`), and the texts the reports print.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import time

import numpy as np

from ..attacks import get_attack
from ..errors import AuditIncomplete
from . import stats
from .schema import SCHEMA, SCHEMA_VERSION

if TYPE_CHECKING:
    from .plan import AuditSettings


def analyse(s: AuditSettings, data, attacks: list[str], runs: dict, teacher_pred: dict[str, np.ndarray],
            skipped: dict, failed: dict, notes: list[str], config: dict, skipped_students: dict | None = None) -> dict:
    """Turn the runs into the audit object (see :mod:`nasty.audit.schema`)."""
    y = data.y_test.numpy()
    C = data.num_classes
    seeds = s.seed_list

    def pred_matrix(group: str, method: str, student: str) -> np.ndarray | None:
        rows = [runs.get((group, method, student, k)) for k in seeds]
        if any(r is None for r in rows):
            return None
        return np.stack([r["_pred"] for r in rows])

    def summary(group: str, method: str, student: str, tpred: np.ndarray | None) -> dict:
        rows = [runs[(group, method, student, k)] for k in seeds]
        accs = [float(r["accuracy"]) for r in rows]
        out = {"accuracy": float(np.mean(accs)), "accuracy_sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
               "accuracy_per_seed": accs,
               "per_class_accuracy": _per_class(np.stack([stats.correctness(r["_pred"], y) for r in rows]).mean(0), y, C),
               "train_seconds": float(sum(r.get("train_seconds", 0.0) for r in rows))}
        if tpred is not None:
            out["teacher_agreement"] = float(np.mean([100.0 * np.mean(r["_pred"] == tpred) for r in rows]))
        return out

    baselines: dict[str, dict] = {b: {} for b in stats.BASELINES}
    base_corr: dict[str, dict[str, np.ndarray]] = {}
    for st in s.students:
        base_corr[st] = {}
        for b in stats.BASELINES:
            m = pred_matrix("baselines", b, st)
            if m is None:
                raise AuditIncomplete(f"baseline {b} for {st} is missing")
            base_corr[st][b] = stats.correctness(m, y)
            baselines[b][st] = summary("baselines", b, st, None)

    targets: dict[str, dict] = {}
    problems: list[str] = []
    for g, tp in teacher_pred.items():
        t_corr = stats.correctness(tp, y)
        per_class_t = _per_class(t_corr, y, C)
        entry = {"checkpoint": s.teacher if g == "teacher" else s.reference,
                 "accuracy": float(100.0 * t_corr.mean()), "per_class_accuracy": per_class_t, "attacks": {}}
        for a in attacks:
            cls = get_attack(a)
            rule = "gain" if cls.uses_labels else "fidelity"
            att = {"method": a, "summary": cls.summary, "rule": rule,
                   "threshold": (f"gain > {s.margin:g} points over both baselines" if rule == "gain"
                                 else f"fidelity: accuracy / teacher's > {s.fidelity:g}")
                   + f", one-sided, {CORRECTION_TEXT[s.correction]}-adjusted p < {stats.ALPHA:g}",
                   "assumes": assumptions(a, s.query, data, s.surrogate), "params": config["params"][a],
                   "status": "ok", "reason": None, "transferred_classes": [], "transferred_count": 0, "num_classes": C,
                   "students": {}}
            if (g, a) in skipped:
                att.update(status="skipped", reason=skipped[(g, a)])
            elif (g, a) in failed:
                att.update(status="failed", reason="; ".join(failed[(g, a)]))
                problems.append(f"{a} vs {g} failed ({failed[(g, a)][0]})")
            else:
                union: set[int] = set()
                not_run = (skipped_students or {}).get((g, a), {})
                if not_run:
                    att["skipped_students"] = dict(not_run)
                for st in s.students:
                    if st in not_run:
                        continue
                    m = pred_matrix(g, a, st)
                    if m is None:
                        att.update(status="failed", reason=f"runs missing for {st}")
                        problems.append(f"{a} vs {g}: runs missing for {st}")
                        break
                    rows = stats.class_decisions(y, stats.correctness(m, y), base_corr[st], t_corr, num_classes=C, rule=rule,
                                                 margin=s.margin, fidelity=s.fidelity, correction=s.correction, power=s.power,
                                                 safe_below=s.safe_below, decide=False)
                    row = {**summary(g, a, st, tp), "classes": rows}
                    extra = _extra(runs, g, a, st, seeds)
                    if extra:
                        row["extra"] = extra
                    att["students"][st] = row
                if att["status"] == "ok":
                    # one family: every class of every student of this attack (against this target)
                    att["correction"] = s.correction
                    att["family_size"] = stats.decide_family([r["classes"] for r in att["students"].values()], rule=rule,
                                                             correction=s.correction, margin=s.margin, fidelity=s.fidelity,
                                                             power=s.power, safe_below=s.safe_below)
                    for r in att["students"].values():
                        r["transferred_classes"] = [x["class"] for x in r["classes"] if x["transferred"]]
                        r["transferred_count"] = len(r["transferred_classes"])
                        union.update(r["transferred_classes"])
                    att["transferred_classes"] = sorted(union)
                    att["transferred_count"] = len(union)
                    found = [set(v) for st_row in att["students"].values() for v in st_row.get("extra", {}).get("undistillable_classes", [])]
                    if found:
                        att["undistillable_classes"] = sorted(set.union(*found))
            entry["attacks"][a] = att
        targets[g] = entry

    defense_effect = None
    if "reference" in targets:
        defense_effect = {}
        for a in attacks:
            t, r = targets["teacher"]["attacks"][a], targets["reference"]["attacks"][a]
            if t["status"] == r["status"] == "ok":
                tt, rr = set(t["transferred_classes"]), set(r["transferred_classes"])
                defense_effect[a] = {"protected_classes": sorted(rr - tt), "still_transferred": sorted(rr & tt),
                                     "newly_transferred": sorted(tt - rr)}
    failing = [a for a, v in targets["teacher"]["attacks"].items() if v["status"] == "ok" and s.fail_on is not None
               and v["transferred_count"] > s.fail_on]
    counts = np.bincount(y, minlength=C)
    rel = stats.reliability(len(seeds))
    if rel == "unreliable":
        notes = [*notes, "One seed: every interval is UNRELIABLE. It captures the test-set noise only, not the training "
                 "noise between seeds, and in simulation a false 'transferred' is several times more frequent than nominal. "
                 f"Use --seeds {stats.DEFAULT_SEEDS} or more."]
    elif rel == "approximate":
        notes = [*notes, f"{len(seeds)} seeds: intervals and detectable gains are approximate (the seed-to-seed variance "
                 f"rests on {len(seeds) - 1} degree{'s' if len(seeds) > 2 else ''} of freedom, so they are wide); "
                 f"{stats.DEFAULT_SEEDS} or more seeds are recommended."]
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "complete" if not problems else "incomplete",
        "problems": problems,
        "notes": notes,
        "config": {**{k: v for k, v in config.items() if k != "params"}, "attacks": attacks, "students": list(s.students),
                   "seeds": seeds, "margin": s.margin, "fidelity": s.fidelity, "fail_on": s.fail_on,
                   "statistics": {"method": "t over seeds with the crossed seeds x test-samples variance (Satterthwaite df)",
                                  "level": stats.LEVEL, "alpha": stats.ALPHA, "correction": s.correction,
                                  "correction_name": CORRECTION_TEXT[s.correction], "power": s.power,
                                  "safe_below": s.safe_below, "intervals": stats.reliability(len(seeds)),
                                  "recommended_seeds": stats.DEFAULT_SEEDS}},
        "method": method_text(s),
        "dataset": {"name": data.name, "classes": list(data.classes), "test_size": int(len(y)),
                    "test_per_class": [int(v) for v in counts], "train_images": int(len(data.y_train))},
        "baselines": baselines,
        "targets": targets,
        "defense_effect": defense_effect,
        "gate": {"fail_on": s.fail_on, "failed": bool(failing), "failing_attacks": failing},
    }


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
