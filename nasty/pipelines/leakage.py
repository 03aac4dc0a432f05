"""Leakage in the thief's regime: what the best honest attack gains over the floors a decision-keeping
defense leaves, per student, over several seeds.

A thief holds ``labelled`` labelled images and ``queries - labelled`` unlabelled ones
(:func:`nasty.attacks.run.thief_view`), drawn from training images the teacher never saw when the
teacher trained on a ``train_subset`` (the rest of the training split is the thief's pool). Its floors:
labels alone (``scratch``, ``label-smoothing``) and hard-label extraction (``hard-label``: its labels
plus the teacher's top-1 on the queries, its label smoothing tuned from 0.3). Each attack tunes its
settings (alpha, T, ...) and its epoch on the thief's own validation split (``tune``). Leakage of an attack = its accuracy minus the better floor of the same
seed and student; a student that diverged is an instrument failure, listed and never scored.

Used by the probe of ``train-defended`` (scored on the test split) and by the choice of the strength
(scored on the teacher's validation split: the test split is never read there).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Callable

import torch.nn as nn

from ..attacks import get_attack, run_attack
from ..config import train_config
from ..errors import TrainingDiverged
from ..frozen import TeacherOutputCache
from ..models.locked import LockedTeacher
from ..registry import slug
from ..resume import Checkpointing
from ..runs import data_from_config

FLOORS = ("scratch", "label-smoothing", "hard-label")
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


def measure(cfg: dict, pool, targets: dict[str, nn.Module], attacks: dict[str, list[str]], *, score_on=None, seeds: list[int],
            out: Path | None, log: Callable[[str], None], ck: Checkpointing = Checkpointing()) -> dict:
    """Train the floors and ``attacks[target]`` against each of ``targets`` for every probe student and
    seed; return every accuracy and, per target, attack and student, the leakage interval.
    ``score_on``: ``(x, y)`` to score on instead of the test split (the strength's choice: validation)."""
    p = cfg["probe"]
    n, m = p["labelled"], p["queries"]
    data = pool if score_on is None else dataclasses.replace(pool, x_test=score_on[0], y_test=score_on[1])
    cache = TeacherOutputCache()
    runs: dict[str, float] = {}
    failed: list[str] = []

    def run(method: str, target: str | None, student: str, seed: int) -> float | None:
        key = f"{student}/{seed}/{target or '-'}/{method}"
        if key in runs:
            return runs[key]
        teacher = targets[target] if target else None
        cls = get_attack(method)
        params = {**(cls.floor_params if cls.floor else {}), **({"tune": True} if "tune" in cls.params else {})}
        run_dir = None if out is None else out / slug(student, "") / f"seed-{seed}" / f"{target or 'labels'}-{method}"
        try:
            _, r = run_attack(method, data=data, teachers=[teacher] if teacher is not None else [], student=student,
                              train=train_config(cfg, p["train"], seed=seed), params=params, labelled=n, query_budget=m,
                              teacher_cache=cache, out_dir=run_dir, log=log, checkpointing=ck)
        except TrainingDiverged as e:
            failed.append(f"{key}: {str(e).splitlines()[0]}")
            log(f"[probe] {key} FAILED (not scored): {str(e).splitlines()[0]}")
            runs[key] = None
            return None
        runs[key] = r["accuracy"]
        log(f"[probe] {key}: {r['accuracy']:.2f}" + (f" (tuned {r['tuned']})" if "tuned" in r else ""))
        return r["accuracy"]

    first = next(iter(targets))
    summary: dict = {}
    for target, model in targets.items():
        for student in p["students"]:
            leak: dict[str, list[float]] = {a: [] for a in attacks[target]}
            for seed in seeds:
                floor_target = first if same_decisions(model) and target != first else target
                floors = [run("scratch", None, student, seed), run("label-smoothing", None, student, seed),
                          run("hard-label", floor_target, student, seed)]
                if any(f is None for f in floors):
                    continue
                best_floor = max(floors)
                for a in attacks[target]:
                    acc = run(a, target, student, seed)
                    if acc is not None:
                        leak[a].append(acc - best_floor)
            summary.setdefault(target, {})[student] = {a: interval(v) for a, v in leak.items()}
    return {"labelled": n, "queries": m, "seeds": seeds, "accuracy": runs, "failed": failed, "leakage": summary}


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
