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
               and gate_count(v) > s.fail_on]
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
                                  "recommended_seeds": stats.DEFAULT_SEEDS, "family": "target",
                                  "pooled_share": stats.POOLED_SHARE, "resolution": s.resolution}},
        "method": method_text(s),
        "dataset": {"name": data.name, "classes": list(data.classes), "test_size": int(len(y)),
                    "test_per_class": [int(v) for v in np.bincount(y, minlength=an.C)], "train_images": int(len(data.y_train)),
                    **({"thief": {"images": int(s.queries or len(data.y_train)), "labelled": int(s.labelled),
                                  "pool": int(len(data.y_train))}} if s.labelled is not None else {})},
        "baselines": an.baselines,
        "targets": targets,
        "defense_effect": _defense_effect(targets),
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

    def floors(self, g: str, a: str, student: str) -> dict[str, np.ndarray]:
        """What an attack on target ``g`` is judged against: the label-only baselines, and in the thief's regime
        (``--labelled``) also hard-label extraction from the same target (the floor no decision-keeping defense lowers)."""
        out = dict(self.base_corr[student])
        if self.s.labelled is not None and a != "hard-label":
            variants = self.variant_matrices(g, "hard-label", student)
            m = self.pred_matrix(g, "hard-label", student)
            if variants:  # every label smoothing of its grid, each a floor (the tuned one is among them)
                out.update({n: stats.correctness(v, self.y) for n, v in variants.items()})
            elif m is not None:
                out["hard-label"] = stats.correctness(m, self.y)
        return out

    def variant_matrices(self, group: str, method: str, student: str) -> dict[str, np.ndarray]:
        """A tuned floor's candidates over the seeds (name -> (S, N) predictions); empty unless every seed has them all."""
        rows = [self.runs.get((group, method, student, k)) for k in self.s.seed_list]
        if any(r is None or not r.get("_variant_preds") for r in rows):
            return {}
        names = list(rows[0]["_variant_preds"])
        if any(list(r["_variant_preds"]) != names for r in rows):
            return {}
        return {n: np.stack([r["_variant_preds"][n] for r in rows]) for n in names}

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
        if s.labelled is not None and "hard-label" in attacks:  # the thief's regime: a floor, reported beside the baselines, never gated
            attacks = [a for a in attacks if a != "hard-label"]
            entry["floors"] = {"hard-label": {st: self.summary(g, "hard-label", st, tp) for st in s.students
                                              if self.pred_matrix(g, "hard-label", st) is not None}}
            for st in s.students:  # each label smoothing's floor: accuracy over the seeds
                for n, v in self.variant_matrices(g, "hard-label", st).items():
                    accs = [float(100.0 * np.mean(row == self.y)) for row in v]
                    entry["floors"].setdefault(n, {})[st] = {"accuracy": float(np.mean(accs)), "accuracy_per_seed": accs,
                                                             "accuracy_sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0}
        for a in attacks:
            att = self.attack_header(a)
            if (g, a) in skipped:
                att.update(status="skipped", reason=skipped[(g, a)])
            elif (g, a) in failed:
                att.update(status="failed", reason="; ".join(failed[(g, a)]))
                self.problems.append(f"{a} vs {g} failed ({failed[(g, a)][0]})")
            else:
                self.attack_students(att, g, a, tp, t_corr, skipped_students.get((g, a), {}))
            entry["attacks"][a] = att
        self.decide([att for att in entry["attacks"].values() if att["status"] == "ok"])
        return entry

    def attack_header(self, a: str) -> dict:
        s, cls = self.s, get_attack(a)
        rule = "gain" if cls.uses_labels else "fidelity"
        return {"method": a, "summary": cls.summary, "rule": rule,
                "threshold": (f"gain > {s.margin:g} points over " + ("every floor (label-only baselines, hard-label at each label smoothing)" if s.labelled is not None
                                                                      else "both baselines") if rule == "gain"
                              else f"fidelity: accuracy / teacher's > {s.fidelity:g}")
                + f", one-sided, {CORRECTION_TEXT[s.correction]}-adjusted p < {stats.ALPHA:g}",
                "assumes": assumptions(a, s.query, self.data, s.surrogate, s.labelled, s.queries), "params": self.config["params"][a],
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
            floors = self.floors(g, a, st)
            rows = stats.class_decisions(self.y, stats.correctness(m, self.y), floors, t_corr, num_classes=self.C,
                                         rule=att["rule"], margin=s.margin, fidelity=s.fidelity, correction=s.correction,
                                         power=s.power, safe_below=s.safe_below, decide=False)
            row = {**self.summary(g, a, st, tp), "classes": rows,
                   "pooled": stats.pooled_test(stats.correctness(m, self.y), floors, t_corr, rule=att["rule"],
                                               margin=s.margin, fidelity=s.fidelity)}
            extra = _extra(self.runs, g, a, st, s.seed_list)
            if extra:
                row["extra"] = extra
            att["students"][st] = row

    def decide(self, atts: list[dict]) -> None:
        """One family per target, the one the gate reads: every per-class and pooled test of every attack."""
        s = self.s
        m = stats.decide_audit(atts, correction=s.correction, margin=s.margin, fidelity=s.fidelity, power=s.power,
                               safe_below=s.safe_below)
        for att in atts:
            att["correction"] = s.correction
            att["family_size"] = m
            self.collect(att)

    def collect(self, att: dict) -> None:
        """An attack's transferred classes (the union over its students) and its pooled verdict, once decided."""
        att["pooled"] = pooled_summary(att, self.s.resolution)
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


def gate_count(att: dict) -> int:
    """What the gate compares with ``--fail-on``: the transferred classes, and at least one when the pooled test
    transfers (an overall gain means some class gains)."""
    pooled = att.get("pooled") or {}
    return max(att["transferred_count"], 1 if pooled.get("transferred") else 0)


def pooled_summary(att: dict, resolution: float) -> dict | None:
    """The attack's pooled verdict: transferred when any student's pooled test is (the thief keeps the best student);
    the numbers of the student with the smallest adjusted p-value; the detectable gain of the least sensitive
    student (a leak of that size would be found with every student at the configured power)."""
    per = {st: r["pooled"] for st, r in att["students"].items() if r.get("pooled")}
    if not per:
        return None
    order = list(per)
    st = min(order, key=lambda k: (2.0 if per[k].get("p_adjusted") is None else per[k]["p_adjusted"], order.index(k)))
    b = per[st]
    dets = [r.get("detectable") for r in per.values()]
    det = max(dets) if dets and all(d is not None for d in dets) else None
    gain_rule = att["rule"] == "gain"
    out = {"student": st, "rule": att["rule"], "gain": b["gain"], "ci_low": b["gain_ci"][0], "ci_high": b["gain_ci"][1],
           "p": b["p_value"], "p_adjusted": b["p_adjusted"], "transferred": any(r["transferred"] for r in per.values()),
           "detectable_gain": det if gain_rule else None, "resolution": resolution,
           "resolution_ok": (det <= resolution) if gain_rule and det is not None else None}
    if not gain_rule:
        out.update(fidelity=b["fidelity"], fidelity_ci=b["fidelity_ci"], detectable_fidelity=det)
    return out


def resolution_text(resolution: float) -> str:
    """The line the reports print when an attack's pooled test cannot find a leak of ``resolution`` points."""
    return (f"this audit cannot show protection at this size: use more seeds or queries (a pooled gain of "
            f"{resolution:g} points would not be found with the configured power)")


def _defense_effect(targets: dict) -> dict | None:
    """With a reference: per attack of both targets, the classes the defense protects, those it leaves, those
    it opens (the floors of the thief's regime are not attacks, and have no entry)."""
    if "reference" not in targets:
        return None
    defense_effect = {}
    for a, t in targets["teacher"]["attacks"].items():
        r = targets["reference"]["attacks"].get(a)
        if r is None:
            continue
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


def assumptions(method: str, query: str, data, surrogate: str | None = None, labelled: int | None = None,
                queries: int | None = None) -> str:
    """Plain-language statement of what the attack assumes of the thief in this audit (``labelled``/``queries``:
    the thief's regime, its images drawn from the training split of ``data``)."""
    cls = get_attack(method)
    access = query.split(":")[0]
    what = {"weights": "the teacher's weights (white-box)", "logits": "the teacher's logits", "probs": "the teacher's full probability vector",
            "topk": f"the teacher's top-{query.partition(':')[2] or 'K'} probabilities", "label": "only the teacher's predicted label"}[access]
    if cls.needs_teacher and tuple(cls.accepts) == ("weights",):
        what = "the teacher's weights (white-box)"
    if not cls.needs_teacher:
        what = "no access to the teacher"
    if labelled is not None:
        m = queries or len(data.y_train)
        images = (f"on {m} images of the teacher's distribution, {labelled} of them with their ground-truth labels" if cls.uses_labels
                  else f"on {m} images of the teacher's distribution, no labels")
    elif cls.uses_labels:
        images = f"and the ground-truth labels of {len(data.y_train)} training images of the teacher's distribution"
    elif surrogate:
        images = f"on unlabelled images of another dataset ({surrogate}), no labels"
    else:
        images = f"on {len(data.y_train)} unlabelled training images of the teacher's distribution, no labels"
    return f"The thief holds {what} {images}. {cls.summary[0].upper() + cls.summary[1:]}."


CORRECTION_TEXT = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "un"}


def method_text(s: AuditSettings) -> dict:
    """The statistical method in words, as recorded in audit.json, built from the constants and formulas the
    code uses (:mod:`nasty.audit.stats`; tests/test_audit_stats.py ties the two)."""
    share = stats.POOLED_SHARE
    family = ("every test the gate reads is one family: the per-class tests of every (attack, student, class) and the "
              "pooled test of every (attack, student) against one target; the pooled tests hold a weight of "
              f"{share:g} of the family, shared equally, the per-class tests {1 - share:g}, shared equally")
    corr = {"holm": f"weighted Holm (step-down on p/w) over {family}: the chance that the audit shows any false "
                    "'transferred' class or pooled transfer, over all its attacks, is at most alpha (family-wise error rate).",
            "bh": f"weighted Benjamini-Hochberg (BH on p/w, weights at mean 1) over {family}: the expected share of false "
                  "transfers among those reported is at most alpha (false discovery rate).",
            "none": "none: each test at alpha on its own; with several attacks, classes and students an audit in which "
                    "nothing transfers shows a false transfer far more often than alpha."}[s.correction]
    terms = "; ".join(f"{k} = {v}" for k, v in stats.VARIANCE_TERMS.items())
    return {
        "gain": "gain g_c = acc(attack, c) - acc(better baseline, c), percentage points on test class c, averaged over seeds; "
                "the better baseline is the label-only (scratch) or label-smoothing student with the higher accuracy on c"
                + ("; in the thief's regime (labelled images plus unlabelled queries) also the hard-label students (the thief's labels "
                   "and the teacher's top-1 on its queries, one at each label smoothing 0, 0.1 and 0.3), trained against the same target: "
                   "the tests run against every floor."
                   if s.labelled is not None else "."),
        "fidelity": "for attacks that never read the labels: r_c = acc(attack, c) / acc(teacher, c).",
        "pooled": "per attack and student, the same test with every test image together as one class: the overall "
                  "accuracy gain over the better of the two baselines (fidelity rule: overall accuracy / teacher's), "
                  "intersection-union test, crossed variance, seed as the unit. The attack's pooled verdict: transferred "
                  "when any student's pooled test is.",
        "interval": f"{stats.LEVEL:.0%} t-interval with the seed as the unit of replication: for D = 100 (attack - baseline) "
                    "correct (S seeds x n test images), two-way ANOVA mean squares; "
                    f"Var(mean D) = V = {stats.VARIANCE_FORMULA}, where {terms}; df = {stats.DF_FORMULA} when V_I > V_E "
                    f"(Satterthwaite), else df = {stats.DF_OTHERWISE}. Against two baselines the interval is "
                    f"[min_k(d_k - t_(1-(1-{stats.LEVEL:g})/2)(df_k) se_k), min_k(d_k + t_(1-(1-{stats.LEVEL:g})/(2K))(df_k) se_k)]. "
                    "With one seed V = var_i(D)/n, df n-1: only test-set noise is captured (unreliable).",
        "test": f"one-sided p-value of 'gain > {s.margin:g} points' (fidelity rule: 'r > {s.fidelity:g}', tested as "
                f"mean(attack - {s.fidelity:g} x teacher) > 0); against two baselines the larger of the two p-values "
                "(intersection-union test).",
        "correction": corr,
        "decision": f"transferred when the adjusted p-value is below {stats.ALPHA:g} (with no correction: exactly when the "
                    "lower end of the interval is above the margin). An attack's transferred classes are the union "
                    "over its students (the thief keeps the best student per class). The gate (--fail-on N) fails an "
                    "attack with more than N transferred classes, a pooled transfer counting as at least one.",
        "power": f"'detectable' is the smallest gain over the better baseline (fidelity rule: the smallest fidelity) that "
                 f"this audit would call transferred with probability {s.power:g}, given the test's standard error and df, "
                 "when it is the only true effect of the family (noncentral t at the strictest step, alpha x its weight)."
                 + (f" 'Safe at this power' means detectable < {s.safe_below:g} points." if s.safe_below is not None else
                    " Not transferred means not shown to transfer: a class is only as safe as its detectable gain is small.")
                 + f" When an attack's pooled detectable gain is above --resolution ({s.resolution:g} points), the audit "
                   "cannot show protection at that size.",
    }
