"""The audit's decision rules on constructed per-class results (no training)."""

import numpy as np
import pytest

from nasty.audit import stats
from nasty.errors import NastyError


def _ones(n_seeds, n, frac, rng=None):
    """(S, n) correctness with exactly ``frac`` of the samples right in every seed (shuffled with ``rng`` + seed)."""
    k = int(round(frac * n))
    rows = []
    for s in range(n_seeds):
        r = np.zeros(n, np.uint8)
        r[:k] = 1
        rows.append(np.random.default_rng(1000 * rng + s).permutation(r) if rng else r)
    return np.stack(rows)


def _bern(n_seeds, n, p, seed):
    """(S, n) correctness drawn at random with probability ``p``: per-seed accuracies vary, as trained students' do."""
    return (np.random.default_rng(seed).random((n_seeds, n)) < p).astype(np.uint8)


def test_crossed_variance_golden():
    """Worked by hand: MS_S = 1/6, MS_I = 1/2, MS_E = 1/6, S n = 6 -> V = 1/36 + (1/12 - 1/36) = 1/12,
    df = (1/12)^2 / ((1/36)^2 / 1 + (1/12)^2 / 2 + (1/36)^2 / 2) = 1.5."""
    mean, var, df = stats.crossed(np.array([[1, 0, 1], [0, 0, 1]]))
    assert mean == pytest.approx(0.5) and var == pytest.approx(1 / 12) and df == pytest.approx(1.5)
    # one seed: the paired test-sample variance only, df n - 1
    assert stats.crossed(np.array([[1, 0, 1, 1]])) == (pytest.approx(0.75), pytest.approx(0.25 / 4), 3.0)
    # per-seed gains that differ and no image effect: the t-test over seeds (V_S = var of the seed means / S)
    d = np.array([[1.0] * 4, [2.0] * 4, [6.0] * 4])
    mean, var, df = stats.crossed(d)
    assert mean == pytest.approx(3.0) and var == pytest.approx(np.var([1, 2, 6], ddof=1) / 3) and df == pytest.approx(2.0)


def test_corrections_golden():
    p = [0.01, 0.04, 0.03, None]
    assert stats.adjust(p, "holm") == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06), None]
    assert stats.adjust(p, "bh") == [pytest.approx(0.03), pytest.approx(0.04), pytest.approx(0.04), None]
    assert stats.adjust(p, "none") == p
    with pytest.raises(NastyError, match="correction"):
        stats.adjust(p, "bonferonni")


def test_issue_example_is_not_transferred():
    """Per-seed gains of 1, 2 and 6 points on 4,000 images: the t-interval over the 3 seeds is about [-3.6, 9.6]
    (the percentile bootstrap gave [1.0, 5.8] and called the class transferred)."""
    n = 4000
    y = np.zeros(n, int)
    base = _ones(3, n, 0.80, True)
    attack = np.stack([_ones(1, n, f, 10 + k)[0] for k, f in enumerate((0.81, 0.82, 0.86))])
    r = stats.class_decisions(y, attack, {"scratch": base}, np.ones(n), num_classes=1)[0]
    assert r["gain"] == pytest.approx(3.0)
    assert -3.9 < r["gain_ci"][0] < -3.3 and 9.3 < r["gain_ci"][1] < 9.9 and not r["transferred"]
    assert r["interval"] == "approximate" and r["detectable"] > 8


def test_clear_gain_transferred_identical_not():
    n = 200
    y = np.repeat([0, 1], n)
    base = np.concatenate([_ones(3, n, 0.60, True), _ones(3, n, 0.80, True)], axis=1)
    attack = np.concatenate([_bern(3, n, 0.95, 2), base[:, n:]], axis=1)  # class 1: exactly the baseline
    teacher = np.ones(2 * n, np.uint8)
    rows = stats.class_decisions(y, attack, {"scratch": base, "label-smoothing": base}, teacher, num_classes=2)
    assert rows[0]["gain"] == pytest.approx(35.0, abs=3) and rows[0]["transferred"]
    assert 20 < rows[0]["gain_ci"][0] < rows[0]["gain"] < rows[0]["gain_ci"][1] < 50
    assert rows[1]["gain"] == 0.0 and rows[1]["gain_ci"] == [0.0, 0.0] and not rows[1]["transferred"]
    assert rows[0]["accuracy"] == pytest.approx(100 * attack[:, :n].mean()) and rows[0]["teacher_accuracy"] == 100.0


def test_gain_inside_noise_not_transferred():
    n = 40
    y = np.zeros(n, int)
    base = _bern(3, n, 0.80, 1)
    attack = _bern(3, n, 0.85, 2)  # about +5 points on 40 samples: noise
    rows = stats.class_decisions(y, attack, {"scratch": base}, np.ones(n, np.uint8), num_classes=1)
    assert rows[0]["gain"] == pytest.approx(100 * (attack.mean() - base.mean()))
    assert rows[0]["gain_ci"][0] < 0 < rows[0]["gain_ci"][1] and not rows[0]["transferred"]


def test_margin_raises_the_bar():
    n = 300
    y = np.zeros(n, int)
    base, attack = _ones(5, n, 0.70, 1), _ones(5, n, 0.80, 2)  # 5 seeds: 2 would leave the seed variance 1 df
    kw = dict(num_classes=1)
    assert stats.class_decisions(y, attack, {"scratch": base}, np.ones(n), margin=0.0, **kw)[0]["transferred"]
    assert not stats.class_decisions(y, attack, {"scratch": base}, np.ones(n), margin=15.0, **kw)[0]["transferred"]


def test_seed_noise_widens_the_interval():
    """Big per-seed swings with a small mean gain: resampling seeds must keep the class untransferred."""
    n = 500
    y = np.zeros(n, int)
    base = np.stack([_ones(1, n, 0.5)[0]] * 3)
    attack = np.stack([_ones(1, n, f)[0] for f in (0.95, 0.20, 0.75)])  # mean 63.3 vs 50
    rows = stats.class_decisions(y, attack, {"scratch": base}, np.ones(n), num_classes=1)
    assert rows[0]["gain"] == pytest.approx(13.333, abs=0.01)
    assert rows[0]["gain_ci"][0] < 0 and not rows[0]["transferred"]
    # the same mean gain from one seed on the same number of samples is significant
    one = stats.class_decisions(y, attack[:1] * 0 + _ones(1, n, 0.633), {"scratch": base[:1]}, np.ones(n), num_classes=1)
    assert one[0]["transferred"]


def test_best_baseline_per_class():
    n = 50
    y = np.repeat([0, 1], n)
    scratch = np.concatenate([_ones(1, n, 0.9), _ones(1, n, 0.5)], axis=1)
    smooth = np.concatenate([_ones(1, n, 0.7), _ones(1, n, 0.6)], axis=1)
    attack = np.concatenate([_ones(1, n, 0.9), _ones(1, n, 0.9)], axis=1)
    rows = stats.class_decisions(y, attack, {"scratch": scratch, "label-smoothing": smooth}, np.ones(2 * n), num_classes=2)
    assert [r["baseline"] for r in rows] == ["scratch", "label-smoothing"]
    assert rows[0]["gain"] == pytest.approx(0.0) and rows[1]["gain"] == pytest.approx(30.0)
    assert rows[1]["baseline_accuracies"] == {"scratch": pytest.approx(50.0), "label-smoothing": pytest.approx(60.0)}


def test_fidelity_rule():
    n = 200
    y = np.repeat([0, 1, 2], n)
    teacher = np.concatenate([_ones(1, n, 0.9)[0], _ones(1, n, 0.9)[0], np.zeros(n, np.uint8)])
    attack = np.concatenate([teacher[:n][None], _ones(1, n, 0.45), np.zeros((1, n), np.uint8)], axis=1)
    base = np.zeros_like(attack)
    rows = stats.class_decisions(y, attack, {"scratch": base}, teacher, num_classes=3, rule="fidelity")
    assert rows[0]["fidelity"] == pytest.approx(1.0) and rows[0]["fidelity_ci"] == [1.0, 1.0] and rows[0]["transferred"]
    assert rows[1]["fidelity"] == pytest.approx(0.5) and rows[1]["fidelity_ci"][1] < 0.9 and not rows[1]["transferred"]
    assert rows[2]["fidelity"] is None and not rows[2]["transferred"]  # teacher never right: no ratio
    # the gain is still reported for fidelity-rule attacks
    assert rows[0]["gain"] == pytest.approx(90.0)


def test_deterministic_and_validated():
    y = np.repeat([0, 1], 30)
    a, b = _ones(2, 60, 0.7, 1), _ones(2, 60, 0.6, 2)
    r1 = stats.class_decisions(y, a, {"scratch": b}, np.ones(60), num_classes=2)
    r2 = stats.class_decisions(y, a, {"scratch": b}, np.ones(60), num_classes=2)
    assert r1 == r2
    with pytest.raises(NastyError, match="correctness matrix"):
        stats.class_decisions(y, a, {"scratch": b[:1]}, np.ones(60), num_classes=2)
    with pytest.raises(NastyError, match="rule"):
        stats.class_decisions(y, a, {"scratch": b}, np.ones(60), num_classes=2, rule="vibes")
    for kw, what in [({"margin": float("nan")}, "--margin"), ({"margin": 100.0}, "--margin"), ({"power": 1.0}, "--power"),
                     ({"power": float("nan")}, "--power"), ({"safe_below": 0}, "--safe-below"),
                     ({"safe_below": float("inf")}, "--safe-below"), ({"correction": "bonf"}, "--correction")]:
        with pytest.raises(NastyError, match=what):
            stats.class_decisions(y, a, {"scratch": b}, np.ones(60), num_classes=2, **kw)


def test_absent_class_has_no_decision():
    y = np.zeros(20, int)
    rows = stats.class_decisions(y, _ones(1, 20, 1.0), {"scratch": _ones(1, 20, 0.0)}, np.ones(20), num_classes=2)
    assert rows[0]["transferred"] and rows[1] == {**rows[1], "n": 0, "gain": None, "transferred": False}


def _method(**kw):
    from nasty.audit.analyse import method_text
    from nasty.audit.plan import AuditSettings

    return method_text(AuditSettings(teacher="t", cfg={}, **kw))


@pytest.mark.parametrize("item_sd, seed_sd", [(0.0, 5.0), (3.0, 5.0), (3.0, 0.0)])
def test_method_text_is_the_variance_the_code_computes(item_sd, seed_sd):
    """The interval text of audit.json names every term of the variance and gives the formulas of crossed();
    evaluated on a matrix, the text's formulas give crossed()'s variance and df (with and without a shared
    test-image effect, i.e. both df branches, and with seeds that agree exactly, where the rejected variance floor
    max(MS_S, MS_E) would differ). The floor is not described."""
    text = _method()["interval"]
    for term, definition in stats.VARIANCE_TERMS.items():
        assert f"{term} = {definition}" in text
    assert f"V = {stats.VARIANCE_FORMULA}" in text and f"df = {stats.DF_FORMULA} when V_I > V_E" in text
    assert f"else df = {stats.DF_OTHERWISE}" in text and "max(MS_S, MS_E)" not in text
    rng = np.random.default_rng(11)
    S, n = 5, 60
    noise = rng.normal(size=(S, n))
    if not item_sd:
        noise -= noise.mean(0)  # no shared test-image effect at all: V_I = 0 < V_E
    if not seed_sd:
        noise -= noise.mean(1, keepdims=True)  # every seed gains exactly the same: MS_S = 0 < MS_E
    D = 10 * noise + seed_sd * rng.normal(size=(S, 1)) + 10 * item_sd * rng.normal(size=(1, n))
    r, c, g = D.mean(1), D.mean(0), D.mean()
    ms_s, ms_i = n * r.var(ddof=1), S * c.var(ddof=1)
    ms_e = ((D - r[:, None] - c[None, :] + g) ** 2).sum() / ((S - 1) * (n - 1))
    env = {"V_S": ms_s / (S * n), "V_I": ms_i / (S * n), "V_E": ms_e / (S * n), "S": S, "n": n, "max": max}
    env["V"] = eval(stats.VARIANCE_FORMULA, env)  # noqa: S307 (our own constant)
    df = eval(stats.DF_FORMULA if env["V_I"] > env["V_E"] else stats.DF_OTHERWISE, env)  # noqa: S307
    assert (env["V_I"] > env["V_E"]) == (item_sd > 0)
    assert stats.crossed(D)[1:] == (pytest.approx(env["V"]), pytest.approx(df))


def test_method_text_follows_the_constants(monkeypatch):
    """The pooled share, alpha and level in the text are the ones the code uses: change one, the text changes."""
    before = _method()
    assert f"weight of {stats.POOLED_SHARE:g}" in before["correction"] and f"below {stats.ALPHA:g}" in before["decision"]
    assert "--resolution (3 points)" in before["power"] and "pooled" in before
    monkeypatch.setattr(stats, "POOLED_SHARE", 0.3)
    monkeypatch.setattr(stats, "ALPHA", 0.01)
    after = _method(resolution=1.5)
    assert "weight of 0.3" in after["correction"] and "below 0.01" in after["decision"] and "(1.5 points)" in after["power"]
