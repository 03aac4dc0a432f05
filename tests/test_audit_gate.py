"""The audit's pooled test per attack and the gate's family (issue 19, item 4), on synthetic audits (no training).

The gate (`--fail-on`) reads every per-class test and every pooled test of every attack; they are one
family (weighted Holm by default), so the chance that an audit of an attack-free teacher fails the gate
is at most alpha however many attacks it runs. The old scheme (a correction per attack) is kept in
`simulate.gate_fails(scheme="per-attack")` to show what the joint family fixes."""

import math

import numpy as np
import pytest
from scipy import stats as st

from nasty.audit import analyse
from nasty.audit import simulate as sim
from nasty.audit import stats

ALPHA = stats.ALPHA
REPS = 200
SLACK = 2.5 * math.sqrt(ALPHA * (1 - ALPHA) / REPS)  # Monte Carlo: 2.5 binomial standard errors at the nominal rate
N_ATTACKS = 9
# label smoothing far worse: the label-only baseline is the bar and each test is exact, not conservative
NULL = sim.Model(seeds=5, n_per_class=100, classes=4, students=1, shift={("label-smoothing", c): -20.0 for c in range(4)})


@pytest.fixture(scope="module")
def null_audits():
    """REPS synthetic audits of 9 attacks that gain nothing (sharing their baselines, as in `nasty audit`)."""
    rng = np.random.default_rng(2026)
    return [sim.null_attacks(NULL, rng, N_ATTACKS) for _ in range(REPS)]


@pytest.mark.parametrize("correction", ["holm", "bh"])
def test_gate_false_alarm_rate_is_controlled_over_attacks(null_audits, correction):
    """One family over 9 attacks x (4 classes + 1 pooled test): the gate fails an attack-free audit at most alpha
    of the time (BH: under the complete null FDR = FWER)."""
    rate = np.mean([sim.gate_fails(a, correction=correction) for a in null_audits])
    assert rate <= ALPHA + SLACK, rate


def test_per_attack_correction_did_not_control_the_gate(null_audits):
    """The schema-2 scheme, Holm per attack: each attack is controlled, the gate over 9 attacks is not."""
    one = np.mean([sim.gate_fails(a[:1], scheme="per-attack") for a in null_audits])
    rate = np.mean([sim.gate_fails(a, scheme="per-attack") for a in null_audits])
    assert one <= ALPHA + SLACK, one
    assert rate > ALPHA + SLACK, rate


def test_pooled_test_finds_a_gain_spread_over_all_classes():
    """+3 points on every class, as KD gives: no class test finds it at its level, the pooled test does."""
    m = sim.Model(seeds=5, n_per_class=300, classes=10, students=1,
                  shift={**{("label-smoothing", c): -20.0 for c in range(10)}, **{("attack0", c): 3.0 for c in range(10)}})
    att = sim.null_attacks(m, np.random.default_rng(1), 1)
    stats.decide_audit(att)
    row = att[0]["students"]["s0"]
    assert row["pooled"]["transferred"] and row["pooled"]["gain_ci"][0] > 0
    assert sum(r["transferred"] for r in row["classes"]) <= 2
    summary = analyse.pooled_summary({"rule": "gain", "students": att[0]["students"]}, 3.0)
    assert summary["transferred"] and summary["resolution_ok"] == (summary["detectable_gain"] <= 3.0)


def test_weighted_holm_by_hand():
    """Weights 0.5 (one pooled test) and 0.25 x 2: p/w = 0.02, 0.04, 0.16; steps x (weight left) 0.02, 0.02, 0.04."""
    p = [0.01, 0.01, 0.04, None]
    w = [0.5, 0.25, 0.25, None]
    assert stats.adjust(p, "holm", w) == [pytest.approx(0.02), pytest.approx(0.02), pytest.approx(0.04), None]
    # equal weights are plain Holm and BH
    q = [0.01, 0.04, 0.03]
    assert stats.adjust(q, "holm", [1, 1, 1]) == stats.adjust(q, "holm")
    assert stats.adjust(q, "bh", [2, 2, 2]) == stats.adjust(q, "bh")
    # weighted BH: p / w' with the weights at mean 1 (1.5, 0.75, 0.75) -> 0.00667, 0.01333, 0.05333; x m / rank
    assert stats.adjust(p, "bh", w) == [pytest.approx(0.02), pytest.approx(0.02), pytest.approx(0.16 / 3), None]


def test_decide_audit_weights_and_strictest_level():
    """m counts every test; the pooled tests share POOLED_SHARE of alpha, the class tests the rest; each test's
    detectable gain has the configured power at alpha x its weight (the strictest step)."""
    rows = lambda k: [{"p_value": 0.5, "baseline": "scratch", "se": 1.0, "df": 8.0,  # noqa: E731
                       "tests": {"scratch": {"gain": 0.0, "se": 1.0, "df": 8.0}}} for _ in range(k)]
    atts = [{"rule": "gain", "students": {"a": {"classes": rows(3), "pooled": rows(1)[0]},
                                          "b": {"classes": rows(3), "pooled": rows(1)[0]}}} for _ in range(2)]
    m = stats.decide_audit(atts)
    assert m == 2 * 2 * 4
    w_p, w_c = stats.gate_weights(4, 12)
    assert w_p == pytest.approx(stats.POOLED_SHARE / 4) and w_c == pytest.approx((1 - stats.POOLED_SHARE) / 12)
    pooled, cls = atts[0]["students"]["a"]["pooled"], atts[0]["students"]["a"]["classes"][0]
    assert stats.iut_power(pooled["detectable"], stats.power_parts(pooled), ALPHA * w_p) == pytest.approx(0.8, abs=1e-6)
    assert stats.iut_power(cls["detectable"], stats.power_parts(cls), ALPHA * w_c) == pytest.approx(0.8, abs=1e-6)
    assert pooled["p_adjusted"] == pytest.approx(1.0) and not pooled["transferred"]


def test_pooled_test_is_the_class_test_over_every_image():
    """Gain = overall accuracy minus the better baseline's; the intersection-union p-value over both baselines."""
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 80)
    a = (rng.random((4, 240)) < 0.8).astype(np.uint8)
    b1 = (rng.random((4, 240)) < 0.7).astype(np.uint8)
    b2 = (rng.random((4, 240)) < 0.75).astype(np.uint8)
    r = stats.pooled_test(a, {"scratch": b1, "label-smoothing": b2}, np.ones(240, np.uint8))
    assert r["gain"] == pytest.approx(100 * (a.mean() - max(b1.mean(), b2.mean())))
    ps = []
    for b in (b1, b2):
        d, v, df = stats.crossed(100.0 * (a.astype(float) - b))
        ps.append(st.t.sf(d / math.sqrt(v), df))
    assert r["p_value"] == pytest.approx(max(ps)) and "class" not in r
    assert r["n"] == 240 and y.size == 240


def test_gate_counts_a_pooled_transfer_as_one_class():
    att = {"transferred_count": 0, "pooled": {"transferred": True}}
    assert analyse.gate_count(att) == 1
    assert analyse.gate_count({**att, "transferred_count": 3}) == 3
    assert analyse.gate_count({"transferred_count": 0, "pooled": {"transferred": False}}) == 0
    assert analyse.gate_count({"transferred_count": 2}) == 2  # schema 2: no pooled test


def test_pooled_summary_takes_the_least_sensitive_student_for_the_resolution():
    def row(p_adj, det, tr=False):
        return {"pooled": {"gain": 1.0, "gain_ci": [-1.0, 3.0], "p_value": p_adj / 2, "p_adjusted": p_adj, "transferred": tr,
                           "detectable": det, "fidelity": None, "fidelity_ci": [None, None]}}
    s = analyse.pooled_summary({"rule": "gain", "students": {"a": row(0.3, 2.0), "b": row(0.1, 4.0)}}, 3.0)
    assert s["student"] == "b" and s["p_adjusted"] == 0.1 and s["detectable_gain"] == 4.0 and s["resolution_ok"] is False
    s = analyse.pooled_summary({"rule": "gain", "students": {"a": row(0.3, 2.0), "b": row(0.01, 2.5, True)}}, 3.0)
    assert s["transferred"] and s["resolution_ok"] is True
    s = analyse.pooled_summary({"rule": "fidelity", "students": {"a": row(0.3, 0.95)}}, 3.0)
    assert s["resolution_ok"] is None and s["detectable_gain"] is None and s["detectable_fidelity"] == 0.95
