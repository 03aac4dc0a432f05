"""Leakage in the thief's regime: what the best honest attack gains over the floors a decision-keeping
defense leaves, per student, over several seeds.

A thief holds ``labelled`` labelled images and ``queries - labelled`` unlabelled ones
(:func:`nasty.attacks.run.thief_view`), drawn from training images the teacher never saw when the
teacher trained on a ``train_subset`` (the rest of the training split is the thief's pool). Its floors
(:data:`FLOORS`): labels alone (``scratch``, ``label-smoothing``) and hard-label extraction (``hard-label``:
its labels plus the teacher's top-1 on the queries) at each label smoothing of its grid, 0, 0.1 and 0.3,
every one trained (not chosen on the thief's validation split of a few images: the floor is the best
decision-only thief of the family, and a thief reading the served confidence must beat every one). Each
attack tunes its settings (alpha, T, ...) and its epoch on the thief's own validation split (``tune``).
Leakage of an attack = its accuracy minus the best floor of the same seed and student; a student that
diverged is an instrument failure, listed and never scored.

Used by the probe of ``train-defended`` (scored on the test split) and by the choice of the strength
(scored on images the owner held out; its students also predict the test images, whose labels it never
reads, so that the probe can reuse them: :class:`StudentRuns`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..attacks import get_attack, run_attack
from ..attacks.hardlabel import TUNE_SMOOTHING, variant
from ..config import train_config
from ..errors import TrainingDiverged
from ..frozen import TeacherOutputCache
from ..metrics import accuracy as acc, predict_logits
from ..models.locked import LockedTeacher
from ..registry import slug
from ..resume import Checkpointing
from ..runs import data_from_config
from ..workers import default_jobs, run_tasks

# name -> (method, its fixed settings): every floor trains for every student and seed; the best one of a seed is the floor
FLOORS: dict[str, tuple[str, dict]] = {"scratch": ("scratch", {}), "label-smoothing": ("label-smoothing", {}),
                                       **{variant(ls): ("hard-label", {"label_smoothing": ls}) for ls in TUNE_SMOOTHING}}
HOLDS_BELOW = 1.0  # points: a defense holds when the best honest attack's 95% upper bound of leakage is at most this


def t975(df: int) -> float:
    """The two-sided 95% t quantile (scipy, as the audit's statistics)."""
    from scipy import stats as st  # scipy comes with scikit-learn; imported where used, as in nasty.audit.stats

    return float(st.t.ppf(0.975, df))


def interval(values: list[float]) -> dict:
    """Mean, sd and the two-sided 95% t-interval over seeds (the seed is the unit)."""
    n = len(values)
    mean = statistics.fmean(values) if values else math.nan
    sd = statistics.stdev(values) if n > 1 else math.nan
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "sd": sd, "n": n, "ci_low": mean - half, "ci_high": mean + half, "values": values}


def thief_pool(cfg: dict, data) -> tuple[object, str]:
    """The images a thief draws from: the training images the teacher never saw when it trained on a
    ``train_subset`` (normalised as the teacher's inputs), else its own training split."""
    k = cfg["data"]["train_subset"]
    if k is None:
        return data, "the thief's images overlap the teacher's training images (set [data] train_subset to keep them apart)"
    pool = data_from_config(cfg, normalization=(data.mean, data.std), train_subset=None, exclude_subset=k)
    return pool, f"the thief draws from the {len(pool.y_train)} training images the teacher never saw"


def same_decisions(model: nn.Module) -> bool:
    """A locked teacher decides exactly as the normal model it contains: its hard-label floor is the normal one's."""
    return isinstance(model, LockedTeacher)


def fingerprint(obj) -> str:
    """A content hash of a model's weights (its class and state) or of a tensor: what a trained student depends on."""
    h = hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        h.update(f"{tuple(obj.shape)}{obj.dtype}".encode())
        h.update(obj.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]
    h.update(type(obj).__name__.encode())
    for k, v in sorted(obj.state_dict().items()):
        h.update(k.encode())
        h.update(fingerprint(v).encode())
    return h.hexdigest()[:16]


class StudentRuns:
    """Probe students already trained in this process, by everything their training depends on (method,
    student, seed, thief regime, training settings, the teacher's weights; for the hard-label floor only
    the teacher's decisions), with their predictions on named image sets. The strength's choice and the
    probe train the same students (the floors; the chosen strength's attacks): the probe reuses them."""

    def __init__(self) -> None:
        self.runs: dict[str, dict] = {}

    def get(self, key: str, images: str) -> dict | None:
        """The run ``key`` if it failed or predicted the image set of fingerprint ``images``."""
        r = self.runs.get(key)
        return r if r is not None and (r["failed"] or images in r["preds"]) else None


def _teacher_key(method: str, teacher: nn.Module | None) -> str:
    if teacher is None:
        return "-"
    if get_attack(method).floor and isinstance(teacher, LockedTeacher):
        return "decisions:" + fingerprint(teacher.decision)  # a locked teacher decides exactly as its decision model
    if get_attack(method).floor:
        return "decisions:" + fingerprint(teacher)
    return fingerprint(teacher)


def measure(cfg: dict, pool, targets: dict[str, nn.Module], attacks: dict[str, list[str]], *, score_on=None, seeds: list[int],
            out: Path | None, log: Callable[[str], None], ck: Checkpointing = Checkpointing(),
            runs: StudentRuns | None = None, also: dict[str, torch.Tensor] | None = None) -> dict:
    """Train the floors and ``attacks[target]`` against each of ``targets`` for every probe student and
    seed; return every accuracy and, per target, attack and student, the leakage interval.
    ``score_on``: ``(x, y)`` to score on instead of the test split (the strength's choice: validation).
    ``runs``: students trained before (reused when everything they depend on matches; new ones are added).
    ``also``: more named image sets each new student predicts (kept in ``runs`` for a later call; never
    scored here). The students train in ``probe.jobs`` worker processes (:mod:`nasty.workers`)."""
    p = cfg["probe"]
    n, m = p["labelled"], p["queries"]
    data = pool if score_on is None else dataclasses.replace(pool, x_test=score_on[0], y_test=score_on[1])
    runs = StudentRuns() if runs is None else runs
    images = {"score": data.x_test, **(also or {})}
    sets = {name: fingerprint(x) for name, x in images.items()}
    base = f"{n}/{m}/{fingerprint(pool.x_train)}/{fingerprint(pool.y_train)}"
    cache = TeacherOutputCache()

    def job_key(name: str, target: str | None, student: str, seed: int) -> str:
        tcfg = train_config(cfg, p["train"], seed=seed)
        method, fixed = FLOORS.get(name, (name, {}))
        return "/".join([name, json.dumps(fixed, sort_keys=True), student, str(seed), base,
                         _teacher_key(method, targets[target] if target else None), json.dumps(tcfg.to_dict(), sort_keys=True)])

    first = next(iter(targets))
    plan: dict[str, tuple[str, str | None, str, int]] = {}  # job key -> (floor or attack name, target, student, seed)
    cells = []  # (target, student, seed, floor keys, {attack: key})
    for target, model in targets.items():
        floor_target = first if same_decisions(model) and target != first else target
        for student in p["students"]:
            for seed in seeds:
                jobs = [(f, floor_target if get_attack(m).needs_teacher else None) for f, (m, _) in FLOORS.items()]
                jobs += [(a, target) for a in attacks[target]]
                keys = []
                for name, t in jobs:
                    k = job_key(name, t, student, seed)
                    plan.setdefault(k, (name, t, student, seed))
                    keys.append(k)
                cells.append((target, student, seed, keys[:len(FLOORS)], dict(zip(attacks[target], keys[len(FLOORS):]))))

    def task(name: str, target: str | None, student: str, seed: int):
        def train() -> tuple[dict, dict[str, torch.Tensor]]:
            teacher = targets[target] if target else None
            method, fixed = FLOORS.get(name, (name, None))
            params = fixed if fixed is not None else ({"tune": True} if "tune" in get_attack(method).params else {})
            run_dir = None if out is None else out / slug(student, "") / f"seed-{seed}" / f"{target or 'labels'}-{slug(name, '')}"
            try:
                model, r = run_attack(method, data=data, teachers=[teacher] if teacher is not None else [], student=student,
                                      train=train_config(cfg, p["train"], seed=seed), params=params, labelled=n, query_budget=m,
                                      teacher_cache=cache, out_dir=run_dir, log=log, checkpointing=ck)
            except TrainingDiverged as e:
                return {"failed": str(e).splitlines()[0]}, {}
            preds = {sets[name]: predict_logits(model, x).argmax(1) for name, x in images.items()}
            return {"failed": None, "tuned": r.get("tuned")}, preds
        return train

    todo = [k for k in plan if runs.get(k, sets["score"]) is None]
    reused = len(plan) - len(todo)
    if reused:
        log(f"[probe] {reused} of {len(plan)} students reused (trained earlier in this run with the same data, teacher and seed)")
    for k, (header, preds) in zip(todo, run_tasks([task(*plan[k]) for k in todo], jobs=p["jobs"] or default_jobs())):
        runs.runs[k] = {"failed": header["failed"], "tuned": header.get("tuned"), "preds": preds}
    accuracy: dict[str, float | None] = {}
    failed: list[str] = []
    for k, (method, target, student, seed) in plan.items():
        r = runs.runs[k]
        name = f"{student}/{seed}/{target or '-'}/{method}"
        if r["failed"]:
            failed.append(f"{name}: {r['failed']}")
            log(f"[probe] {name} FAILED (not scored): {r['failed']}")
            accuracy[name] = None
            continue
        accuracy[name] = acc(r["preds"][sets["score"]], data.y_test)
        log(f"[probe] {name}: {accuracy[name]:.2f}" + (f" (tuned {r['tuned']})" if r.get("tuned") else ""))
    score = {k: accuracy[f"{st}/{sd}/{t or '-'}/{mt}"] for k, (mt, t, st, sd) in plan.items()}
    summary: dict = {}
    floor_acc: dict = {}  # target -> student -> floor -> accuracies over seeds (which floor is the best, and by how much)
    for target, student, seed, floor_keys, attack_keys in cells:
        leak = summary.setdefault(target, {}).setdefault(student, {a: [] for a in attacks[target]})
        floors = [score[k] for k in floor_keys]
        if any(f is None for f in floors):
            continue
        for f, v in zip(FLOORS, floors):
            floor_acc.setdefault(target, {}).setdefault(student, {}).setdefault(f, []).append(v)
        for a, k in attack_keys.items():
            if score[k] is not None:
                leak[a].append(score[k] - max(floors))
    summary = {t: {s: {a: interval(v) for a, v in per.items()} for s, per in st.items()} for t, st in summary.items()}
    floor_acc = {t: {s: {f: interval(v) for f, v in per.items()} for s, per in st.items()} for t, st in floor_acc.items()}
    return {"labelled": n, "queries": m, "seeds": seeds, "accuracy": accuracy, "failed": failed, "leakage": summary,
            "floors": floor_acc}


def best_attack(per_attack: dict[str, dict]) -> tuple[str | None, dict | None]:
    """The attack with the highest mean leakage (the strongest honest thief) and its interval."""
    scored = [(a, s) for a, s in per_attack.items() if s["n"]]
    if not scored:
        return None, None
    return max(scored, key=lambda kv: kv[1]["mean"])


def holds(per_attack: dict[str, dict]) -> bool | None:
    """``True`` when the best attack's 95% upper bound is at most :data:`HOLDS_BELOW`; ``None`` when it cannot be
    told (no attack scored, or a single seed)."""
    name, s = best_attack(per_attack)
    if s is None or s["n"] < 2:
        return None
    return s["ci_high"] <= HOLDS_BELOW
