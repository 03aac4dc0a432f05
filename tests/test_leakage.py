"""The probe's and the strength choice's leakage rules (nasty.pipelines.leakage, choose_by_leakage)."""

from __future__ import annotations

import math

import pytest

from nasty.pipelines import defended, leakage


def test_interval_is_the_t_interval_over_seeds():
    r = leakage.interval([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and r["sd"] == 1.0 and r["n"] == 3
    assert r["ci_high"] == pytest.approx(2.0 + 4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2)
    assert math.isnan(leakage.interval([1.0])["ci_high"])


def test_holds_only_when_the_best_attacks_upper_bound_is_at_most_one_point():
    low = leakage.interval([-2.0, -1.5, -2.5])
    high = leakage.interval([0.5, 1.0, 1.5])  # mean 1.0: upper bound far above 1
    assert leakage.holds({"kd": low}) is True
    assert leakage.best_attack({"kd": low, "top1": high})[0] == "top1"
    assert leakage.holds({"kd": low, "top1": high}) is False  # the best attack decides, not the average
    assert leakage.holds({"kd": leakage.interval([-3.0])}) is None  # one seed: cannot tell
    assert leakage.holds({"kd": leakage.interval([])}) is None


def test_strength_by_leakage_takes_the_smallest_omega_within_noise_of_the_best(monkeypatch):
    """Scored per candidate by the worst student's best attack, clipped at 0; the smallest omega within 1.96 SE
    of the best wins, not the one that hurts thieves most."""
    scripted = {"omega=0.1": [3.0, 3.2, 2.8], "omega=0.3": [0.1, -0.2, 0.3], "omega=1": [-9.0, -8.0, -10.0]}

    def fake_measure(cfg, pool, targets, attacks, **kw):
        return {"failed": [], "leakage": {t: {"s": {"kd": leakage.interval(scripted[t])}} for t in targets}}

    monkeypatch.setattr(defended, "measure", fake_measure)
    monkeypatch.setattr(defended, "thief_pool", lambda cfg, data: (data, "pool"))
    monkeypatch.setattr(defended, "owner_holdout", lambda cfg, pool, data: (None, None))
    cfg = {"probe": {"students": ["s"], "seeds": 3}, "train": {"seed": 0}}
    pick, table = defended.choose_by_leakage([(0.1, None), (0.3, None), (1.0, None)], cfg, None, None, lambda m: None, None)
    assert [r["score"] for r in table] == [pytest.approx(3.0), pytest.approx(0.0666667, rel=1e-4), 0.0]
    assert pick == 1  # omega 0.3 leaks within noise of omega 1 (clipped at 0) and is the smaller: harm is not rewarded
    assert table[1]["within_noise_of_best"] and not table[0]["within_noise_of_best"]


def test_strength_search_stops_at_the_first_strength_that_leaks_nothing(monkeypatch):
    """From the smallest omega up: a candidate whose best attack gains nothing (score 0 after clipping) is the
    pick whatever the larger ones score, so they are never trained; a smaller one within noise still wins."""
    scripted = {"omega=0.1": [0.4, -0.6, 0.5], "omega=0.3": [-1.0, -2.0, -1.5], "omega=1": [-9.0, -8.0, -10.0]}
    asked = []

    def fake_measure(cfg, pool, targets, attacks, **kw):
        asked.extend(targets)
        return {"failed": [], "leakage": {t: {"s": {"kd": leakage.interval(scripted[t])}} for t in targets}}

    monkeypatch.setattr(defended, "measure", fake_measure)
    monkeypatch.setattr(defended, "thief_pool", lambda cfg, data: (data, "pool"))
    monkeypatch.setattr(defended, "owner_holdout", lambda cfg, pool, data: (None, None))
    cfg = {"probe": {"students": ["s"], "seeds": 3}, "train": {"seed": 0}}
    pick, table = defended.choose_by_leakage([(1.0, None), (0.3, None), (0.1, None)], cfg, None, None, lambda m: None, None)
    assert asked == ["omega=0.1", "omega=0.3"]  # omega 1 never measured
    assert table[0]["score"] is None and "not measured" in table[0]["skipped"]
    assert pick == 2  # omega 0.1 (+0.1 +- 0.35) is within noise of omega 0.3's 0: the smaller wins, as with every candidate measured


def test_leakage_is_over_the_best_floor_of_the_seed_with_every_hard_label_smoothing(digits, monkeypatch):
    """The floor of a seed is the best of labels alone and hard-label at each smoothing of its grid, each trained
    with its own fixed smoothing (not one chosen on a few validation images): an attack gains only over all."""
    import torch

    from nasty.config import load_config

    scripted = {("scratch", None): 50.0, ("label-smoothing", None): 55.0, ("hard-label", 0.0): 70.0,
                ("hard-label", 0.1): 60.0, ("hard-label", 0.3): 65.0, ("kd", None): 72.0}
    seen = []

    def fake_run_attack(method, params, **kw):
        seen.append((method, dict(params)))
        return (method, params.get("label_smoothing")), {}

    n = len(digits.y_test)

    def fake_predict(model, x):
        right = round(scripted[model] / 100 * n)
        wrong = (digits.y_test + 1) % digits.num_classes
        pred = torch.cat([digits.y_test[:right], wrong[right:]])
        return torch.nn.functional.one_hot(pred, digits.num_classes).float()

    monkeypatch.setattr(leakage, "run_attack", fake_run_attack)
    monkeypatch.setattr(leakage, "predict_logits", fake_predict)
    cfg = load_config(None)
    cfg["probe"].update(labelled=20, queries=60, students=["s"], jobs=1)
    res = leakage.measure(cfg, digits, {"t": torch.nn.Identity()}, {"t": ["kd"]}, seeds=[0], out=None, log=lambda m: None)
    assert sorted(p.get("label_smoothing") for m, p in seen if m == "hard-label") == [0.0, 0.1, 0.3]
    assert all("tune" not in p for m, p in seen if m == "hard-label")  # fixed settings, not tuned on validation
    assert ("kd", {"tune": True}) in seen  # the attack tunes itself
    best = 100 * round(0.70 * n) / n
    assert res["leakage"]["t"]["s"]["kd"]["mean"] == pytest.approx(100 * round(0.72 * n) / n - best)
    assert res["floors"]["t"]["s"]["hard-label:ls=0"]["mean"] == pytest.approx(best)


@pytest.mark.parametrize("labelled", [None, 20])
def test_calibration_bins_fit_on_images_the_teacher_never_saw_with_or_without_a_thiefs_regime(labelled):
    """A teacher on a train_subset: the bins (and the strength's choice) use the pool images it never trained on,
    less the probe thief's own when there is one; the validation split (which picked its epoch) only otherwise."""
    from nasty.config import load_config
    from nasty.runs import data_from_config

    cfg = load_config(None)
    cfg["data"]["train_subset"] = 300
    cfg["defense"].update(lock="two-head", keep="confidence:bins=3")
    cfg["probe"].update(labelled=labelled, queries=None if labelled is None else 100)
    data = data_from_config(cfg)
    pool, _ = leakage.thief_pool(cfg, data)
    (x, y), note = defended.calibration_split(cfg, data)
    assert "held-out images the teacher never trained on" in note
    seen = {bytes(r) for r in data.x_train.numpy().reshape(len(data.x_train), -1)}
    assert not any(bytes(r) in seen for r in x.numpy().reshape(len(x), -1))  # never a training image of the teacher
    expected = len(pool.y_train) + len(pool.y_val) - (0 if labelled is None else 100)
    assert len(y) == expected
