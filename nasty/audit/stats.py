"""Per-class decision rules of the audit and their paired bootstrap confidence intervals.

Inputs are *correctness matrices* on the test split: ``A[s, i] = 1`` when the student trained with
seed ``s`` classifies test sample ``i`` correctly. Every arm of a comparison (the attack's students,
the label-only and label-smoothing baselines) was trained with the same seeds and is scored on the
same test samples, so the comparison is *paired*.

Gain rule (attacks that use the ground-truth labels)
    ``g_c = acc(a, c) - max(acc(scratch, c), acc(label-smoothing, c))`` in percentage points, where
    ``acc(m, c)`` is the accuracy on test class ``c`` averaged over seeds. The baseline is the better
    of the two label-only students *for that class* (the report states which). Class ``c`` is
    **transferred** when the lower end of the 95% interval of ``g_c`` is above ``margin``.

Fidelity rule (attacks that never read the labels: ``copycat``, ``knockoff``)
    ``r_c = acc(a, c) / acc(teacher, c)``; transferred when the lower end of its 95% interval is at
    least ``fidelity`` (default 0.9). A class the teacher never gets right has no ratio (``None``)
    and is not transferred.

Interval: a two-level paired bootstrap. Each of ``n_boot`` replicates draws the seeds with
replacement (``S`` of ``S``) and, independently, the test samples of class ``c`` with replacement
(``n_c`` of ``n_c``); the *same* draw is applied to every arm (attack, both baselines, teacher),
and the statistic -- including the choice of the better baseline -- is recomputed on the
replicate. The interval is the 2.5th to 97.5th percentile of the replicates. Resampling seeds
captures training noise, resampling test samples captures the finite test set; with one seed only
the latter is captured (the report says so). The bootstrap generator is seeded, so the numbers are
reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import NastyError

BASELINES = ("scratch", "label-smoothing")


@dataclass
class Resample:
    """One bootstrap draw shared by every arm: seed indices ``(B, S)`` and per-sample counts ``(B, n_c)``."""

    seeds: np.ndarray
    counts: np.ndarray


def draw(n_seeds: int, n_samples: int, n_boot: int, rng: np.random.Generator) -> Resample:
    if n_seeds < 1 or n_samples < 1 or n_boot < 1:
        raise NastyError(f"bootstrap needs at least one seed, sample and replicate (got {n_seeds}, {n_samples}, {n_boot})")
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    counts = rng.multinomial(n_samples, np.full(n_samples, 1.0 / n_samples), size=n_boot)
    return Resample(seeds, counts)


def replicate_accuracy(correct: np.ndarray, r: Resample) -> np.ndarray:
    """Accuracy (percent) of each bootstrap replicate: ``correct`` is ``(S, n_c)`` or ``(n_c,)`` (no seeds)."""
    correct = np.asarray(correct, dtype=np.float64)
    n = r.counts.shape[1]
    if correct.ndim == 1:
        return 100.0 * (r.counts @ correct) / n
    per_seed = 100.0 * (r.counts @ correct.T) / n  # (B, S): every seed scored on the replicate's samples
    return np.take_along_axis(per_seed, r.seeds, axis=1).mean(1)


def _interval(values: np.ndarray, level: float) -> tuple[float | None, float | None]:
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return None, None
    lo, hi = np.percentile(v, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _check(name: str, a: np.ndarray, n_seeds: int | None, n: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[1] != n or (n_seeds is not None and a.shape[0] != n_seeds):
        raise NastyError(f"{name}: expected a (seeds, {n}) correctness matrix, got shape {a.shape}")
    return a


def class_decisions(
    y: np.ndarray,
    attack: np.ndarray,
    baselines: dict[str, np.ndarray],
    teacher: np.ndarray,
    *,
    num_classes: int,
    rule: str = "gain",
    margin: float = 0.0,
    fidelity: float = 0.9,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """Per-class gain and fidelity with paired bootstrap intervals, and the decision under ``rule``.

    ``attack`` and each ``baselines[name]`` are ``(S, N)`` 0/1 correctness matrices with the same seeds
    in the same order; ``teacher`` is ``(N,)``; ``y`` the ``N`` test labels. Returns one dict per class:
    ``accuracy``, ``baseline`` (which was better), ``baseline_accuracy``, ``gain`` and ``gain_ci``,
    ``teacher_accuracy``, ``fidelity`` and ``fidelity_ci``, ``transferred``, ``n``.
    """
    if rule not in ("gain", "fidelity"):
        raise NastyError(f"unknown decision rule {rule!r} (gain or fidelity)")
    if not 0 < fidelity <= 10:
        raise NastyError(f"fidelity must be a positive fraction of the teacher's accuracy, got {fidelity}")
    if n_boot < 100:
        raise NastyError(f"use at least 100 bootstrap replicates, got {n_boot}")
    y = np.asarray(y)
    n = len(y)
    attack = _check("attack", attack, None, n)
    n_seeds = attack.shape[0]
    names = [b for b in BASELINES if b in baselines] or sorted(baselines)
    if not names:
        raise NastyError("the gain rule needs at least one baseline")
    base = {b: _check(b, baselines[b], n_seeds, n) for b in names}
    teacher = np.asarray(teacher)
    if teacher.shape != (n,):
        raise NastyError(f"teacher: expected ({n},) correctness, got {teacher.shape}")
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        if len(idx) == 0:
            rows.append({"class": c, "n": 0, "accuracy": None, "baseline": None, "baseline_accuracy": None, "gain": None,
                         "gain_ci": [None, None], "teacher_accuracy": None, "fidelity": None, "fidelity_ci": [None, None],
                         "transferred": False})
            continue
        r = draw(n_seeds, len(idx), n_boot, rng)
        acc_a = 100.0 * attack[:, idx].mean()
        base_acc = {b: 100.0 * m[:, idx].mean() for b, m in base.items()}
        best = max(names, key=lambda b: (base_acc[b], -names.index(b)))
        t_acc = 100.0 * teacher[idx].mean()
        rep_a = replicate_accuracy(attack[:, idx], r)
        rep_b = np.max(np.stack([replicate_accuracy(m[:, idx], r) for m in base.values()]), axis=0)
        rep_t = replicate_accuracy(teacher[idx], r)
        gain = acc_a - base_acc[best]
        gain_ci = _interval(rep_a - rep_b, level)
        with np.errstate(divide="ignore", invalid="ignore"):
            rep_f = np.where(rep_t > 0, rep_a / np.where(rep_t > 0, rep_t, 1.0), np.nan)
        fid = acc_a / t_acc if t_acc > 0 else None
        fid_ci = _interval(rep_f, level) if fid is not None else (None, None)
        if rule == "gain":
            transferred = gain_ci[0] is not None and gain_ci[0] > margin
        else:
            transferred = fid_ci[0] is not None and fid_ci[0] >= fidelity
        rows.append({
            "class": c,
            "n": int(len(idx)),
            "accuracy": float(acc_a),
            "baseline": best,
            "baseline_accuracy": float(base_acc[best]),
            "baseline_accuracies": {b: float(v) for b, v in base_acc.items()},
            "gain": float(gain),
            "gain_ci": list(gain_ci),
            "teacher_accuracy": float(t_acc),
            "fidelity": None if fid is None else float(fid),
            "fidelity_ci": list(fid_ci),
            "transferred": bool(transferred),
        })
    return rows


def correctness(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """0/1 matrix ``pred == y`` (``pred`` is ``(S, N)`` or ``(N,)``)."""
    return (np.asarray(pred) == np.asarray(y)).astype(np.uint8)
