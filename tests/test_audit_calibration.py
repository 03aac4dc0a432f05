"""Calibration of the audit's statistics on synthetic audits (no training; `nasty.audit.simulate`).

Every synthetic audit is decided by the same code as `nasty audit` (stats.class_decisions +
stats.decide_family over 10 classes x 2 students of one attack). The full table, with more
repetitions and settings, is `benchmarks/bench_audit_calibration.py` (docs/statistics.md)."""

import copy

import numpy as np
import pytest

from nasty.audit import simulate as sim
from nasty.audit import stats

ALPHA = stats.ALPHA
REPS = 160
# binomial tolerance for a rate estimated from REPS audits: 2.5 standard errors at the nominal level
TOL = 2.5 * np.sqrt(ALPHA * (1 - ALPHA) / REPS)
WORSE_LS = {("label-smoothing", c): -5.0 for c in range(10)}  # one clear better baseline: each test is exact, not conservative


@pytest.fixture(scope="module")
def exact_null():
    """REPS synthetic audits (5 seeds, 300 test images per class) in which the attack gains nothing over the
    better baseline on any class; the rows are decided without correction (re-decided per test below)."""
    m = sim.Model(seeds=5, n_per_class=300, shift=dict(WORSE_LS))
    rng = np.random.default_rng(2024)
    return [sim.audit_once(m, rng, correction="none", detectable=False) for _ in range(REPS)]


def _rate(audits, correction):
    false = 0
    for fams in audits:
        fams = copy.deepcopy(fams)
        stats.decide_family(fams, rule="gain", correction=correction, detectable=False)
        false += any(r["transferred"] for f in fams for r in f)
    return false / len(audits)


@pytest.mark.parametrize("correction", ["holm", "bh"])
def test_null_false_transferred_rate_per_attack(exact_null, correction):
    """True null on all 20 (student, class) tests: the chance that the attack shows any transferred class is
    at most alpha = 0.025 (Holm: family-wise error; BH: under the complete null FDR = FWER)."""
    rate = _rate(exact_null, correction)
    assert rate <= ALPHA + TOL, (correction, rate)


def test_without_correction_the_family_is_not_controlled(exact_null):
    """The same audits without correction: 20 tests at 0.025 each give a false class in roughly 1 - 0.975^20 = 40%
    of the attacks; this is what the default correction removes (and shows the test above can fail)."""
    rate = _rate(exact_null, "none")
    assert 0.2 < rate < 0.6, rate


def test_interval_coverage(exact_null):
    """The 95% intervals cover the true gain (0 on every class) at their nominal rate: the lower end is a one-sided
    97.5% bound, and both ends together cover at least 95%."""
    rows = [r for fams in exact_null for f in fams for r in f]
    lo = np.mean([r["gain_ci"][0] <= 0 for r in rows])
    both = np.mean([r["gain_ci"][0] <= 0 <= r["gain_ci"][1] for r in rows])
    assert lo >= 0.975 - 0.012 and both >= 0.95 - 0.015, (lo, both)
    assert lo < 0.995 and both < 0.99, (lo, both)  # and not uselessly wide (a t over 5 seeds, not a worst case)


def test_the_better_baseline_is_the_bar():
    """Label smoothing beats label-only training by 2 points on every class and the attack is exactly as good as
    label smoothing: the true gain over the better baseline is zero, so no class may be called transferred more
    often than alpha -- although the attack is 2 points better than label-only training everywhere."""
    m = sim.Model(seeds=5, n_per_class=300, shift={("scratch", c): -2.0 for c in range(10)})
    r = sim.calibrate(m, 100, seed=7, detectable=False)
    assert r["false_rate"] <= ALPHA + 2.5 * np.sqrt(ALPHA * (1 - ALPHA) / 100), r


def test_planted_gain_found_with_the_claimed_power():
    """A 2-point gain planted on one class (of 5 classes x 2 students, Holm) is found about as often as the power
    the report claims for it (computed from each audit's own standard errors, as the report computes it)."""
    m = sim.Model(seeds=5, n_per_class=1000, classes=5, sd_seed=0.05, accuracy=(0.9,),
                  shift={**WORSE_LS, ("attack", 0): 2.0})
    r = sim.calibrate(m, 120, seed=3, detectable=False)
    assert 0.2 < r["claimed_power"] < 0.8, r  # an informative range
    assert abs(r["detection"] - r["claimed_power"]) <= 0.1, r
    assert r["false_rate"] <= 0.06, r  # the 4 other classes stay null


def test_detectable_gain_solves_the_power_equation():
    """The detectable gain printed for a class is the gain at which the test of that class (against both
    baselines, at the strictest Holm step alpha/m) has exactly the configured power; more seeds lower it."""
    dets = {}
    for seeds in (3, 5, 10):
        m = sim.Model(seeds=seeds, n_per_class=500, classes=5)
        fams = sim.audit_once(m, np.random.default_rng(seeds), power=0.8)
        a_star = stats.per_test_alpha("holm", 10)
        for r in (r for f in fams for r in f if r["detectable"] is not None):
            got = stats.iut_power(r["detectable"], stats.power_parts(r), a_star)
            assert got == pytest.approx(0.8, abs=1e-3)
        dets[seeds] = np.median([r["detectable"] for f in fams for r in f if r["detectable"] is not None])
    assert dets[3] > dets[5] > dets[10], dets
