"""The KD probe: does a student learn *less* from the defended teacher than from labels alone?

For every probe student: ``scratch`` (labels only), ``kd`` from the normal teacher and ``kd``
from the defended teacher, trained identically on the attacker's data (``probe.train_subset``
labelled images), scored on the test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .. import escape as esc
from ..attacks import run_attack
from ..checkpoint import atomic_write_json
from ..config import train_config
from ..registry import slug
from ..resume import Checkpointing
from ..runs import data_from_config, save_model
from .leakage import HOLDS_BELOW, StudentRuns, best_attack, holds, measure, thief_pool


def run_probe(cfg: dict, data, normal, defended, out: Path, log: Callable[[str], None], ck: Checkpointing = Checkpointing(),
              students: StudentRuns | None = None) -> dict:
    p = cfg["probe"]
    if p["labelled"] is not None:
        return run_leakage_probe(cfg, data, normal, defended, out, log, ck, students)
    pdata = data if p["train_subset"] is None else data_from_config(cfg, normalization=(data.mean, data.std), train_subset=p["train_subset"])
    tcfg = train_config(cfg, p["train"])
    params = {"temperature": p["temperature"], "alpha": p["alpha"]}
    rows = []
    for student in p["students"]:
        accs = {}
        for key, method, teacher in (("scratch", "scratch", None), ("kd_normal", "kd", normal), ("kd_defended", "kd", defended)):
            run_dir = out / slug(student, "") / key
            model, res = run_attack(method, data=pdata, teachers=[teacher] if teacher is not None else [], student=student,
                                    train=tcfg, params=params if method == "kd" else {}, out_dir=run_dir, log=log,
                                    checkpointing=ck)
            save_model(run_dir, model, pdata, cfg, {"test": {k: res[k] for k in ("accuracy", "per_class_accuracy")}})
            atomic_write_json(run_dir / "result.json", res)
            accs[key] = res["accuracy"]
            log(f"[probe] {student} {key}: test accuracy {res['accuracy']:.2f}")
        rows.append({
            "student": student,
            "scratch_accuracy": accs["scratch"],
            "kd_normal_accuracy": accs["kd_normal"],
            "kd_defended_accuracy": accs["kd_defended"],
            "kd_gain_normal": accs["kd_normal"] - accs["scratch"],
            "kd_gain_defended": accs["kd_defended"] - accs["scratch"],
        })
    first = rows[0]
    return {
        "student": first["student"],
        "scratch_accuracy": first["scratch_accuracy"],
        "kd_normal_accuracy": first["kd_normal_accuracy"],
        "kd_defended_accuracy": first["kd_defended_accuracy"],
        "train_images": int(len(pdata.y_train)),
        "students": rows,
    }


def run_leakage_probe(cfg: dict, data, normal, defended, out: Path, log: Callable[[str], None], ck: Checkpointing,
                      students: StudentRuns | None = None) -> dict:
    """The probe in the thief's regime: floors, the normal teacher's KD leakage (the positive control) and every
    probe attack against the defended teacher, over ``probe.seeds`` seeds, scored on the test split."""
    p = cfg["probe"]
    pool, note = thief_pool(cfg, data)
    log(f"[probe] {note}")
    res = measure(cfg, pool, {"normal": normal, "defended": defended}, {"normal": ["kd"], "defended": list(p["attacks"])},
                  seeds=list(range(cfg["train"]["seed"], cfg["train"]["seed"] + p["seeds"])), out=out, log=log, ck=ck, runs=students)
    students = []
    for s in p["students"]:
        name, best = best_attack(res["leakage"]["defended"][s])
        students.append({"student": s, "positive_control": res["leakage"]["normal"][s]["kd"], "best_attack": name, "best": best,
                         "holds": holds(res["leakage"]["defended"][s])})
    return {"regime": {"labelled": res["labelled"], "queries": res["queries"], "pool": note}, "seeds": res["seeds"],
            "leakage": res["leakage"], "floors": res["floors"], "accuracy": res["accuracy"], "failed": res["failed"], "students": students,
            "holds_below": HOLDS_BELOW}


def _leakage_lines(probe: dict) -> list[str]:
    lines = [f"thief: {probe['regime']['labelled']} labelled of {probe['regime']['queries'] or 'all'} images; {esc.term(probe['regime']['pool'])}; "
             f"{len(probe['seeds'])} seeds; leakage = accuracy minus the best floor (labels only, hard-label at label smoothing 0, 0.1, 0.3)"]
    held = 0
    for r in probe["students"]:
        pc, b = r["positive_control"], r["best"]
        control = f"KD from normal {pc['mean']:+.2f} (95% CI {pc['ci_low']:+.2f}..{pc['ci_high']:+.2f})"
        if b is None:
            lines.append(f"student {esc.term(r['student'])}: {control}; no attack on the defended teacher could be scored")
            continue
        verdict = {True: "defense holds", False: "defense does NOT hold", None: "cannot tell (too few seeds)"}[r["holds"]]
        held += r["holds"] is True
        lines.append(f"student {esc.term(r['student'])}: {control}; best attack on defended: {r['best_attack']} {b['mean']:+.2f} "
                     f"(95% upper bound {b['ci_high']:+.2f}) -> {verdict}")
        if pc["n"] and pc["mean"] < 3.0:
            lines.append(f"  note: the normal teacher leaks only {pc['mean']:+.2f} points to this thief: little for a defense to "
                         "take away here (a positive control needs >= 3)")
    lines.append(f"verdict: the best honest attack's 95% upper bound is <= {probe['holds_below']:g} point for {held} of "
                 f"{len(probe['students'])} probe students")
    if probe["failed"]:
        lines.append(f"warning: {len(probe['failed'])} probe runs failed (diverged) and are not scored; first: {esc.term(probe['failed'][0])}")
    return lines


UTILITY_ROWS = (("defended", "defended_quality"), ("normal", "normal_quality"), ("labels only", "labels_only_quality"))


def utility_line(result: dict) -> str | None:
    """One line of served utility on the test split: ECE and top-5 of the defended teacher vs the normal one vs
    labels only (``None`` for a result without these rows)."""
    rows = [(name, result[k]) for name, k in UTILITY_ROWS if isinstance(result.get(k), dict)]
    if not rows:
        return None
    return ("served utility (test): ECE " + ", ".join(f"{name} {q['ece']:.2f}%" for name, q in rows)
            + "; top-5 " + ", ".join(f"{name} {q['top5']:.2f}%" for name, q in rows))


def verdict_text(result: dict) -> str:
    lock = result.get("lock", "none")
    served = "" if lock in (None, "none") else f" (served; decisions locked to the normal model, {lock}, omega {result['omega']:g})"
    lines = [f"teacher accuracy: normal {result['normal_accuracy']:.2f}%, defended {result['defended_accuracy']:.2f}%{served} "
             f"({-result['accuracy_drop']:+.2f} points)"]
    utility = utility_line(result)
    if utility:
        lines.append(utility)
    probe = result.get("probe")
    if probe and "leakage" in probe:
        lines += _leakage_lines(probe)
        if lock not in (None, "none"):
            lines.append("note: the locked artifact contains the normal model; it defends black-box serving, not its own weights")
    elif probe:
        held = 0
        for r in probe["students"]:
            ok = r["kd_defended_accuracy"] < r["scratch_accuracy"]
            held += ok
            lines.append(f"student {esc.term(r['student'])}: scratch {r['scratch_accuracy']:.2f}, KD from normal {r['kd_normal_accuracy']:.2f} "
                         f"({r['kd_gain_normal']:+.2f}), KD from defended {r['kd_defended_accuracy']:.2f} ({r['kd_gain_defended']:+.2f}) -> "
                         + ("defense holds (KD worse than labels alone)" if ok else "defense does NOT hold (KD helps the thief)"))
        lines.append(f"verdict: KD from the defended teacher is worse than labels alone for {held} of {len(probe['students'])} probe students")
        if result["accuracy_drop"] > 1.0:
            lines.append(f"warning: the defended teacher lost {result['accuracy_drop']:.2f} points of accuracy; a defense that "
                         "ruins the teacher protects nothing worth stealing (lock the decisions with --lock two-head, lower --omega "
                         "or fine-tune with --init-from)")
        if lock not in (None, "none"):
            lines.append("note: the locked artifact contains the normal model; it defends black-box serving, not its own weights")
    else:
        lines.append("verdict: probe skipped (--no-probe); the defense is untested")
    return "\n".join(lines)
