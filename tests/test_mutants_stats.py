"""The audit's statistics at their edges (issue 15: mutmut over nasty/audit/stats.py). Each test states a property of
the decision rules in the module docstring and checks it against scipy directly or a value worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from nasty.audit import stats
from nasty.errors import NastyError

# -- the crossed variance, edge shapes


def test_crossed_one_cell_has_no_variance():
    for d in (np.array([[0.7]]), np.array([0.7])):
        g, v, df = stats.crossed(d)
        assert g == pytest.approx(0.7) and math.isnan(v) and math.isnan(df)


def test_crossed_two_cells():
    """One seed and two samples, or two seeds and one sample, already have a variance (df 1)."""
    assert stats.crossed(np.array([[1.0, 0.0]])) == (0.5, pytest.approx(0.5 / 2), 1.0)
    assert stats.crossed(np.array([[1.0], [3.0]])) == (2.0, pytest.approx(2.0 / 2), 1.0)


def test_crossed_equal_item_and_residual_terms_use_seed_df():
    """MS_I = MS_E exactly (0.25 each): no shared test-sample variance, so df = S - 1, not Satterthwaite's 1/3."""
    assert stats.crossed(np.array([[0.0, 1.0], [0.0, 0.0]])) == (0.25, pytest.approx(0.0625), 1.0)


def test_crossed_vector_is_one_seed():
    assert stats.crossed(np.array([1, 0, 1, 1])) == stats.crossed(np.array([[1, 0, 1, 1]]))
    assert stats.crossed(np.array([1, 0, 1, 1])) == (pytest.approx(0.75), pytest.approx(0.25 / 4), 3.0)


def test_crossed_one_sample_is_the_t_over_seeds():
    g, v, df = stats.crossed(np.array([[1.0], [2.0], [6.0]]))
    assert g == pytest.approx(3.0) and v == pytest.approx(np.var([1, 2, 6], ddof=1) / 3) and df == 2.0


def test_crossed_constant_difference_has_zero_variance():
    assert stats.crossed(np.full((3, 4), 2.5)) == (2.5, 0.0, 2.0)


def test_crossed_without_shared_item_effect_uses_seed_df():
    """Column means all equal (no shared test-sample effect): V = V_S and df = S - 1, no Satterthwaite."""
    D = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    g, v, df = stats.crossed(D)
    assert g == pytest.approx(0.5)
    assert v == pytest.approx(3 * np.var(D.mean(1), ddof=1) / 6) and df == 1.0


def test_crossed_satterthwaite_by_hand():
    """3 seeds x 4 samples, worked through the module doc's formulas with numpy (a second golden case)."""
    D = np.array([[1, 0, 1, 1], [0, 0, 1, 1], [1, 0, 1, 0]], float)
    S, n = D.shape
    r, c, g = D.mean(1), D.mean(0), D.mean()
    vs, vi = n * r.var(ddof=1) / (S * n), S * c.var(ddof=1) / (S * n)
    ve = ((D - r[:, None] - c[None] + g) ** 2).sum() / ((S - 1) * (n - 1)) / (S * n)
    v = vs + max(vi - ve, 0)
    df = v * v / (vs ** 2 / (S - 1) + vi ** 2 / (n - 1) + ve ** 2 / ((S - 1) * (n - 1)))
    assert vi > ve
    assert stats.crossed(D) == (pytest.approx(g), pytest.approx(v), pytest.approx(df))


# -- power


def test_detectable_delta_solves_the_power_equation():
    se, df = np.array([0.5, 2.0, 1.0]), np.array([4.0, 30.0, 1.0])
    for alpha, power in ((0.025, 0.8), (0.0025, 0.99)):  # df 1 at power 0.99 needs the search range widened
        d = stats.detectable_delta(se, df, alpha, power)
        got = st.nct.sf(st.t.ppf(1 - alpha, df), df, d / se)
        assert got == pytest.approx(np.full(3, power), abs=1e-6)
    d = stats.detectable_delta(1.0, 10.0, 0.025, 0.8)
    assert isinstance(d, float) and st.nct.sf(st.t.ppf(0.975, 10), 10, d) == pytest.approx(0.8, abs=1e-6)


def test_detectable_delta_degenerate_inputs():
    d = stats.detectable_delta(np.array([0.0, np.nan, 1.0]), np.array([4.0, 4.0, np.inf]), 0.025, 0.8)
    assert d[0] == 0.0 and math.isnan(d[1]) and math.isnan(d[2])


def test_iut_power_is_the_product_of_the_comparisons():
    crit = st.t.ppf(1 - 0.01, 8.0)
    p1 = st.nct.sf(crit, 8.0, 3.0 / 1.5)
    p2 = st.nct.sf(st.t.ppf(1 - 0.01, 5.0), 5.0, (3.0 + 1.0) / 2.0)
    got = stats.iut_power(3.0, [(0.0, 1.5, 8.0), (1.0, 2.0, 5.0)], 0.01)
    assert got == pytest.approx(p1 * p2)
    # a comparison without noise (se 0) rejects exactly when the gain plus its head start is positive
    assert stats.iut_power(np.array([0.5, 0.0, -0.5]), [(0.0, 0.0, 4.0)], 0.01).tolist() == [1.0, 0.0, 0.0]
    assert stats.iut_power(0.5, [(0.0, np.array(0.0), np.array(4.0)), (-1.0, 0.0, 4.0)], 0.01) == 0.0


def test_detectable_iut_solves_the_power_equation():
    parts = [(np.array([0.0, 0.0]), np.array([1.0, 3.0]), np.array([4.0, 40.0])),
             (np.array([2.0, 0.5]), np.array([1.5, 3.0]), np.array([4.0, 40.0]))]
    d = stats.detectable_iut(parts, 0.005, 0.9)
    assert stats.iut_power(d, parts, 0.005) == pytest.approx([0.9, 0.9], abs=1e-6)
    assert np.all(stats.iut_power(d * 0.999, parts, 0.005) < 0.9)
    # a tiny standard error: the search starts from a floor, not from zero
    d = stats.detectable_iut([(0.0, 1e-12, 10.0)], 0.025, 0.8)
    assert 0 < d < 1e-8


def test_power_parts_credit_a_weaker_baseline_beyond_two_standard_errors():
    row = {"baseline": "label-smoothing", "tests": {
        "scratch": {"gain": 5.0, "se": 1.0, "df": 4.0, "se_vs_best": 1.5},
        "label-smoothing": {"gain": 1.0, "se": 2.0, "df": 6.0}}}
    assert stats.power_parts(row) == [(0.0, 2.0, 6.0), (1.0, 1.0, 4.0)]  # head 4 - 2 * 1.5, sorted by head start
    row["tests"]["scratch"]["se_vs_best"] = 3.0
    assert stats.power_parts(row) == [(0.0, 1.0, 4.0), (0.0, 2.0, 6.0)]  # a lead inside the noise is not credited
    del row["tests"]["scratch"]["se_vs_best"]
    assert stats.power_parts(row) == [(0.0, 2.0, 6.0), (4.0, 1.0, 4.0)]
    assert stats.power_parts({"baseline": "scratch", "tests": {}}) is None
    assert stats.power_parts({"baseline": "scratch", "tests": {"scratch": {"gain": 1.0, "se": None, "df": 3.0}}}) is None
    assert stats.power_parts({"baseline": "scratch", "tests": {"scratch": {"gain": 1.0, "se": 1.0, "df": None}}}) is None


@pytest.mark.parametrize("seeds,label", [(1, "unreliable"), (2, "approximate"), (4, "approximate"), (5, "ok"), (20, "ok")])
def test_reliability_labels(seeds, label):
    assert stats.reliability(seeds) == label


# -- multiple comparisons


def test_adjust_edges():
    assert stats.adjust([], "holm") == [] and stats.adjust([None, None], "bh") == [None, None]
    assert stats.adjust([0.6, 0.7], "holm") == [1.0, 1.0]  # 2 x 0.6 capped at 1
    assert stats.adjust([0.01, 0.02, 0.03], "holm") == [pytest.approx(0.03), pytest.approx(0.04), pytest.approx(0.04)]
    assert stats.adjust([0.01, 0.02, 0.03], "bh") == [pytest.approx(0.03)] * 3
    assert stats.adjust([0.9, 0.95], "bh") == [pytest.approx(0.95), pytest.approx(0.95)]
    assert stats.adjust([0.6, 0.7, 0.1], "bh") == [pytest.approx(0.7), pytest.approx(0.7), pytest.approx(0.3)]
    with pytest.raises(NastyError) as e:
        stats.adjust([0.1], "sidak")
    assert str(e.value) == "unknown correction 'sidak' (choose holm, bh, none)"


def test_per_test_alpha():
    assert stats.per_test_alpha("none", 10) == 0.025 and stats.per_test_alpha("holm", 10) == pytest.approx(0.0025)
    assert stats.per_test_alpha("bh", 4, 0.05) == pytest.approx(0.0125) and stats.per_test_alpha("holm", 0) == 0.025


# -- settings


@pytest.mark.parametrize("kw,ok", [
    ({"margin": -100.0}, True), ({"margin": 99.9}, True), ({"margin": -100.01}, False), ({"margin": 100}, False),
    ({"margin": True}, False), ({"margin": "1"}, False), ({"margin": 1}, True),
    ({"fidelity": 1.5}, True), ({"fidelity": 1.51}, False), ({"fidelity": 0.0}, False), ({"fidelity": 1e-9}, True),
    ({"power": 0.5}, True), ({"power": 0.49}, False), ({"power": 0.999}, True), ({"power": 1.0}, False),
    ({"safe_below": 100}, True), ({"safe_below": 100.5}, False), ({"safe_below": 0.01}, True), ({"safe_below": -1}, False),
    ({"safe_below": None}, True), ({"correction": "none"}, True), ({"correction": "HOLM"}, False),
])
def test_settings_bounds(kw, ok):
    if ok:
        stats.check_settings(**kw)
    else:
        with pytest.raises(NastyError, match="--" + next(iter(kw)).replace("_", "-")):
            stats.check_settings(**kw)


def test_settings_messages():
    cases = [({"margin": 100.0}, "--margin must be a finite number of points in [-100, 100), got 100.0"),
             ({"fidelity": 2.0}, "--fidelity must be in (0, 1.5], got 2.0"),
             ({"power": 0.4}, "--power must be in [0.5, 1), got 0.4"),
             ({"safe_below": 0}, "--safe-below must be a number of points in (0, 100], got 0"),
             ({"correction": "x"}, "--correction must be one of holm, bh, none, got 'x'")]
    for kw, msg in cases:
        with pytest.raises(NastyError) as e:
            stats.check_settings(**kw)
        assert str(e.value) == msg


# -- per-class rows against a reference computed from the module doc


def _ref_gain(a, bases, margin):
    """Per baseline: d, se, df from crossed; the row's interval and p (intersection-union, Bonferroni upper end)."""
    K = len(bases)
    lo, hi, ps = [], [], []
    for b in bases:
        d, v, df = stats.crossed(100.0 * (a - b))
        se = math.sqrt(v)
        lo.append(d - st.t.ppf(0.975, df) * se)
        hi.append(d + st.t.ppf(1 - 0.025 / K, df) * se)
        ps.append(st.t.sf((d - margin) / se, df))
    return [min(lo), min(hi)], max(ps)


def _matrices(seed, S=4, n=60, C=2):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), n)
    attack = (rng.random((S, C * n)) < 0.8).astype(np.uint8)
    scratch = (rng.random((S, C * n)) < 0.7).astype(np.uint8)
    smooth = (rng.random((S, C * n)) < 0.72).astype(np.uint8)
    teacher = (rng.random(C * n) < 0.9).astype(np.uint8)
    return y, attack, scratch, smooth, teacher


@pytest.mark.parametrize("margin", [0.0, 3.0])
def test_gain_row_matches_the_reference(margin):
    y, attack, scratch, smooth, teacher = _matrices(1)
    rows = stats.class_decisions(y, attack, {"scratch": scratch, "label-smoothing": smooth}, teacher, num_classes=2,
                                 margin=margin, correction="none")
    for c, r in enumerate(rows):
        idx = y == c
        a, b1, b2 = attack[:, idx].astype(float), scratch[:, idx].astype(float), smooth[:, idx].astype(float)
        ci, p = _ref_gain(a, [b1, b2], margin)
        assert r["gain_ci"] == pytest.approx(ci) and r["p_value"] == pytest.approx(p)
        assert r["p_adjusted"] == pytest.approx(p) and r["transferred"] == (p < 0.025)
        accs = {"scratch": 100 * b1.mean(), "label-smoothing": 100 * b2.mean()}
        best = max(accs, key=accs.get)
        assert r["baseline"] == best and r["baseline_accuracies"] == pytest.approx(accs)
        assert r["baseline_accuracy"] == pytest.approx(accs[best]) and r["gain"] == pytest.approx(100 * a.mean() - accs[best])
        d, v, df = stats.crossed(100.0 * (a - (b1 if best == "scratch" else b2)))
        assert r["se"] == pytest.approx(math.sqrt(v)) and r["df"] == pytest.approx(df)
        for name, b in (("scratch", b1), ("label-smoothing", b2)):
            d, v, df = stats.crossed(100.0 * (a - b))
            t = r["tests"][name]
            assert (t["gain"], t["se"], t["df"]) == (pytest.approx(d), pytest.approx(math.sqrt(v)), pytest.approx(df))
            assert t["p_value"] == pytest.approx(st.t.sf((d - margin) / math.sqrt(v), df))
        other = "label-smoothing" if best == "scratch" else "scratch"
        _, v12, _ = stats.crossed(100.0 * ((b1 if other == "scratch" else b2) - (b2 if other == "scratch" else b1)))
        assert r["tests"][other]["se_vs_best"] == pytest.approx(math.sqrt(v12)) and "se_vs_best" not in r["tests"][best]
        assert r["n"] == 60 and r["interval"] == "approximate" and r["class"] == c
        assert r["teacher_accuracy"] == pytest.approx(100 * teacher[idx].mean())


def test_one_baseline_interval_is_two_sided_95():
    y, attack, scratch, _, teacher = _matrices(2, C=1)
    r = stats.class_decisions(y, attack, {"scratch": scratch}, teacher, num_classes=1)[0]
    d, v, df = stats.crossed(100.0 * (attack.astype(float) - scratch))
    q = st.t.ppf(0.975, df)
    assert r["gain_ci"] == pytest.approx([d - q * math.sqrt(v), d + q * math.sqrt(v)])


def test_baselines_by_other_names_are_used_in_sorted_order():
    y, attack, scratch, smooth, teacher = _matrices(3, C=1)
    r = stats.class_decisions(y, attack, {"z-base": scratch, "a-base": smooth}, teacher, num_classes=1)[0]
    assert list(r["tests"]) == ["a-base", "z-base"] and list(r["baseline_accuracies"]) == ["a-base", "z-base"]


def test_tied_baselines_prefer_the_first_named():
    y = np.zeros(10, int)
    base = np.ones((2, 10), np.uint8)
    r = stats.class_decisions(y, base, {"label-smoothing": base, "scratch": base}, np.ones(10), num_classes=1)[0]
    assert r["baseline"] == "scratch"


def test_fidelity_row_matches_the_reference():
    y, attack, scratch, _, teacher = _matrices(4, C=3)
    rows = stats.class_decisions(y, attack, {"scratch": scratch}, teacher, num_classes=3, rule="fidelity", fidelity=0.8,
                                 correction="none")
    for c, r in enumerate(rows):
        idx = y == c
        a, t = attack[:, idx].astype(float), teacher[idx].astype(float)
        fid = a.mean() / t.mean()
        _, v, df = stats.crossed(a - fid * t[None])
        se = math.sqrt(v) / t.mean()
        q = st.t.ppf(0.975, df)
        assert r["fidelity"] == pytest.approx(fid) and r["fidelity_ci"] == pytest.approx([fid - q * se, fid + q * se])
        d, v, df = stats.crossed(a - 0.8 * t[None])
        p = st.t.sf(d / math.sqrt(v), df)
        assert r["p_value"] == pytest.approx(p) and r["transferred"] == (p < 0.025)
        assert r["se"] == pytest.approx(math.sqrt(v) / t.mean()) and r["df"] == pytest.approx(df)
        if not r["transferred"]:
            assert r["detectable"] == pytest.approx(0.8 + stats.detectable_delta(r["se"], r["df"], 0.025, 0.8))


def test_fidelity_without_noise():
    """Teacher and attack right on every sample, every seed: ratio 1 with a zero-width interval, transferred above
    0.9 and not above 1.2 (the zero-variance test is decided by the sign alone)."""
    y = np.zeros(10, int)
    teacher = np.ones(10, np.uint8)
    attack = np.stack([teacher] * 3)
    r = stats.class_decisions(y, attack, {"scratch": attack * 0}, teacher, num_classes=1, rule="fidelity")[0]
    assert r["fidelity"] == 1.0 and r["fidelity_ci"] == [1.0, 1.0] and r["p_value"] == 0.0 and r["transferred"]
    r = stats.class_decisions(y, attack, {"scratch": attack * 0}, teacher, num_classes=1, rule="fidelity", fidelity=1.2)[0]
    assert r["p_value"] == 1.0 and not r["transferred"]
    r = stats.class_decisions(y, attack, {"scratch": attack * 0}, teacher, num_classes=1, rule="fidelity", fidelity=1.0)[0]
    assert r["p_value"] == 1.0 and not r["transferred"]  # exactly at the bar is not above it


def test_zero_variance_gain_is_decided_by_its_sign():
    y = np.zeros(10, int)
    ones, zeros = np.ones((3, 10), np.uint8), np.zeros((3, 10), np.uint8)
    up = stats.class_decisions(y, ones, {"scratch": zeros}, np.ones(10), num_classes=1)[0]
    assert up["gain"] == 100.0 and up["gain_ci"] == [100.0, 100.0] and up["p_value"] == 0.0 and up["transferred"]
    flat = stats.class_decisions(y, ones, {"scratch": ones}, np.ones(10), num_classes=1, margin=0.0)[0]
    assert flat["p_value"] == 1.0 and not flat["transferred"]


def test_one_cell_class_has_no_interval():
    """One seed and one test sample: no variance, so no interval and no test (p = 1)."""
    y = np.array([0, 1, 1])
    attack, base = np.array([[1, 1, 0]], np.uint8), np.array([[0, 0, 0]], np.uint8)
    r = stats.class_decisions(y, attack, {"scratch": base}, np.ones(3), num_classes=2)[0]
    assert r["gain_ci"] == [None, None] and r["p_value"] == 1.0 and r["se"] is None and r["df"] is None
    assert r["tests"]["scratch"]["se"] is None and r["fidelity_ci"] == [None, None] and r["interval"] == "unreliable"
    r = stats.class_decisions(y, attack, {"scratch": base}, np.ones(3), num_classes=2, rule="fidelity")[0]
    assert r["p_value"] == 1.0 and r["se"] is None and r["df"] is None and not r["transferred"]


def test_class_decision_refusals():
    y = np.zeros(6, int)
    a = np.ones((2, 6), np.uint8)
    cases = [({"rule": "vibes"}, "unknown decision rule 'vibes' (gain or fidelity)"),
             ({"fidelity": 0}, "fidelity must be a positive fraction of the teacher's accuracy, got 0"),
             ({"fidelity": 10.5}, "fidelity must be a positive fraction of the teacher's accuracy, got 10.5")]
    for kw, msg in cases:
        with pytest.raises(NastyError) as e:
            stats.class_decisions(y, a, {"scratch": a}, np.ones(6), num_classes=1, **kw)
        assert str(e.value) == msg
    stats.class_decisions(y, a, {"scratch": a}, np.ones(6), num_classes=1, fidelity=10, decide=False)
    with pytest.raises(NastyError) as e:
        stats.class_decisions(y, a, {}, np.ones(6), num_classes=1)
    assert str(e.value) == "the gain rule needs at least one baseline"
    with pytest.raises(NastyError) as e:
        stats.class_decisions(y, a, {"scratch": a}, np.ones(5), num_classes=1)
    assert str(e.value) == "teacher: expected (6,) correctness, got (5,)"
    with pytest.raises(NastyError) as e:
        stats.class_decisions(y, a[0], {"scratch": a}, np.ones(6), num_classes=1)
    assert str(e.value) == "attack: expected a (seeds, 6) correctness matrix, got shape (6,)"
    with pytest.raises(NastyError) as e:
        stats.class_decisions(y, a, {"scratch": a[:, :5]}, np.ones(6), num_classes=1)
    assert str(e.value) == "scratch: expected a (seeds, 6) correctness matrix, got shape (2, 5)"
    with pytest.raises(NastyError, match="--margin"):
        stats.class_decisions(y, a, {"scratch": a}, np.ones(6), num_classes=1, margin=200.0)


# -- deciding a family


def _row(p, se=1.0, df=10.0, gain=0.0):
    return {"p_value": p, "baseline": "scratch", "se": se, "df": df,
            "tests": {"scratch": {"gain": gain, "se": se, "df": df}}}


def test_decide_family_threshold_is_strict_and_detectable_is_margin_plus_delta():
    rows = [_row(0.025), _row(0.0249), _row(None), _row(0.5, se=2.0, df=5.0)]
    m = stats.decide_family([rows[:2], rows[2:]], rule="gain", correction="none", margin=1.5, safe_below=8.0)
    assert m == 3
    assert [r["transferred"] for r in rows] == [False, True, False, False]
    assert rows[1]["detectable"] is None and rows[1]["safe"] is None and rows[2]["p_adjusted"] is None
    for r in (rows[0], rows[3]):
        delta = r["detectable"] - 1.5
        assert stats.iut_power(delta, stats.power_parts(r), 0.025) == pytest.approx(0.8, abs=1e-6)
        assert r["safe"] == (r["detectable"] < 8.0)
    assert rows[0]["safe"] and not rows[3]["safe"]
    rows = [_row(0.5), _row(0.4)]
    stats.decide_family([rows], rule="gain", correction="holm", power=0.9)
    delta = rows[0]["detectable"]
    assert stats.iut_power(delta, stats.power_parts(rows[0]), 0.025 / 2) == pytest.approx(0.9, abs=1e-6)
    assert rows[0]["safe"] is None  # no --safe-below: no verdict
    rows = [_row(0.5)]
    stats.decide_family([rows], rule="gain", detectable=False)
    assert rows[0]["detectable"] is None


def test_decide_family_groups_rows_by_number_of_baselines():
    two = {"p_value": 0.3, "baseline": "scratch", "se": 1.0, "df": 8.0,
           "tests": {"scratch": {"gain": 1.0, "se": 1.0, "df": 8.0},
                     "label-smoothing": {"gain": 6.0, "se": 1.0, "df": 8.0, "se_vs_best": 0.5}}}
    one = _row(0.3, se=3.0, df=4.0)
    stats.decide_family([[two, one]], rule="gain", correction="none")
    for r in (two, one):
        assert stats.iut_power(r["detectable"], stats.power_parts(r), 0.025) == pytest.approx(0.8, abs=1e-6)


def test_decide_family_fidelity_detectable_is_fidelity_plus_delta():
    rows = [_row(0.3, se=0.05, df=6.0), _row(0.3, se=None, df=None), _row(0.001, se=0.05, df=6.0)]
    stats.decide_family([rows], rule="fidelity", correction="none", fidelity=0.85, safe_below=50.0)
    d = stats.detectable_delta(0.05, 6.0, 0.025, 0.8)
    assert rows[0]["detectable"] == pytest.approx(0.85 + d) and rows[1]["detectable"] is None
    assert rows[2]["transferred"] and rows[2]["detectable"] is None
    assert rows[0]["safe"] is None  # --safe-below is in points of gain: no verdict under the fidelity rule


def test_correctness():
    assert stats.correctness(np.array([[1, 2, 3], [1, 0, 3]]), np.array([1, 2, 0])).tolist() == [[1, 1, 0], [1, 0, 0]]
    assert stats.correctness(np.array([4, 5]), np.array([4, 4])).dtype == np.uint8


def test_defaults_are_margin_zero_and_later_classes_survive_an_absent_one():
    """Without ``margin`` the bar is zero; a class with no test sample in the middle leaves the later ones decided."""
    y, attack, scratch, _, teacher = _matrices(5, C=3)
    keep = y != 1
    y, attack, scratch, teacher = y[keep], attack[:, keep], scratch[:, keep], teacher[keep]
    rows = stats.class_decisions(y, attack, {"scratch": scratch}, teacher, num_classes=3)
    assert rows[1]["n"] == 0 and rows[2]["n"] == 60 and rows[2]["gain"] is not None
    a, b = attack[:, y == 2].astype(float), scratch[:, y == 2].astype(float)
    _, p = _ref_gain(a, [b], 0.0)
    assert rows[2]["p_value"] == pytest.approx(p)


def test_fidelity_defined_for_a_teacher_right_on_few_samples():
    """A teacher right on 1 of 200 samples (0.5%) still has a fidelity ratio; only 0% has none."""
    y = np.zeros(200, int)
    teacher = np.zeros(200, np.uint8)
    teacher[0] = 1
    attack = np.stack([teacher] * 2)
    r = stats.class_decisions(y, attack, {"scratch": attack}, teacher, num_classes=1)[0]
    assert r["teacher_accuracy"] == 0.5 and r["fidelity"] == pytest.approx(1.0)


def test_class_decisions_passes_its_settings_to_the_decision():
    """margin, power, alpha and --safe-below given to class_decisions are the ones the decision and the
    detectable gain use (not the defaults)."""
    y, attack, scratch, smooth, teacher = _matrices(6, C=3)
    rows = stats.class_decisions(y, attack, {"scratch": scratch, "label-smoothing": smooth}, teacher, num_classes=3,
                                 margin=20.0, power=0.9, alpha=0.05, correction="none", safe_below=25.0)
    assert not any(r["transferred"] for r in rows)
    for r in rows:
        delta = r["detectable"] - 20.0
        assert stats.iut_power(delta, stats.power_parts(r), 0.05) == pytest.approx(0.9, abs=1e-6)
        assert r["safe"] == (r["detectable"] < 25.0)


def test_undecided_rows_and_absent_class_layout():
    """decide=False leaves every row untransferred with no adjusted p-value; an absent class has exactly the
    documented empty row."""
    y = np.zeros(20, int)
    rows = stats.class_decisions(y, np.ones((2, 20), np.uint8), {"scratch": np.zeros((2, 20), np.uint8)}, np.ones(20),
                                 num_classes=2, decide=False)
    assert rows[0]["transferred"] is False and "p_adjusted" not in rows[0] and rows[0]["p_value"] == 0.0
    assert rows[1] == {"class": 1, "n": 0, "accuracy": None, "baseline": None, "baseline_accuracy": None, "gain": None,
                       "gain_ci": [None, None], "teacher_accuracy": None, "fidelity": None, "fidelity_ci": [None, None],
                       "p_value": None, "p_adjusted": None, "transferred": False, "detectable": None, "safe": None,
                       "interval": "approximate"}


def test_small_standard_error_still_gives_an_interval():
    """A standard error below one point (many samples, steady seeds) still widens the interval around the gain."""
    rng = np.random.default_rng(7)
    n = 3000
    y = np.zeros(n, int)
    base = (rng.random((5, n)) < 0.7).astype(np.uint8)
    attack = base.copy()
    attack[:, :150] = 1
    r = stats.class_decisions(y, attack, {"scratch": base}, np.ones(n), num_classes=1)[0]
    assert 0 < r["se"] < 1
    d, v, df = stats.crossed(100.0 * (attack.astype(float) - base))
    q = st.t.ppf(0.975, df)
    assert r["gain_ci"] == pytest.approx([d - q * math.sqrt(v), d + q * math.sqrt(v)])


def test_decide_family_defaults_and_edges():
    rows = [_row(0.3, se=0.05, df=6.0)]
    stats.decide_family([rows], rule="fidelity", correction="none")  # default fidelity 0.9, alpha 0.025
    assert rows[0]["detectable"] == pytest.approx(0.9 + stats.detectable_delta(0.05, 6.0, 0.025, 0.8))
    rows = [_row(0.3, se=0.05, df=6.0), _row(0.3, se=0.05, df=None)]
    stats.decide_family([rows], rule="fidelity", correction="holm", alpha=0.05)
    assert rows[0]["detectable"] == pytest.approx(0.9 + stats.detectable_delta(0.05, 6.0, 0.05 / 2, 0.8))
    assert rows[1]["detectable"] is None  # no degrees of freedom: no power claim
    rows = [_row(0.3)]
    stats.decide_family([rows], rule="gain", correction="none")
    at = rows[0]["detectable"]
    stats.decide_family([rows], rule="gain", correction="none", safe_below=at)
    assert rows[0]["safe"] is False  # "below" is strict
