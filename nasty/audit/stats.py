"""Per-class decision rules of the audit: intervals, one-sided tests, multiple-comparison control
and the smallest gain the audit could have detected.

Inputs are *correctness matrices* on the test split: ``A[s, i] = 1`` when the student trained with
seed ``s`` classifies test sample ``i`` correctly. Every arm of a comparison (the attack's students,
the label-only and label-smoothing baselines) was trained with the same seeds and is scored on the
same test samples, so the comparison is *paired*, and the design is *crossed*: seeds x test samples.

Statistic
    Gain rule (attacks that use the ground-truth labels): ``g_c = acc(a, c) - max_k acc(b_k, c)`` in
    percentage points, ``acc`` averaged over seeds and the test samples of class ``c``; ``b_k`` are the
    label-only (``scratch``) and ``label-smoothing`` students. Fidelity rule (attacks that never read
    labels): ``r_c = acc(a, c) / acc(teacher, c)``.

Variance of a mean over seeds and test samples (the seed is the unit of replication)
    For one comparison let ``D[s, i] = a[s, i] - b[s, i]`` (``S`` seeds x ``n`` test samples of the
    class; for the fidelity rule ``D[s, i] = a[s, i] - f * t[i]``). The two-way crossed random-effects
    model ``D[s, i] = mu + seed_s + item_i + e_si`` (as in multi-reader multi-case studies, seeds
    playing the readers) gives ``Var(mean D) = s2_seed / S + s2_item / n + s2_e / (S n)``. With the
    ANOVA mean squares ``MS_S = n * var_s(row means)`` (df ``S-1``), ``MS_I = S * var_i(column means)``
    (df ``n-1``) and ``MS_E`` (residual, df ``(S-1)(n-1)``), and ``V_X = MS_X / (S n)``::

        V  = V_S + max(V_I - V_E, 0)
        df = V^2 / (V_S^2/(S-1) + V_I^2/(n-1) + V_E^2/((S-1)(n-1)))   if V_I > V_E   (Satterthwaite)
        df = S - 1                                                      otherwise

    ``V_S = var_s(per-seed mean gain) / S`` is exactly what a t-test over the per-seed gains uses (it
    holds the seed-to-seed training noise and the test-sample noise that differs between seeds);
    ``V_I - V_E = s2_item / n`` adds the test-sample variance *shared* by all seeds (the same test
    images are scored every time), which a t-test over per-seed gains misses. The shared component is
    truncated at zero (a variance is not negative). The interval is ``mean D +/- t_{0.975}(df) sqrt(V)``:
    with S - 1 degrees of freedom when the seed term dominates, close to a z-interval when the
    test set dominates. With one seed ``V = var_i(D) / n`` (df ``n-1``): test-sample noise only,
    training noise unseen -- every interval is **unreliable**.

Gain interval and test against two baselines (intersection-union)
    For each baseline ``k``: ``d_k = mean D_k``, ``se_k``, ``df_k`` as above, one-sided
    ``p_k = P(T_{df_k} > (d_k - margin) / se_k)``. The class gain is the smaller of the ``d_k`` (the
    better baseline), and "gain > margin" means "gain > margin over *both* baselines", so
    ``p = max_k p_k`` (an intersection-union test: valid at level alpha without any adjustment, and
    no selection bias from picking the better baseline on the same data). The 95% interval is
    ``[min_k (d_k - t_{0.975,df_k} se_k), min_k (d_k + t_{1-0.025/K,df_k} se_k)]``: the lower end is a
    one-sided 97.5% bound, the upper end Bonferroni over the ``K`` baselines.

Fidelity interval
    ``r +/- t(df) * se(mean(a - r t)) / acc(t)`` (delta method). The test of ``r > f`` uses
    ``D = a - f t`` exactly (Fieller's construction): ``p = P(T_df > mean D / se(mean D))``.

Pooled test
    Per attack and student, the same test with every test image as one class (:func:`pooled_test`):
    the overall gain over the better baseline (fidelity rule: overall fidelity), which finds a gain
    spread thinly over all classes.

Multiple comparisons
    Every per-class and pooled test of every attack against one target is one family of ``m`` tests
    (:func:`decide_audit`; the gate reads all of them). The pooled tests share a weight of
    :data:`POOLED_SHARE`, the class tests the rest. ``holm`` (default; weighted Holm) controls the
    family-wise error rate over the whole audit, ``bh`` (weighted Benjamini-Hochberg) the false
    discovery rate, ``none`` tests each at ``alpha`` (what the lower end of the 95% interval shows).
    A test is **transferred** when its adjusted p-value is below ``alpha = 0.025`` (one-sided; with
    ``none`` this is exactly "the lower 95% bound is above the margin").

Detectable gain (power)
    For a class that is not transferred: the smallest gain over the better baseline that the
    audit would call transferred with probability ``power`` (default 0.8), given the class's
    ``se`` and ``df`` (the noncentral t: ``P(T_{df, delta/se} > t_{1-alpha*, df}) = power``, solved
    for ``delta``; ``detectable = margin + delta``). ``alpha* = alpha * w`` (the test's weight, the
    weights summing to 1) for ``holm`` and ``bh`` (the strictest step: the only true effect of the
    family) and ``alpha`` for ``none``. With
    two baselines the class must clear both: the power is the product of the two comparisons'
    powers (a lower bound, as both share the attack's students), the weaker baseline starting
    ``h = d_k - g`` points behind, credited only beyond two standard errors of the baselines'
    difference (a tied baseline's lead is noise). The class is **safe at this power** when the
    detectable gain is below ``--safe-below`` points. Calibration: docs/statistics.md.

Everything here is analytic (no resampling), so the numbers are exactly reproducible.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ..errors import NastyError

BASELINES = ("scratch", "label-smoothing")
CORRECTIONS = ("holm", "bh", "none")
ALPHA = 0.025  # one-sided; the lower end of a two-sided 95% interval
LEVEL = 0.95
DEFAULT_SEEDS = 5  # below this the report calls its intervals approximate (see docs/statistics.md)
POOLED_SHARE = 0.5  # the share of alpha the pooled tests (one per attack and student) hold in the gate's family

# The variance of a mean over seeds x test images, as :func:`crossed` computes it. The method text written into
# audit.json is built from these strings, and tests/test_audit_stats.py evaluates them against ``crossed``.
VARIANCE_TERMS = {
    "V_S": "MS_S/(S*n) with MS_S = n*var_s(per-seed mean of D), df S-1: the seed-to-seed variance of the per-seed gains",
    "V_I": "MS_I/(S*n) with MS_I = S*var_i(per-image mean of D), df n-1",
    "V_E": "MS_E/(S*n) with MS_E the residual mean square of the two-way ANOVA, df (S-1)*(n-1)",
}
VARIANCE_FORMULA = "V_S + max(V_I - V_E, 0)"
DF_FORMULA = "V**2 / (V_S**2/(S-1) + V_I**2/(n-1) + V_E**2/((S-1)*(n-1)))"
DF_OTHERWISE = "S-1"


def _t():
    from scipy import stats as st

    return st


# ----------------------------------------------------------------------------------------------
# the crossed seeds x test-samples variance


def crossed(D: np.ndarray) -> tuple[float, float, float]:
    """``(mean, variance of the mean, degrees of freedom)`` of ``D`` (seeds x samples), see the module doc."""
    D = np.asarray(D, dtype=np.float64)
    if D.ndim == 1:
        D = D[None]
    S, n = D.shape
    g = float(D.mean())
    if n < 2 and S < 2:
        return g, float("nan"), float("nan")
    if S == 1:
        return g, float(D[0].var(ddof=1) / n), float(n - 1)
    r = D.mean(1)
    ms_s = n * float(r.var(ddof=1))
    if n == 1:
        return g, ms_s / S, float(S - 1)
    c = D.mean(0)
    ms_i = S * float(c.var(ddof=1))
    resid = D - r[:, None] - c[None, :] + g
    ms_e = float((resid ** 2).sum()) / ((S - 1) * (n - 1))
    v_s, v_i, v_e = ms_s / (S * n), ms_i / (S * n), ms_e / (S * n)
    v = v_s + max(v_i - v_e, 0.0)
    if v <= 0:
        return g, 0.0, float(S - 1)
    if v_i > v_e:
        df = v * v / (v_s * v_s / (S - 1) + v_i * v_i / (n - 1) + v_e * v_e / ((S - 1) * (n - 1)))
    else:
        df = float(S - 1)
    return g, float(v), float(df)


def detectable_delta(se, df, alpha: float, power: float):
    """Smallest ``delta`` (above the margin) at which a one-sided t-test at ``alpha`` rejects with probability
    ``power``: ``P(T_{df, delta/se} > t_{1-alpha, df}) >= power`` (vectorised bisection)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _detectable_delta(se, df, alpha, power)


def _detectable_delta(se, df, alpha: float, power: float):
    se, df = np.broadcast_arrays(np.asarray(se, float), np.asarray(df, float))
    st = _t()
    crit = st.t.ppf(1 - alpha, df)
    lo = np.zeros(se.shape)
    hi = np.maximum(crit, 1.0) + 2 * np.abs(st.norm.ppf(power)) + 5.0  # in units of se; widened below if needed
    for _ in range(60):
        short = st.nct.sf(crit, df, hi) < power
        if not short.any():
            break
        hi = np.where(short, hi * 2, hi)
    for _ in range(50):
        mid = (lo + hi) / 2
        ok = st.nct.sf(crit, df, mid) >= power
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
    out = np.where(se > 0, hi * se, 0.0)
    out = np.where(np.isfinite(se) & np.isfinite(df), out, np.nan)
    return out if out.ndim else float(out)


def iut_power(delta, parts: list[tuple], alpha: float):
    """Power of the intersection-union test when the gain over the better baseline is ``delta`` above the margin.

    ``parts``: per baseline ``(head, se, df)`` arrays (``head``: the credited head start of that baseline's
    comparison, 0 for the better one). Each comparison's power is the noncentral t's; the test needs all
    of them to reject, and as the comparisons share the attack's students (positively dependent) the
    product of their powers is a lower bound, which is what is claimed."""
    st = _t()
    delta = np.asarray(delta, float)
    pw = []
    for head, se, df in parts:
        se, df = np.asarray(se, float), np.asarray(df, float)
        crit = st.t.ppf(1 - alpha, df)
        with np.errstate(divide="ignore", invalid="ignore"):
            nc = (delta + head) / np.where(se > 0, se, np.nan)
        with warnings.catch_warnings():  # scipy's series may warn far in the tails (power ~0 or ~1): harmless here
            warnings.simplefilter("ignore", RuntimeWarning)
            p = np.where(se > 0, st.nct.sf(crit, df, np.nan_to_num(nc)), (delta + np.asarray(head)) > 0)
        pw.append(p)
    return np.prod(pw, axis=0)


def detectable_iut(parts: list[tuple], alpha: float, power: float) -> np.ndarray:
    """Smallest ``delta >= 0`` with ``iut_power(delta) >= power`` (vectorised bisection over classes)."""
    se_max = np.max([np.asarray(p[1], float) for p in parts], axis=0)
    lo = np.zeros(np.shape(se_max))
    hi = np.maximum(se_max, 1e-9) * 8.0
    for _ in range(40):
        short = iut_power(hi, parts, alpha) < power
        if not short.any():
            break
        hi = np.where(short, hi * 2, hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        ok = iut_power(mid, parts, alpha) >= power
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
    return hi


def power_parts(r: dict) -> list[tuple] | None:
    """The inputs of :func:`iut_power` for one gain-rule row: a weaker baseline's head start is credited only
    beyond two standard errors of the baselines' difference (an observed lead of a tied baseline is noise)."""
    tests = r.get("tests") or {}
    if not tests or any(tv.get("se") is None or tv.get("df") is None for tv in tests.values()):
        return None
    best = r["baseline"]
    parts = []
    for b, tv in tests.items():
        head = tv["gain"] - tests[best]["gain"] if b != best else 0.0
        if b != best:
            head = max(0.0, head - 2.0 * (tv.get("se_vs_best") or 0.0))
        parts.append((head, tv["se"], tv["df"]))
    parts.sort(key=lambda p: p[0])
    return parts


def reliability(n_seeds: int) -> str:
    """``unreliable`` (1 seed), ``approximate`` (fewer than :data:`DEFAULT_SEEDS`) or ``ok``."""
    return "unreliable" if n_seeds < 2 else ("approximate" if n_seeds < DEFAULT_SEEDS else "ok")


# ----------------------------------------------------------------------------------------------
# multiple comparisons


def adjust(p: list[float | None], method: str, weights: list[float | None] | None = None) -> list[float | None]:
    """Adjusted p-values (``None`` entries are not tests and stay ``None``). ``weights`` (default equal): weighted
    Holm (step-down on ``p / w``, each step at ``alpha w / (sum of the weights left)``) and weighted BH (BH on
    ``p / w`` with the weights scaled to mean 1); equal weights give the plain procedures."""
    if method not in CORRECTIONS:
        raise NastyError(f"unknown correction {method!r} (choose {', '.join(CORRECTIONS)})")
    idx = [i for i, v in enumerate(p) if v is not None]
    out: list[float | None] = [None] * len(p)
    m = len(idx)
    if not m:
        return out
    vals = np.array([p[i] for i in idx], float)
    w = np.ones(m) if weights is None else np.array([weights[i] for i in idx], float)
    if not np.all(w > 0):
        raise NastyError("every test of a family needs a positive weight")
    w = w / w.sum()
    q = vals / w
    if method == "none":
        adj = vals
    elif method == "holm":
        order = np.argsort(q, kind="stable")
        left = np.cumsum(w[order][::-1])[::-1]  # the weight of the hypotheses not yet rejected at each step
        steps = q[order] * left
        adj = np.empty(m)
        adj[order] = np.minimum(np.maximum.accumulate(steps), 1.0)
    else:  # Benjamini-Hochberg step-up (on p / w, the weights at mean 1)
        q = q / m
        order = np.argsort(q, kind="stable")
        steps = q[order] * m / np.arange(1, m + 1)
        adj = np.empty(m)
        adj[order] = np.minimum(np.minimum.accumulate(steps[::-1])[::-1], 1.0)
    for j, i in enumerate(idx):
        out[i] = float(adj[j])
    return out


def per_test_alpha(method: str, m: int, alpha: float = ALPHA) -> float:
    """The level one test must reach when it is the only true effect among ``m`` (used for power)."""
    return alpha if method == "none" else alpha / max(m, 1)


# ----------------------------------------------------------------------------------------------
# per-class rows


def _check(name: str, a: np.ndarray, n_seeds: int | None, n: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[1] != n or (n_seeds is not None and a.shape[0] != n_seeds):
        raise NastyError(f"{name}: expected a (seeds, {n}) correctness matrix, got shape {a.shape}")
    return a


def check_settings(*, margin: float = 0.0, fidelity: float = 0.9, power: float = 0.8, safe_below: float | None = None,
                   correction: str = "holm") -> None:
    """Refuse out-of-range or non-finite statistical settings (one line, before any training)."""
    def bad(x) -> bool:
        return not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x)

    if bad(margin) or not -100.0 <= margin < 100.0:
        raise NastyError(f"--margin must be a finite number of points in [-100, 100), got {margin}")
    if bad(fidelity) or not 0 < fidelity <= 1.5:
        raise NastyError(f"--fidelity must be in (0, 1.5], got {fidelity}")
    if bad(power) or not 0.5 <= power < 1.0:
        raise NastyError(f"--power must be in [0.5, 1), got {power}")
    if safe_below is not None and (bad(safe_below) or not 0 < safe_below <= 100):
        raise NastyError(f"--safe-below must be a number of points in (0, 100], got {safe_below}")
    if correction not in CORRECTIONS:
        raise NastyError(f"--correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")


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
    correction: str = "holm",
    power: float = 0.8,
    safe_below: float | None = None,
    alpha: float = ALPHA,
    decide: bool = True,
) -> list[dict]:
    """Per-class gain and fidelity with intervals, p-values and the decision under ``rule``.

    ``attack`` and each ``baselines[name]`` are ``(S, N)`` 0/1 correctness matrices with the same seeds
    in the same order; ``teacher`` is ``(N,)``; ``y`` the ``N`` test labels. The classes of this call
    are one family for ``correction`` (an audit re-decides across all students of an attack with
    :func:`decide_family`). Returns one dict per class (see :mod:`nasty.audit.schema`).
    """
    if rule not in ("gain", "fidelity"):
        raise NastyError(f"unknown decision rule {rule!r} (gain or fidelity)")
    if not 0 < fidelity <= 10:
        raise NastyError(f"fidelity must be a positive fraction of the teacher's accuracy, got {fidelity}")
    check_settings(margin=margin, power=power, safe_below=safe_below, correction=correction)
    y = np.asarray(y)
    n = len(y)
    attack = _check("attack", attack, None, n)
    n_seeds = attack.shape[0]
    names = [b for b in BASELINES if b in baselines] + sorted(b for b in baselines if b not in BASELINES)  # e.g. the hard-label floor
    if not names:
        raise NastyError("the gain rule needs at least one baseline")
    base = {b: _check(b, baselines[b], n_seeds, n) for b in names}
    teacher = np.asarray(teacher)
    if teacher.shape != (n,):
        raise NastyError(f"teacher: expected ({n},) correctness, got {teacher.shape}")
    K = len(names)
    q_lo, q_hi = 1 - (1 - LEVEL) / 2, 1 - (1 - LEVEL) / (2 * K)
    # per class: the numbers, before the (vectorised) t quantiles and p-values
    pre = [_class_numbers(np.flatnonzero(y == c), attack, base, teacher, names, fidelity) for c in range(num_classes)]
    gains = _gain_tests(pre, names, q_lo, q_hi, margin)
    fids = _fidelity_tests(pre, q_lo)
    rows = _rows(pre, names, gains, fids, rule, reliability(n_seeds))
    if decide:
        decide_family([rows], rule=rule, correction=correction, margin=margin, fidelity=fidelity, power=power,
                      safe_below=safe_below, alpha=alpha)
    return rows


def _class_numbers(idx: np.ndarray, attack: np.ndarray, base: dict[str, np.ndarray], teacher: np.ndarray, names: list[str],
                   fidelity: float) -> dict | None:
    """One class's accuracies, the crossed-variance tests against each baseline and the fidelity terms."""
    if len(idx) == 0:
        return None
    nan = float("nan")
    a = attack[:, idx].astype(np.float64)
    t = teacher[idx].astype(np.float64)
    e = {"idx": idx, "acc_a": 100.0 * a.mean(), "base_acc": {b: 100.0 * m[:, idx].mean() for b, m in base.items()},
         "t_acc": 100.0 * t.mean(), "tests": {}}
    e["best"] = max(names, key=lambda b: (e["base_acc"][b], -names.index(b)))
    for b, m in base.items():
        d, v, df = crossed(100.0 * (a - m[:, idx]))
        e["tests"][b] = [d, math.sqrt(v) if math.isfinite(v) else nan, df]
    e["se_vs"] = {}
    for o in names:  # the standard error of each weaker baseline's lead (for the power of the test)
        if o != e["best"]:
            _, v12, _ = crossed(100.0 * (base[o][:, idx].astype(np.float64) - base[e["best"]][:, idx]))
            e["se_vs"][o] = math.sqrt(v12) if math.isfinite(v12) else None
    e["fid"] = e["acc_a"] / e["t_acc"] if e["t_acc"] > 0 else None
    if e["fid"] is not None:
        _, v, df = crossed(a - e["fid"] * t[None])
        e["fid_ci_se"] = (math.sqrt(v) / (e["t_acc"] / 100.0) if math.isfinite(v) else nan, df)
        d, v, df = crossed(a - fidelity * t[None])
        e["fid_test"] = (d, math.sqrt(v) if math.isfinite(v) else nan, df)
    return e


def _gain_tests(pre: list[dict | None], names: list[str], q_lo: float, q_hi: float, margin: float) -> dict[str, np.ndarray]:
    """All gain t quantiles and p-values of one call at once (scipy's per-call overhead dominates otherwise)."""
    st = _t()
    tv = np.array([x for e in pre if e for b in names for x in e["tests"][b]] or [0.0, 1.0, 1.0]).reshape(-1, 3)
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.isfinite(tv[:, 1]) & np.isfinite(tv[:, 2])
        dfs = np.where(ok, tv[:, 2], 1.0)
        ql, qh = st.t.ppf(q_lo, dfs), st.t.ppf(q_hi, dfs)
        z = np.where(tv[:, 1] > 0, (tv[:, 0] - margin) / np.where(tv[:, 1] > 0, tv[:, 1], 1.0), 0.0)
        pv = np.where(tv[:, 1] > 0, st.t.sf(z, dfs), np.where(tv[:, 0] > margin, 0.0, 1.0))
        pv = np.where(ok, pv, 1.0)
    return {"ok": ok, "ql": ql, "qh": qh, "pv": pv}


def _fidelity_tests(pre: list[dict | None], q_lo: float) -> dict[str, np.ndarray]:
    """All fidelity interval quantiles and p-values of one call at once."""
    st = _t()
    fv = np.array([[*e["fid_ci_se"], *e["fid_test"]] for e in pre if e and e["fid"] is not None] or [[0.0, 1.0, 0.0, 1.0, 1.0]])
    with np.errstate(invalid="ignore", divide="ignore"):
        fok = np.isfinite(fv[:, 0]) & np.isfinite(fv[:, 1])
        fq = st.t.ppf(q_lo, np.where(fok, fv[:, 1], 1.0))
        tok = np.isfinite(fv[:, 3]) & np.isfinite(fv[:, 4])
        fz = np.where(fv[:, 3] > 0, fv[:, 2] / np.where(fv[:, 3] > 0, fv[:, 3], 1.0), 0.0)
        fp = np.where(fv[:, 3] > 0, st.t.sf(fz, np.where(tok, fv[:, 4], 1.0)), np.where(fv[:, 2] > 0, 0.0, 1.0))
        fp = np.where(tok, fp, 1.0)
    return {"fok": fok, "fq": fq, "tok": tok, "fp": fp}


def _rows(pre: list[dict | None], names: list[str], g: dict[str, np.ndarray], fd: dict[str, np.ndarray], rule: str,
          rel: str) -> list[dict]:
    """One row per class from its numbers and its slice of the vectorised tests (not yet decided)."""
    ok, ql, qh, pv = g["ok"], g["ql"], g["qh"], g["pv"]
    fok, fq, tok, fp = fd["fok"], fd["fq"], fd["tok"], fd["fp"]
    rows = []
    j = f = 0
    for c, e in enumerate(pre):
        if e is None:
            rows.append({"class": c, "n": 0, "accuracy": None, "baseline": None, "baseline_accuracy": None, "gain": None,
                         "gain_ci": [None, None], "teacher_accuracy": None, "fidelity": None, "fidelity_ci": [None, None],
                         "p_value": None, "p_adjusted": None, "transferred": False, "detectable": None, "safe": None,
                         "interval": rel})
            continue
        tests, lo, hi, all_ok = {}, [], [], True
        for b in names:
            d, se, df = e["tests"][b]
            tests[b] = {"gain": d, "se": se if ok[j] else None, "df": df if ok[j] else None, "p_value": float(pv[j])}
            if b in e["se_vs"]:
                tests[b]["se_vs_best"] = e["se_vs"][b]
            all_ok &= bool(ok[j])
            lo.append(d - ql[j] * se if se > 0 else d)
            hi.append(d + qh[j] * se if se > 0 else d)
            j += 1
        fid, fid_ci, fid_p, fid_se, fid_df = e["fid"], [None, None], None, None, None
        if fid is not None:
            se_r, _ = e["fid_ci_se"]
            if fok[f]:
                fid_ci = [float(fid - fq[f] * se_r), float(fid + fq[f] * se_r)] if se_r > 0 else [float(fid), float(fid)]
            if tok[f]:
                fid_se, fid_df = e["fid_test"][1] / (e["t_acc"] / 100.0), e["fid_test"][2]
            fid_p = float(fp[f])
            f += 1
        best = e["best"]
        if rule == "gain":
            p = max(tests[b]["p_value"] for b in names)
            se_b, df_b = tests[best]["se"], tests[best]["df"]
        else:
            p, se_b, df_b = fid_p, fid_se, fid_df
        rows.append({
            "class": c,
            "n": int(len(e["idx"])),
            "accuracy": float(e["acc_a"]),
            "baseline": best,
            "baseline_accuracy": float(e["base_acc"][best]),
            "baseline_accuracies": {b: float(v) for b, v in e["base_acc"].items()},
            "gain": float(e["acc_a"] - e["base_acc"][best]),
            "gain_ci": [float(min(lo)), float(min(hi))] if all_ok else [None, None],
            "teacher_accuracy": float(e["t_acc"]),
            "fidelity": None if fid is None else float(fid),
            "fidelity_ci": fid_ci,
            "p_value": p,
            "se": None if se_b is None else float(se_b),
            "df": None if df_b is None else float(df_b),
            "tests": tests,
            "interval": rel,
            "transferred": False,
        })
    return rows


def gate_weights(n_pooled: int, n_class: int, share: float | None = None) -> tuple[float, float]:
    """The weight of one pooled test and of one per-class test in the gate's family (the weights sum to 1):
    the pooled tests share ``share`` (default :data:`POOLED_SHARE`), the per-class tests the rest."""
    share = POOLED_SHARE if share is None else share
    if not n_pooled:
        return 0.0, 1.0 / max(n_class, 1)
    if not n_class:
        return 1.0 / n_pooled, 0.0
    return share / n_pooled, (1.0 - share) / n_class


def decide_family(families: list[list[dict]], *, rule: str, correction: str = "holm", margin: float = 0.0,
                  fidelity: float = 0.9, power: float = 0.8, safe_below: float | None = None, alpha: float = ALPHA,
                  detectable: bool = True) -> int:
    """Apply ``correction`` across every row of ``families`` with equal weights, in place: sets ``p_adjusted``,
    ``transferred``, ``detectable`` and ``safe``. Returns the family size ``m``. (An audit decides all its
    attacks at once with :func:`decide_audit`.)"""
    return decide_tests([(rule, r, 1.0, False) for fam in families for r in fam], correction=correction, margin=margin,
                        fidelity=fidelity, power=power, safe_below=safe_below, alpha=alpha, detectable=detectable)


def decide_audit(attacks: list[dict], *, correction: str = "holm", margin: float = 0.0, fidelity: float = 0.9,
                 power: float = 0.8, safe_below: float | None = None, alpha: float = ALPHA, detectable: bool = True,
                 share: float | None = None) -> int:
    """The gate's family: every per-class test and every pooled test of every attack of one target, decided
    together (in place), so that the chance that the audit shows *any* false transfer is at most ``alpha``
    (``holm``) however many attacks it runs. ``attacks``: ``[{"rule": ..., "students": {st: {"classes": rows,
    "pooled": row}}}]``. The pooled tests share :data:`POOLED_SHARE` of the weight (weighted Holm / BH).
    Returns the family size ``m``."""
    pooled = [(a["rule"], st["pooled"]) for a in attacks for st in a["students"].values() if st.get("pooled")]
    classes = [(a["rule"], r) for a in attacks for st in a["students"].values() for r in st["classes"]]
    n_p = sum(r.get("p_value") is not None for _, r in pooled)
    n_c = sum(r.get("p_value") is not None for _, r in classes)
    w_p, w_c = gate_weights(n_p, n_c, share)
    tests = [(rule, r, w_p, True) for rule, r in pooled] + [(rule, r, w_c, False) for rule, r in classes]
    return decide_tests(tests, correction=correction, margin=margin, fidelity=fidelity, power=power, safe_below=safe_below,
                        alpha=alpha, detectable=detectable)


def decide_tests(tests: list[tuple[str, dict, float, bool]], *, correction: str = "holm", margin: float = 0.0,
                 fidelity: float = 0.9, power: float = 0.8, safe_below: float | None = None, alpha: float = ALPHA,
                 detectable: bool = True) -> int:
    """One family of ``(rule, row, weight, pooled)`` tests, decided in place (weighted ``correction``): sets each
    row's ``p_adjusted``, ``transferred``, ``detectable`` and ``safe``. A pooled row keeps its detectable gain
    when it is transferred (it is the audit's resolution); a per-class row's is null then. Returns ``m``."""
    rows = [t[1] for t in tests]
    ps = [r.get("p_value") for r in rows]
    weights = [w if p is not None else None for (_, _, w, _), p in zip(tests, ps)]
    adj = adjust(ps, correction, weights)
    m = sum(v is not None for v in adj)
    total = sum(w for w in weights if w is not None) or 1.0
    groups: dict[tuple, list[int]] = {}
    for j, ((rule, r, w, pooled), pa) in enumerate(zip(tests, adj)):
        r["p_adjusted"] = pa
        r["transferred"] = bool(pa is not None and pa < alpha)
        r["detectable"] = None
        r["safe"] = None
        if (r["transferred"] and not pooled) or pa is None or not detectable:
            continue
        a_star = alpha if correction == "none" else alpha * w / total  # the strictest step: the only true effect
        if rule == "gain":
            pp = power_parts(r)
            if pp is not None:
                groups.setdefault(("gain", len(pp), a_star), []).append(j)
        elif r.get("se") is not None and r.get("df") is not None:
            groups.setdefault(("fidelity", 0, a_star), []).append(j)
    for (rule, k, a_star), sel in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        if rule == "gain":  # rows with the same number of baselines and level together (vectorised)
            pps = [power_parts(rows[j]) for j in sel]
            parts = [tuple(np.array([pp[i][q] for pp in pps]) for q in range(3)) for i in range(k)]
            for j, d in zip(sel, np.atleast_1d(detectable_iut(parts, a_star, power))):
                rows[j]["detectable"] = float(margin + d)
        else:
            delta = detectable_delta([rows[j]["se"] for j in sel], [rows[j]["df"] for j in sel], a_star, power)
            for j, d in zip(sel, np.atleast_1d(delta)):
                rows[j]["detectable"] = float(fidelity + d)
    if safe_below is not None:
        for rule, r, _, _ in tests:
            if rule == "gain" and r["detectable"] is not None:
                r["safe"] = bool(r["detectable"] < safe_below)
    return m


def pooled_test(attack: np.ndarray, baselines: dict[str, np.ndarray], teacher: np.ndarray, *, rule: str = "gain",
                margin: float = 0.0, fidelity: float = 0.9) -> dict:
    """The pooled test of one attack and student: every test image together, as one class (the same
    intersection-union test over both baselines, crossed variance and rule as a class's; not yet decided)."""
    attack = np.asarray(attack)
    row = class_decisions(np.zeros(attack.shape[-1], int), attack, baselines, teacher, num_classes=1, rule=rule,
                          margin=margin, fidelity=fidelity, decide=False)[0]
    row.pop("class", None)
    return row


def correctness(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """0/1 matrix ``pred == y`` (``pred`` is ``(S, N)`` or ``(N,)``)."""
    return (np.asarray(pred) == np.asarray(y)).astype(np.uint8)
