"""Thieves that read exactly what a defended teacher serves (issue 21, items 2 and 3): set-uniform (the top
class, its probability and the runner-up *set*), confidence-label (labels smoothed or weighted by the served
confidence) and the tuned, smoothed hard-label floor."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nasty.attacks import get_attack, run_attack
from nasty.attacks.base import AttackContext, Oracle, served_probs
from nasty.attacks.conflabel import confidence_label_loss, confidence_label_target, smoothed_targets
from nasty.attacks.run import thief_view
from nasty.attacks.setuniform import set_uniform_target
from nasty.attacks.top1conf import top1_confidence_target
from nasty.data import Batch
from nasty.errors import NastyError
from nasty.losses import kd_loss
from nasty.train import TrainConfig

F12 = 1e-12
P = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0],   # a tie at ranks 2-3; class 4 not served (a top-k answer)
                  [0.4, 0.4, 0.2, 0.0, 0.0],   # a tie for the top class
                  [0.7, 0.1, 0.1, 0.06, 0.04]])  # every class served


# -- golden values of the target builders (worked by hand)

@pytest.mark.parametrize("k, expect", [
    (2, [[0.5, 0.25, 0.25, F12, F12], [0.4, 0.6, F12, F12, F12], [0.7, 0.15, 0.15, F12, F12]]),  # ties at rank k join the set
    (3, [[0.5, 0.25, 0.25, F12, F12], [0.4, 0.3, 0.3, F12, F12], [0.7, 0.15, 0.15, F12, F12]]),
    (4, [[0.5, 1 / 6, 1 / 6, 1 / 6, F12], [0.4, 0.3, 0.3, F12, F12], [0.7, 0.1, 0.1, 0.1, F12]]),
    (5, [[0.5, 1 / 6, 1 / 6, 1 / 6, F12], [0.4, 0.3, 0.3, F12, F12], [0.7, 0.075, 0.075, 0.075, 0.075]]),  # a hidden class never joins
    (50, [[0.5, 1 / 6, 1 / 6, 1 / 6, F12], [0.4, 0.3, 0.3, F12, F12], [0.7, 0.075, 0.075, 0.075, 0.075]]),  # k > C: k = C
    (1, [[0.5, 0.125, 0.125, 0.125, 0.125], [0.4, 0.6, F12, F12, F12], [0.7, 0.075, 0.075, 0.075, 0.075]]),  # no set: every other class
])
def test_set_uniform_target_golden_values(k, expect):
    got = set_uniform_target(P, k)
    assert torch.allclose(got, torch.log(torch.tensor(expect)), atol=1e-6), got.exp()


def test_set_uniform_with_every_class_served_and_k_equal_C_is_top1_confidence():
    z = torch.randn(16, 7, generator=torch.Generator().manual_seed(0)) * 3
    ref = top1_confidence_target(z)
    assert torch.allclose(set_uniform_target(F.softmax(z, 1), 7), ref, atol=1e-5)
    assert torch.allclose(set_uniform_target(F.softmax(z, 1), 1), ref, atol=1e-5)  # no runner-up set read: the same thief
    assert not torch.allclose(set_uniform_target(F.softmax(z, 1), 3), ref, atol=1e-3)


def test_set_uniform_ignores_the_order_of_the_runner_up_set():
    a = torch.tensor([[0.6, 0.25, 0.1, 0.05, 0.0]])
    b = torch.tensor([[0.6, 0.05, 0.1, 0.25, 0.0]])  # the same set {1, 2, 3} in another order
    assert torch.equal(set_uniform_target(a, 4), set_uniform_target(b, 4))


def test_a_sure_answer_puts_the_floor_everywhere_else():
    got = set_uniform_target(torch.tensor([[0.0, 1.0, 0.0]]), 3)
    assert torch.allclose(got, torch.log(torch.tensor([[F12, 1.0, F12]])))
    assert torch.isfinite(got).all()


def test_confidence_label_target_golden_values():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.25, 0.25, 0.5]])
    y = torch.tensor([-1, 1, 2, -1])  # a query, a label the teacher decides, one it does not, a query
    cls, s = confidence_label_target(p, y)
    assert cls.tolist() == [0, 1, 2, 2] and torch.allclose(s, torch.tensor([0.5, 0.8, 1.0, 0.5]))
    _, s2 = confidence_label_target(p, y, exponent=2.0)
    assert torch.allclose(s2, torch.tensor([0.25, 0.64, 1.0, 0.25]))
    _, s0 = confidence_label_target(p, y, exponent=0.0)
    assert torch.equal(s0, torch.ones(4))  # exponent 0: hard labels
    t = smoothed_targets(cls, s, 3)
    assert torch.allclose(t, torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.0, 0.0, 1.0], [0.25, 0.25, 0.5]]))


def test_confidence_label_losses_golden_values():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    cls, s = torch.tensor([0, 2]), torch.tensor([0.6, 0.9])
    logp = F.log_softmax(z, 1)
    smooth = -(0.6 * logp[0, 0] + 0.2 * logp[0, 1] + 0.2 * logp[0, 2] + 0.05 * logp[1, 0] + 0.05 * logp[1, 1] + 0.9 * logp[1, 2]) / 2
    weight = -(0.6 * logp[0, 0] + 0.9 * logp[1, 2]) / 2
    assert confidence_label_loss(z, cls, s, "smooth").item() == pytest.approx(smooth.item(), rel=1e-6)
    assert confidence_label_loss(z, cls, s, "weight").item() == pytest.approx(weight.item(), rel=1e-6)
    one = torch.ones(2)
    assert confidence_label_loss(z, cls, one, "smooth").item() == pytest.approx(F.cross_entropy(z, cls).item(), rel=1e-6)


def test_a_top1_answer_serves_its_probability_not_a_renormalised_one(small_teacher, digits):
    x = digits.x_val[:8]
    p = F.softmax(small_teacher(x), 1)
    for query, expect_q in (("topk:1", p.max(1).values), ("probs", p.max(1).values), ("logits", p.max(1).values)):
        o = Oracle(small_teacher, query)
        got = served_probs(o(x), o.serves_log_probs)
        assert torch.allclose(got.max(1).values, expect_q, atol=1e-5), query
    o = Oracle(small_teacher, "topk:1")
    assert o.serves_log_probs and not Oracle(small_teacher, "logits").serves_log_probs


# -- the objectives on a thief's mixed batch

def _mixed(digits, teacher, query):
    view, _ = thief_view(digits, 40, 200, "mixed")
    ctx = AttackContext(data=view, teachers=[Oracle(teacher, query)], student="mlp:hidden=8", train=TrainConfig(epochs=1), params={})
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    batch = Batch(view.x_train, view.y_train, torch.arange(len(view.y_train)), False)
    served = F.softmax(teacher(view.x_train), 1)
    return ctx, model, batch, served


def test_set_uniform_objective_distils_its_target_of_the_served_top_k(digits, small_teacher):
    ctx, model, batch, p = _mixed(digits, small_teacher, "topk:3")
    top = p.topk(3, 1)
    served = torch.zeros_like(p).scatter(1, top.indices, top.values)  # what a top-3 answer serves, not renormalised
    obj = get_attack("set-uniform")(k=5, temperature=2.0, alpha=0.6).objective(ctx, model)
    loss, _ = obj(model, batch, 0)
    expect, _ = kd_loss(model(batch.x), set_uniform_target(served, 5), batch.y, 2.0, 0.6)
    assert (batch.y < 0).any() and (batch.y >= 0).any()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)


@pytest.mark.parametrize("use", ["smooth", "weight"])
def test_confidence_label_objective_reads_the_labels_the_decisions_and_the_confidence(digits, small_teacher, use):
    ctx, model, batch, p = _mixed(digits, small_teacher, "probs")
    obj = get_attack("confidence-label")(confidence=use, exponent=1.0).objective(ctx, model)
    loss, _ = obj(model, batch, 0)
    q, top = p.max(1)
    cls = torch.where(batch.y >= 0, batch.y, top)
    s = torch.where(cls == top, q, torch.ones_like(q))
    z = model(batch.x)
    if use == "smooth":
        t = torch.full_like(p, 0.0) + ((1 - s) / 9)[:, None]
        t[torch.arange(len(t)), cls] = s
        expect = -(t * F.log_softmax(z, 1)).sum(1).mean()
    else:
        expect = (s * F.cross_entropy(z, cls, reduction="none")).mean()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    assert loss.item() != pytest.approx(F.cross_entropy(z, cls).item(), rel=1e-3)  # the confidence is read


# -- end to end on a tiny model

FAST = dict(student="mlp:hidden=8", log=lambda m: None, labelled=40, query_budget=200)


@pytest.mark.parametrize("method, query, params", [("set-uniform", "topk:3", {"k": 3}), ("set-uniform", "probs", {}),
                                                   ("confidence-label", "probs", {"confidence": "weight"}),
                                                   ("confidence-label", "topk:1", {})])
def test_the_served_output_thieves_run_end_to_end(digits, small_teacher, method, query, params):
    _, r = run_attack(method, data=digits, teachers=[small_teacher], train=TrainConfig(epochs=10, batch_size=32, lr=0.05, seed=0),
                      params=params, query=query, **{**FAST, "student": "mlp:hidden=16"})
    assert r["method"] == method and r["resources"]["access"] == query and r["resources"]["queries"] == 190
    assert r["accuracy"] > 60  # labels alone give this student ~27%: it learned from the 160 answers


@pytest.mark.parametrize("method, keys", [("set-uniform", {"alpha", "temperature"}), ("confidence-label", {"confidence", "exponent"})])
def test_the_served_output_thieves_tune_on_the_thiefs_validation_split(digits, small_teacher, method, keys):
    _, r = run_attack(method, data=digits, teachers=[small_teacher], train=TrainConfig(epochs=1, batch_size=128, seed=0),
                      params={"tune": True}, query="probs", **FAST)
    grid = get_attack(method)().tuning_grid()
    assert [{k: row[k] for k in keys} for row in r["tuning"]] == grid
    assert set(r["tuned"]) == keys and r["tuned"] in grid
    if method == "confidence-label":
        assert {(g["confidence"], g["exponent"]) for g in grid} == {(u, e) for u in ("smooth", "weight") for e in (0.5, 1.0, 2.0)}


def test_the_served_output_thieves_refuse_a_label_only_teacher():
    from nasty.attacks.run import check_requirements

    for method in ("set-uniform", "confidence-label"):
        with pytest.raises(NastyError, match=f"attack {method} needs teacher access"):
            check_requirements(get_attack(method), query="label")
        check_requirements(get_attack(method), query="topk:2")


@pytest.mark.parametrize("method, params, msg", [
    ("set-uniform", {"k": 0}, "k must be >= 1"), ("set-uniform", {"k": -3}, "k must be >= 1"),
    ("set-uniform", {"k": 2.5}, "k must be an integer"), ("set-uniform", {"k": math.nan}, "k must be an integer"),
    ("set-uniform", {"temperature": math.nan}, "finite"), ("set-uniform", {"alpha": math.inf}, "finite"),
    ("set-uniform", {"alpha": 1.5}, "alpha must be in"),
    ("confidence-label", {"confidence": "blend"}, "confidence must be smooth or weight"),
    ("confidence-label", {"exponent": -1.0}, "exponent must be >= 0"), ("confidence-label", {"exponent": math.nan}, "finite"),
    ("confidence-label", {"exponent": math.inf}, "finite"), ("hard-label", {"label_smoothing": math.nan}, "finite"),
    ("hard-label", {"label_smoothing": 1.0}, "label_smoothing must be in"), ("hard-label", {"tune": "yes"}, "true or false"),
])
def test_bad_parameters_are_one_line_errors(method, params, msg):
    with pytest.raises(NastyError, match=msg) as e:
        get_attack(method)(**params)
    assert "\n" not in str(e.value)


# -- the smoothed, tuned hard-label floor

def test_hard_label_smooths_its_labels_and_its_decisions(digits, small_teacher):
    ctx, model, batch, p = _mixed(digits, small_teacher, "label")
    loss, _ = get_attack("hard-label")(label_smoothing=0.3).objective(ctx, model)(model, batch, 0)
    y = torch.where(batch.y >= 0, batch.y, p.argmax(1))
    assert loss.item() == pytest.approx(F.cross_entropy(model(batch.x), y, label_smoothing=0.3).item(), rel=1e-6)


def test_tuned_hard_label_trains_its_label_smoothing_grid_and_picks_from_it(digits, small_teacher):
    _, r = run_attack("hard-label", data=digits, teachers=[small_teacher], train=TrainConfig(epochs=1, batch_size=128, seed=0),
                      params={"tune": True, "label_smoothing": 0.3}, query="label", **FAST)
    assert [row["label_smoothing"] for row in r["tuning"]] == [0.0, 0.1, 0.3]
    assert set(r["tuned"]) == {"label_smoothing"} and r["tuned"]["label_smoothing"] in (0.0, 0.1, 0.3)
    assert not any("alpha" in row for row in r["tuning"])


@pytest.mark.parametrize("vals, own, expect", [((90.0, 60.0, 55.0), 0.3, 0.0),   # validation clearly prefers no smoothing
                                               ((60.0, 90.0, 55.0), 0.3, 0.1),
                                               ((90.0, 60.0, 85.0), 0.3, 0.3),   # 0.3, the floor's own, within noise: kept
                                               ((50.0, 60.0, 90.0), 0.0, 0.3)])
def test_tuned_hard_label_keeps_the_best_on_validation(digits, small_teacher, monkeypatch, vals, own, expect):
    import nasty.attacks.base as base
    from nasty.train import FitResult

    def scripted(members, *a, **k):
        by = {"label_smoothing=0": vals[0], "label_smoothing=0.1": vals[1], "label_smoothing=0.3": vals[2]}
        return [FitResult(1, by[m.desc.rsplit(":", 1)[1]], [], 0.0) for m in members]

    monkeypatch.setattr(base, "fit_group", scripted)
    _, r = run_attack("hard-label", data=digits, teachers=[small_teacher], train=TrainConfig(epochs=1, batch_size=128),
                      params={"tune": True, "label_smoothing": own}, query="label", **FAST)
    assert r["tuned"] == {"label_smoothing": expect}


def test_the_floor_of_the_thiefs_regime_is_the_tuned_smoothed_hard_label():
    from nasty.audit.plan import attack_params

    assert attack_params("hard-label", {}, tune=True) == {"label_smoothing": 0.3, "tune": True}
    assert attack_params("hard-label", {"hard-label": {"label_smoothing": 0.1}}, tune=True)["label_smoothing"] == 0.1  # the user's word
    assert attack_params("hard-label", {}, tune=False) == {"label_smoothing": 0.0, "tune": False}  # outside the regime: plain
    assert attack_params("copycat", {}, tune=True) == {"label_smoothing": 0.0}  # not a floor, nothing to tune


def test_the_probes_attacks_tune_themselves_and_its_floors_keep_fixed_settings(digits, small_teacher, monkeypatch):
    """The probe's thieves tune on their validation split; its floors (hard-label at each smoothing: the whole family
    is tested in test_leakage.py) run with fixed settings."""
    import nasty.pipelines.leakage as leakage
    from nasty.config import defaults

    seen = {}

    def fake(method, **kw):
        seen[method] = kw["params"]
        return (lambda x: torch.zeros(len(x), 10)), {"accuracy": 50.0}

    monkeypatch.setattr(leakage, "run_attack", fake)
    cfg = defaults()
    cfg["probe"].update(labelled=40, queries=200, students=["mlp:hidden=8"], jobs=1)  # in this process: the fake sees every call
    leakage.measure(cfg, digits, {"defended": small_teacher}, {"defended": ["set-uniform", "confidence-label"]}, seeds=[0], out=None,
                    log=lambda m: None)
    assert seen["hard-label"] == {"label_smoothing": 0.3}  # the last of the floor family (0, 0.1, 0.3), not tuned
    assert seen["set-uniform"] == {"tune": True} and seen["confidence-label"] == {"tune": True}
    assert seen["scratch"] == {}


def test_audit_all_and_the_probe_list_the_served_output_thieves():
    from nasty.audit.plan import access_problem, resolve_attacks
    from nasty.config import defaults

    picked, _ = resolve_attacks(["all"])
    assert {"set-uniform", "confidence-label", "confidence-curriculum"} <= set(picked) and "hard-label" not in picked
    for method in ("set-uniform", "confidence-label"):
        assert access_problem(method, "label") is not None  # skipped, with the reason, under label access
        assert access_problem(method, "topk:2") is None and access_problem(method, "probs") is None
    probe = defaults()["probe"]["attacks"]
    assert {"top1-confidence", "set-uniform", "confidence-label", "confidence-curriculum"} <= set(probe)


def test_nasty_attacks_lists_them(run_cli):
    import json

    rc, out, _ = run_cli("attacks", "--json")
    rows = json.loads(out)
    assert rc == 0 and rows["set-uniform"]["access"] == ["weights", "logits", "probs", "topk"]
    assert rows["set-uniform"]["params"]["k"] == 5 and rows["confidence-label"]["params"]["confidence"] == "smooth"
    assert rows["hard-label"]["params"] == {"label_smoothing": 0.0, "tune": False}


def test_top1_confidence_reads_the_served_top1_probability_of_a_topk_answer(digits, small_teacher):
    """Under --query topk:1 the served top probability is read as served (a (label, score) API), not
    renormalised to 1 by a softmax of the answer."""
    from nasty.attacks.top1conf import top1_confidence_from_probs

    ctx, model, batch, p = _mixed(digits, small_teacher, "topk:1")
    q, top = p.max(1)
    obj = get_attack("top1-confidence")(temperature=2.0, alpha=0.6).objective(ctx, model)
    loss, _ = obj(model, batch, 0)
    served = torch.zeros_like(p).scatter(1, top[:, None], q[:, None])
    expect, _ = kd_loss(model(batch.x), top1_confidence_from_probs(served), batch.y, 2.0, 0.6)
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    onehot, _ = kd_loss(model(batch.x), top1_confidence_from_probs(F.one_hot(top, 10).float()), batch.y, 2.0, 0.6)
    assert loss.item() != pytest.approx(onehot.item(), rel=1e-3)  # not the q = 1 of a renormalised answer


# -- the confidence-curriculum thief

def test_curriculum_admits_the_most_confident_queries_first_golden():
    from nasty.attacks.confcurriculum import admitted, admitted_fraction

    assert [admitted_fraction(e, 40, 0.25, 1.0) for e in (0, 10, 20, 39)] == [0.25, 0.625, 1.0, 1.0]
    assert admitted_fraction(7, 40, 0.5, 0.5) == 0.5  # a filter
    q = torch.tensor([0.9, 0.2, 0.5, 0.5, 0.7, 0.1])
    query = torch.tensor([True, True, True, True, True, False])  # the last row is labelled: always counts
    assert admitted(q, query, 0.4).tolist() == [True, False, False, False, True, True]  # top 2 of 5 queries
    assert admitted(q, query, 0.6).tolist() == [True, False, True, True, True, True]  # the 3rd is a tie: both enter
    assert admitted(q, query, 1.0).all() and admitted(q, torch.zeros(6, dtype=torch.bool), 0.1).all()


def test_curriculum_objective_counts_only_admitted_queries(digits, small_teacher):
    ctx, model, batch, p = _mixed(digits, small_teacher, "probs")
    ctx.train = TrainConfig(epochs=10)
    obj = get_attack("confidence-curriculum")(start=0.25, end=1.0, label_smoothing=0.3).objective(ctx, model)
    q, top = p.max(1)
    query = batch.y < 0
    y = torch.where(query, top, batch.y)
    ce = F.cross_entropy(model(batch.x), y, label_smoothing=0.3, reduction="none")
    for epoch, frac in ((0, 0.25), (5, 1.0)):
        loss, terms = obj(model, batch, epoch)
        cut = q[query].topk(int(-(-frac * int(query.sum()) // 1))).values[-1]
        keep = ~query | (q >= cut)
        assert loss.item() == pytest.approx(ce[keep].mean().item(), rel=1e-5)
        assert terms["admitted"] == pytest.approx(keep.float().mean().item())
    assert obj(model, batch, 0)[0].item() != pytest.approx(ce.mean().item(), rel=1e-4)  # the confidence is read


def test_curriculum_runs_end_to_end_tunes_and_refuses_bad_settings(digits, small_teacher):
    _, r = run_attack("confidence-curriculum", data=digits, teachers=[small_teacher], train=TrainConfig(epochs=10, batch_size=32, lr=0.05, seed=0),
                      params={}, query="topk:1", **{**FAST, "student": "mlp:hidden=16"})
    assert r["accuracy"] > 60 and r["resources"]["queries"] == 190
    _, r = run_attack("confidence-curriculum", data=digits, teachers=[small_teacher], train=TrainConfig(epochs=1, batch_size=128, seed=0),
                      params={"tune": True}, query="probs", **FAST)
    assert len(r["tuning"]) == 8 and r["tuned"] in get_attack("confidence-curriculum")().tuning_grid()
    for params, msg in (({"start": 0.0}, "start must be in"), ({"end": 1.5}, "end must be in"), ({"start": math.nan}, "finite"),
                        ({"label_smoothing": 1.0}, "label_smoothing must be in")):
        with pytest.raises(NastyError, match=msg) as e:
            get_attack("confidence-curriculum")(**params)
        assert "\n" not in str(e.value)
