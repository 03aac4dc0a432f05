"""Synthetic audits for calibrating :mod:`nasty.audit.stats` (no training): correctness matrices of an
attack, the two baselines and a teacher drawn from a model with realistic structure, then decided
exactly as ``nasty audit`` decides them.

Per class ``c``, arm ``m`` (attack, scratch, label-smoothing), seed ``s`` and test image ``i``::

    P(correct) = sigmoid(mu_c + item_i + arm_item_mi + seed_ms + noise_msi)

``item_i`` (difficulty, shared by every arm and seed), ``arm_item_mi`` (which images one method
gets right: a per-image gain that averages to zero), ``seed_ms`` (a training seed moves a whole
class, e.g. two confusable classes trade accuracy), ``noise_msi`` (image-level training noise),
all normal with standard deviations ``sd_item``, ``sd_arm_item``, ``sd_seed``, ``sd_noise``. The
arms are identically distributed, so the true gain is zero; an arm is then shifted by ``g`` points
of population accuracy exactly: with ``g > 0`` each wrong answer turns right with probability
``g / (100 (1 - E p))``, with ``g < 0`` each right answer turns wrong with probability
``-g / (100 E p)``. The test images of every replicate are new draws, so intervals are checked
against the population gain (over training seeds and the test distribution), the audit's estimand.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from . import stats

ARMS = ("attack", "scratch", "label-smoothing")


@dataclass
class Model:
    classes: int = 10
    n_per_class: int = 1000
    seeds: int = 5
    students: int = 2
    accuracy: tuple[float, ...] = (0.80, 0.97, 0.75, 0.87, 0.78, 0.93, 0.60, 0.94, 0.96, 0.94)  # Fashion-MNIST-like
    sd_item: float = 2.0
    sd_arm_item: float = 0.6
    sd_seed: float = 0.2
    sd_noise: float = 0.5
    shift: dict = field(default_factory=dict)  # (arm, class) -> points of population accuracy
    teacher_accuracy: float = 0.9

    def class_accuracy(self, c: int) -> float:
        return self.accuracy[c % len(self.accuracy)]


_MEAN_CACHE: dict = {}


def _mu_and_mean(m: Model, c: int) -> tuple[float, float]:
    """The logit centre giving class accuracy ``m.class_accuracy(c)`` and the population mean it has."""
    key = (m.class_accuracy(c), m.sd_item, m.sd_arm_item, m.sd_seed, m.sd_noise)
    if key not in _MEAN_CACHE:
        x, w = np.polynomial.hermite.hermgauss(96)  # E[sigmoid(mu + sd Z)] by Gauss-Hermite quadrature
        sd = float(np.sqrt(m.sd_item ** 2 + m.sd_arm_item ** 2 + m.sd_seed ** 2 + m.sd_noise ** 2))
        target = m.class_accuracy(c)
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if float(w @ (1 / (1 + np.exp(-(mid + sd * np.sqrt(2) * x))))) / np.sqrt(np.pi) < target:
                lo = mid
            else:
                hi = mid
        _MEAN_CACHE[key] = ((lo + hi) / 2, target)
    return _MEAN_CACHE[key]


def draw(m: Model, rng: np.random.Generator, arms: tuple[str, ...] = ARMS) -> tuple[np.ndarray, list[dict[str, np.ndarray]], np.ndarray]:
    """One synthetic audit: test labels ``y``, per student ``{arm: (S, N) correctness}``, teacher ``(N,)``."""
    C, n, S = m.classes, m.n_per_class, m.seeds
    y = np.repeat(np.arange(C), n)
    mu = np.repeat([_mu_and_mean(m, c)[0] for c in range(C)], n)
    pbar = np.repeat([_mu_and_mean(m, c)[1] for c in range(C)], n)
    item = rng.standard_normal(C * n) * m.sd_item
    teacher = (rng.random(C * n) < m.teacher_accuracy).astype(np.uint8)
    out = []
    for _ in range(m.students):
        drawn = {}
        for arm in arms:
            seed_eff = np.repeat(rng.standard_normal((S, C)) * m.sd_seed, n, axis=1)
            logit = mu + item + rng.standard_normal(C * n) * m.sd_arm_item + seed_eff + rng.standard_normal((S, C * n)) * m.sd_noise
            correct = rng.random((S, C * n)) < 1 / (1 + np.exp(-logit))
            for c in range(C):
                g = m.shift.get((arm, c), 0.0)
                if g:
                    sl = slice(c * n, (c + 1) * n)
                    if g > 0:
                        flip = rng.random((S, n)) < g / (100 * (1 - pbar[c * n]))
                        correct[:, sl] |= flip
                    else:
                        flip = rng.random((S, n)) < -g / (100 * pbar[c * n])
                        correct[:, sl] &= ~flip
            drawn[arm] = correct.astype(np.uint8)
        out.append(drawn)
    return y, out, teacher


def true_gain(m: Model, c: int) -> float:
    """Population gain of the attack over the better baseline on class ``c`` (points)."""
    return m.shift.get(("attack", c), 0.0) - max(m.shift.get((b, c), 0.0) for b in stats.BASELINES)


def audit_once(m: Model, rng: np.random.Generator, *, correction: str = "holm", margin: float = 0.0, power: float = 0.8,
               rule: str = "gain", fidelity: float = 0.9, detectable: bool = True) -> list[list[dict]]:
    """Decide one synthetic audit of one attack exactly as ``nasty audit`` does: per-class rows per student."""
    y, studs, teacher = draw(m, rng)
    fams = [stats.class_decisions(y, a["attack"], {b: a[b] for b in stats.BASELINES}, teacher, num_classes=m.classes,
                                  rule=rule, margin=margin, fidelity=fidelity, correction=correction, power=power, decide=False)
            for a in studs]
    stats.decide_family(fams, rule=rule, correction=correction, margin=margin, fidelity=fidelity, power=power,
                        detectable=detectable)
    return fams


def calibrate(m: Model, reps: int, seed: int = 0, **kw) -> dict:
    """Run ``reps`` synthetic audits; return the family-wise false-transferred rate (classes whose true gain is
    <= the margin), per-class detection rate of the others, interval coverage of the true gain (lower end and
    both ends) and the mean claimed power and detectable gain."""
    rng = np.random.default_rng(seed)
    margin = kw.get("margin", 0.0)
    power = kw.get("power", 0.8)
    correction = kw.get("correction", "holm")
    fw, detect, cover_lo, cover, claimed, det_gain = [], [], [], [], [], []
    for _ in range(reps):
        fams = audit_once(m, rng, **kw)
        mfam = sum(r["p_value"] is not None for f in fams for r in f)
        a_star = stats.per_test_alpha(correction, mfam)
        false = False
        for fam in fams:
            for r in fam:
                g = true_gain(m, r["class"])
                if g <= margin:
                    false |= r["transferred"]
                    if r["detectable"] is not None:
                        det_gain.append(r["detectable"])
                else:
                    detect.append(r["transferred"])
                    # the power the report would claim for this gain, from the class's own se and df
                    pp = stats.power_parts(r)
                    claimed.append(float(stats.iut_power(g - margin, pp, a_star)))
                if r["gain_ci"][0] is not None:
                    cover_lo.append(r["gain_ci"][0] <= g)
                    cover.append(r["gain_ci"][0] <= g <= r["gain_ci"][1])
        fw.append(false)
    return {"reps": reps, "false_rate": float(np.mean(fw)), "detection": float(np.mean(detect)) if detect else None,
            "claimed_power": float(np.mean(claimed)) if claimed else None,
            "coverage_lower": float(np.mean(cover_lo)), "coverage": float(np.mean(cover)),
            "detectable_median": float(np.median(det_gain)) if det_gain else None}


def null_attacks(m: Model, rng: np.random.Generator, n_attacks: int, *, margin: float = 0.0) -> list[dict]:
    """One synthetic audit of ``n_attacks`` attacks sharing the two baselines (arms ``attack0``, ``attack1``, ...;
    plant gains with ``m.shift[("attackK", c)]``): per attack ``{"rule", "students": {st: {"classes", "pooled"}}}``,
    the rows not yet decided, as :func:`stats.decide_audit` takes them."""
    arms = ("scratch", "label-smoothing", *(f"attack{k}" for k in range(n_attacks)))
    y, studs, teacher = draw(m, rng, arms)
    attacks = []
    for k in range(n_attacks):
        per = {}
        for j, a in enumerate(studs):
            base = {b: a[b] for b in stats.BASELINES}
            per[f"s{j}"] = {"classes": stats.class_decisions(y, a[f"attack{k}"], base, teacher, num_classes=m.classes,
                                                              margin=margin, decide=False),
                            "pooled": stats.pooled_test(a[f"attack{k}"], base, teacher, margin=margin)}
        attacks.append({"rule": "gain", "students": per})
    return attacks


def gate_fails(attacks: list[dict], *, scheme: str = "audit", correction: str = "holm", margin: float = 0.0) -> bool:
    """Decide the rows of :func:`null_attacks` (a copy) and say whether the gate ``--fail-on 0`` fails (any
    transferred class, or a pooled transfer). ``scheme="audit"``: one family over every test, as ``nasty audit``
    decides (:func:`stats.decide_audit`); ``"per-attack"``: the correction of schema 2, per attack over its
    classes only (no pooled test), kept to show what the joint family fixes."""
    attacks = copy.deepcopy(attacks)
    if scheme == "audit":
        stats.decide_audit(attacks, correction=correction, margin=margin, detectable=False)
    elif scheme == "per-attack":
        for att in attacks:
            for st in att["students"].values():
                st.pop("pooled")
            stats.decide_family([st["classes"] for st in att["students"].values()], rule="gain", correction=correction,
                                margin=margin, detectable=False)
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    return any(r["transferred"] for att in attacks for st in att["students"].values()
               for r in [*st["classes"], *([st["pooled"]] if st.get("pooled") else [])])
