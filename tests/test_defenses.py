"""Training-time defenses: class-selective weight, several adversaries, the accuracy-budget controller,
and tiny end-to-end runs on digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nasty.config import defaults, load_config
from nasty.data import Batch
from nasty.defenses import get_defense, split_model_specs
from nasty.pipelines.defended import train_defended
from nasty.defenses.budget import OMEGA_MIN, BudgetNasty, OmegaController
from nasty.defenses.multi import combine_kls
from nasty.defenses.selective import protection_weight, resolve_classes, split_accuracy
from nasty.errors import NastyError, TrainingDiverged


class _Data:
    """The bits of a DataBundle a defense's constructor reads."""

    def __init__(self, classes):
        self.classes = classes

    @property
    def num_classes(self):
        return len(self.classes)


def dcfg(**kw):
    return {**defaults()["defense"], **kw}


# ------------------------------------------------------------------ class-selective

def test_resolve_classes_names_and_indices():
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert resolve_classes(["shirt", "4", "Pullover", "4"], classes) == [2, 4, 6]
    with pytest.raises(NastyError, match="did you mean 'Shirt'"):
        resolve_classes(["Shrit"], classes)
    with pytest.raises(NastyError, match="out of range"):
        resolve_classes(["10"], classes)


def test_protection_weight_label_mass_both():
    protected = torch.tensor([False, True, False, True])
    y = torch.tensor([0, 1, 2, 3])
    adv = [torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.1, 0.2], [0.25, 0.25, 0.25, 0.25], [0.0001, 0.0001, 0.0001, 0.9997]]))]
    assert protection_weight(y, adv, protected, "label").tolist() == [0.0, 1.0, 0.0, 1.0]
    mass = protection_weight(y, adv, protected, "mass")
    assert torch.allclose(mass, torch.tensor([0.2, 0.8, 0.5, 0.9998]), atol=1e-5)
    both = protection_weight(y, adv, protected, "both")
    assert torch.allclose(both, torch.tensor([0.2, 1.0, 0.5, 1.0]), atol=1e-5)
    # two adversaries: the mass is their mean
    adv2 = adv + [torch.log(torch.full((4, 4), 0.25))]
    assert torch.allclose(protection_weight(y, adv2, protected, "mass"), (mass + 0.5) / 2, atol=1e-5)


def test_class_selective_kl_acts_only_on_protected_samples():
    torch.manual_seed(0)
    d = get_defense("class-selective")(dcfg(name="class-selective", protect_classes=["1", "3"], omega=0.5), _Data(list("0123")))
    assert d.protected == [1, 3]
    z = torch.randn(6, 4, requires_grad=True)
    adv = [torch.randn(6, 4)]
    y = torch.tensor([0, 1, 2, 3, 0, 2])
    batch = Batch(torch.zeros(6, 1), y, torch.arange(6), False)
    loss = F.cross_entropy(z, y) - 0.5 * 16 * d.kl_term(z, batch, adv)
    (g,) = torch.autograd.grad(loss, z)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(z, y), z)
    unprotected = torch.tensor([True, False, True, False, True, True])
    assert torch.allclose(g[unprotected], g_ce[unprotected])  # only CE acts on unprotected samples
    assert not torch.allclose(g[~unprotected], g_ce[~unprotected])
    only_unprotected = Batch(torch.zeros(3, 1), torch.tensor([0, 2, 0]), torch.arange(3), False)
    assert d.kl_term(z[:3], only_unprotected, [a[:3] for a in adv]).item() == 0.0


def test_anchor_golden_and_only_on_unprotected_samples():
    from nasty.defenses.selective import anchor_kl

    # golden: one sample, tau 1: KL(p_A || p_T) with p_A = (0.5, 0.5), p_T = softmax(0, log 3) = (0.25, 0.75)
    z = torch.tensor([[0.0, math.log(3.0)]])
    a = [torch.zeros(1, 2)]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert anchor_kl(z, a, 1.0, torch.ones(1)).item() == pytest.approx(expected, rel=1e-6)
    assert anchor_kl(z, a, 2.0, torch.zeros(1)).item() == 0.0
    assert anchor_kl(a[0], a, 4.0, torch.ones(1)).item() == pytest.approx(0.0, abs=1e-7)  # teacher = adversary
    # in the defense: only the unprotected samples are pulled toward the adversary
    d = get_defense("class-selective")(dcfg(name="class-selective", protect_classes=["1"], anchor=2.0), _Data(list("0123")))
    torch.manual_seed(0)
    zz = torch.randn(4, 4, requires_grad=True)
    adv = [torch.randn(4, 4)]
    batch = Batch(torch.zeros(4, 1), torch.tensor([0, 1, 2, 1]), torch.arange(4), False)
    (g,) = torch.autograd.grad(d.extra_term(zz, batch, adv), zz)
    assert g[1].abs().sum() == 0 and g[3].abs().sum() == 0 and g[0].abs().sum() > 0
    assert get_defense("class-selective")(dcfg(name="class-selective", protect_classes=["1"]), _Data(list("0123"))).extra_term(
        zz, batch, adv) is None  # off by default
    with pytest.raises(NastyError, match="does not use anchor"):
        get_defense("nasty")(dcfg(anchor=1.0))


def test_class_selective_validation():
    cls = get_defense("class-selective")
    with pytest.raises(NastyError, match="needs --protect-classes"):
        cls(dcfg(name="class-selective"), _Data(list("0123")))
    with pytest.raises(NastyError, match="every class"):
        cls(dcfg(name="class-selective", protect_classes=["0", "1", "2", "3"]), _Data(list("0123")))
    with pytest.raises(NastyError, match="protect_by"):
        cls(dcfg(name="class-selective", protect_classes=["1"], protect_by="weight"), _Data(list("0123")))


def test_split_accuracy_from_confusion_matrix():
    cm = [[8, 2, 0], [1, 4, 5], [0, 0, 10]]
    assert split_accuracy({"confusion_matrix": cm}, [1]) == {"protected": 40.0, "other": 90.0}


# ------------------------------------------------------------------ several adversaries

def test_combine_golden_and_min_gradient():
    kls = [torch.tensor(1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True), torch.tensor(4.0, requires_grad=True)]
    assert combine_kls(kls, "mean").item() == pytest.approx(7 / 3)
    assert combine_kls(kls, "sum").item() == pytest.approx(7.0)
    m = combine_kls(kls, "min")
    assert m.item() == 1.0
    grads = torch.autograd.grad(m, kls)
    assert [g.item() for g in grads] == [1.0, 0.0, 0.0]  # min: only the closest adversary is pushed away
    grads = torch.autograd.grad(combine_kls(kls, "mean"), kls)
    assert [g.item() for g in grads] == pytest.approx([1 / 3] * 3)
    with pytest.raises(NastyError, match="combine"):
        combine_kls(kls, "max")


def test_multi_adversary_uses_combine_and_needs_two():
    cls = get_defense("multi-adversary")
    d = cls(dcfg(name="multi-adversary", adversary_model="cnn:width=0.5,mlp", combine="min"))
    z = torch.zeros(2, 3)
    batch = Batch(torch.zeros(2, 1), torch.tensor([0, 1]), torch.arange(2), False)
    near, far = torch.zeros(2, 3), torch.tensor([[5.0, 0, 0], [5.0, 0, 0]])
    assert d.kl_term(z, batch, [near, far]).item() == pytest.approx(0.0, abs=1e-7)
    d_mean = cls(dcfg(name="multi-adversary", adversary=["a", "b"]))
    assert d_mean.kl_term(z, batch, [near, far]).item() > 0
    with pytest.raises(NastyError, match="at least 2 adversaries"):
        cls(dcfg(name="multi-adversary", adversary_model="cnn"))


def test_split_model_specs():
    assert split_model_specs("cnn,mlp") == ["cnn", "mlp"]
    assert split_model_specs("cnn:width=0.5,mlp:hidden=32") == ["cnn:width=0.5", "mlp:hidden=32"]
    assert split_model_specs(" resnet20 , mlp:hidden=[64,32] ") == ["resnet20", "mlp:hidden=[64,32]"]
    assert split_model_specs("mlp:hidden=32,foo=1,cnn") == ["mlp:hidden=32,foo=1", "cnn"]
    assert split_model_specs(None) == []


def test_defenses_refuse_keys_they_ignore():
    with pytest.raises(NastyError, match="does not use max_accuracy_drop.*budget"):
        get_defense("nasty")(dcfg(max_accuracy_drop=0.5))
    with pytest.raises(NastyError, match="does not use combine"):
        get_defense("class-selective")(dcfg(protect_classes=["1"], combine="min"), _Data(list("0123")))
    with pytest.raises(NastyError, match="does not use protect_classes"):
        get_defense("multi-adversary")(dcfg(adversary=["a", "b"], protect_classes=["1"]))


# ------------------------------------------------------------------ accuracy budget

def test_omega_controller_dual_update_golden():
    c = OmegaController(omega=0.04, reference=90.0, max_drop=0.5, lr=0.5)
    assert c.floor == 89.5 and c.target == 89.75
    assert c.update(90.75) == pytest.approx(0.04 * math.e)  # 2 budgets above target: log step +1
    assert c.update(89.25) == pytest.approx(0.04 * math.e * math.exp(-0.5))  # 1 budget below: log step -0.5
    assert c.update(89.75) == pytest.approx(0.04 * math.exp(0.5))  # on target: unchanged
    assert c.update(10.0) == pytest.approx(0.04 * math.exp(0.5) * math.exp(-1))  # collapse: step capped at -1
    assert c.update(95.5, reference=96.0) == pytest.approx(0.04 * math.exp(0.5 - 1 - 0.25))  # per-epoch reference: target 95.75
    hi = OmegaController(omega=0.5, reference=90, max_drop=1.0, omega_max=0.6)
    assert hi.update(100.0) == 0.6
    lo = OmegaController(omega=2e-4, reference=90, max_drop=1.0)
    assert lo.update(0.0) == OMEGA_MIN
    with pytest.raises(NastyError, match="max_accuracy_drop"):
        OmegaController(omega=0.04, reference=90, max_drop=0.0)
    with pytest.raises(TrainingDiverged):
        c.update(float("nan"))


class _Constant(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.logits = logits

    def forward(self, x):
        return self.logits.expand(len(x), -1) + 0 * self.w


def _budget(digits, **kw):
    from nasty.train import Frozen, TrainConfig

    d = BudgetNasty(dcfg(name="budget", max_accuracy_drop=1.0, **kw), digits)
    d.train_config(TrainConfig(epochs=4))
    torch.manual_seed(0)
    adv = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # an untrained adversary: only its outputs matter here
    d._objective_for_test = d.objective([Frozen(adv, len(digits.y_train))])
    return d


def test_budget_collapse_raises_clear_error(digits):
    d = _budget(digits)
    d.controller.reference, d.controller.omega = 95.0, OMEGA_MIN  # a normal model at 95%, omega already at its floor
    dead = _Constant(torch.zeros(1, 10))  # predicts class 0 everywhere: chance accuracy
    d.end_epoch(dead, 0)
    with pytest.raises(TrainingDiverged, match="collapsed"):
        d.end_epoch(dead, 1)


def test_budget_selection_prefers_nastiest_epoch_within_target(digits, small_teacher):
    from nasty.metrics import accuracy, predict_logits

    d = _budget(digits)
    d.controller.reference = accuracy(predict_logits(small_teacher, digits.x_val).argmax(1), digits.y_val)
    bad = _Constant(torch.zeros(1, 10))
    hook = d._objective_for_test.end_of_epoch  # what fit calls after each epoch
    hook(small_teacher, 1)
    hook(bad, 2)  # inaccurate (below the floor) but far from the adversary: never kept
    hook(small_teacher, 3)
    info = d.finish(small_teacher)
    assert info["selected_epoch"] == 1 and info["budget_met"] and info["selected_by"] == "target"
    assert len(info["history"]) == 3 and info["history"][1]["val_accuracy"] < info["floor_val_accuracy"]


def test_budget_state_survives_resume(digits, small_teacher):
    d = _budget(digits)
    d.end_epoch(small_teacher, 0)
    d.end_epoch(_Constant(torch.zeros(1, 10)), 1)
    d._epoch = 2
    tensors, meta = d.resume_state()
    e = _budget(digits)
    assert e._objective_for_test.state is e  # fit saves the controller with its own state
    e.load_resume_state(tensors, json.loads(json.dumps(meta)))  # the state goes through JSON on disk
    assert e.controller.omega == d.controller.omega and e.rows == d.rows and e._epoch == 2
    assert set(e._states) == set(d._states)
    for tier in d._states:
        assert e._states[tier][0] == d._states[tier][0]
        assert all(torch.equal(e._states[tier][1]["state"][k], v) for k, v in d._states[tier][1]["state"].items())
    assert e.finish(small_teacher)["selected_epoch"] == d.finish(small_teacher)["selected_epoch"]


def test_budget_validation():
    with pytest.raises(NastyError, match="needs --max-accuracy-drop"):
        BudgetNasty(dcfg(name="budget"))
    with pytest.raises(NastyError, match="omega_max"):
        BudgetNasty(dcfg(name="budget", max_accuracy_drop=0.5, omega=0.5, omega_max=0.1))
    with pytest.raises(NastyError, match="dual_lr"):
        BudgetNasty(dcfg(name="budget", max_accuracy_drop=0.5, dual_lr=0.0))


# ------------------------------------------------------------------ tiny end-to-end runs on digits

def _cfg(defense: dict, epochs: int = 4) -> dict:
    return load_config(None, {"model": {"name": "cnn:width=0.25"}, "train": {"epochs": epochs, "batch_size": 64, "seed": 0},
                              "defense": {"lock": "none", **defense}, "probe": {"enabled": False}})


def _per_sample_kl(out: Path, digits, tau: float = 4.0) -> torch.Tensor:
    from nasty.checkpoint import load_checkpoint
    from nasty.losses import tempered_log_softmax
    from nasty.metrics import predict_logits

    t, _ = load_checkpoint(out / "defended")
    a, _ = load_checkpoint(out / "normal")
    lp, la = (tempered_log_softmax(predict_logits(m, digits.x_test), tau) for m in (t, a))
    return (lp.exp() * (lp - la)).sum(1)


def test_end_to_end_class_selective(tmp_path, digits):
    out = tmp_path / "sel"
    r = train_defended(_cfg({"name": "class-selective", "protect_classes": ["3", "5", "8"], "omega": 0.06}, epochs=5), out, log=lambda m: None)
    assert r["protected_classes"] == ["3", "5", "8"]
    assert set(r["defended_split_accuracy"]) == {"protected", "other"}
    kl = _per_sample_kl(out, digits)
    prot = torch.isin(digits.y_test, torch.tensor([3, 5, 8]))
    # the teacher departs from the adversary on protected classes, much less elsewhere (measured ~0.12 vs ~0.03)
    assert kl[prot].mean() > 2 * kl[~prot].mean()
    side = json.loads((out / "defended" / "model.json").read_text())
    assert side["defense"]["name"] == "class-selective" and side["defense"]["protect_classes"] == ["3", "5", "8"]


def test_end_to_end_several_adversary_architectures(tmp_path):
    out = tmp_path / "multi"
    r = train_defended(_cfg({"name": "multi-adversary", "adversary_model": "cnn:width=0.25,mlp:hidden=32", "combine": "min"}, epochs=3),
                       out, log=lambda m: None)
    assert (out / "normal" / "model.safetensors").is_file() and (out / "normal-1-mlp-hidden-32" / "model.safetensors").is_file()
    side = json.loads((out / "defended" / "model.json").read_text())
    assert len(side["adversaries"]) == 2 and side["defense"]["combine"] == "min"
    assert r["normal_checkpoint"] == str(out / "normal")
    kl = [json.loads(l)["kl_adv"] for l in (out / "defended" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for v in kl) and kl[-1] > 0


def test_end_to_end_budget(tmp_path, digits):
    out = tmp_path / "budget"
    r = train_defended(_cfg({"name": "budget", "max_accuracy_drop": 2.0, "omega": 0.04, "init_from": "adversary"}, epochs=4),
                       out, log=lambda m: None)
    info = r["defense_info"]
    assert len(info["history"]) == 4 and 1 <= info["selected_epoch"] <= 4
    assert info["kl_cap"] == 2.0 and info["floor_val_accuracy"] == pytest.approx(info["reference_val_accuracy"] - 2.0)
    assert info["val_resolution"] == pytest.approx(100.0 / len(digits.y_val))
    omegas = [h["omega"] for h in info["history"]]
    assert len(set(omegas)) > 1  # the controller moved omega
    if info["budget_met"]:
        assert info["val_accuracy"] >= info["floor_val_accuracy"]
    assert all(h["reference"] == info["reference_val_accuracy"] for h in info["history"])  # fine-tuning: final reference


def test_budget_from_scratch_follows_normal_curve(tmp_path):
    out = tmp_path / "budget"
    r = train_defended(_cfg({"name": "budget", "max_accuracy_drop": 2.0}, epochs=3), out, log=lambda m: None)
    curve = [json.loads(l)["val_accuracy"] for l in (out / "normal" / "metrics.jsonl").read_text().splitlines()]
    assert [h["reference"] for h in r["defense_info"]["history"]] == pytest.approx(curve)


def test_cli_defense_errors_one_line(run_cli, tmp_path):
    for args, msg in [
        (["--defense", "class-selective"], "needs --protect-classes"),
        (["--defense", "class-selective", "--protect-classes", "3,eleven"], "unknown class 'eleven'"),
        (["--defense", "budget", "--max-accuracy-drop", "-1"], "must be positive"),
        (["--defense", "nasty", "--combine", "min"], "does not use combine"),
        (["--defense", "multi-adversary"], "at least 2 adversaries"),
    ]:
        rc, out, err = run_cli("train-defended", *args, "--no-probe", "--out", tmp_path / "x", "--force")
        assert rc == 2, (args, err)
        assert err.strip().count("\n") == 0 and msg in err, (args, err)
