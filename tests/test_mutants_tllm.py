"""TLLM's loss on mixed batches and its small helpers, written out from the module doc (issue 15: mutmut over
nasty/attacks/tllm.py). The identification itself (TLLM.train) is covered by tests/test_mutants_attacks.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nasty.attacks import get_attack
from nasty.attacks.augment import Mixed
from nasty.attacks.base import kd_per_sample
from nasty.attacks.tllm import class_accuracy, deltas, every_kth_epoch, subset_accuracy, tllm_loss
from nasty.data import Batch
from nasty.errors import NastyError


def _mixed(y, y2, lam):
    return Mixed(Batch(torch.zeros(len(y), 1), y, torch.arange(len(y)), True), y2, lam)


@pytest.mark.parametrize("discard", ["kd-term", "ce-full", "drop"])
def test_tllm_loss_on_a_mixed_batch(discard):
    """Sample i is lam parts y[i] and 1 - lam parts y2[i]; each part is distilled unless its class is in U."""
    g = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g) * 2
    y, y2 = torch.tensor([0, 1, 2, 1, 0]), torch.tensor([1, 1, 0, 2, 2])
    U = torch.tensor([False, True, False])
    lam, T, a = 0.7, 2.0, 0.6
    u1, u2 = U[y].float(), U[y2].float()
    keep = lam * (1 - u1) + (1 - lam) * (1 - u2)
    kl = kd_per_sample(zs, zt, T)
    ce1, ce2 = F.cross_entropy(zs, y, reduction="none"), F.cross_entropy(zs, y2, reduction="none")
    ce_keep = lam * (1 - u1) * ce1 + (1 - lam) * (1 - u2) * ce2
    ce_u = lam * u1 * ce1 + (1 - lam) * u2 * ce2
    want = {"kd-term": (a * keep * kl + (1 - a) * (ce_keep + ce_u)).mean(),
            "ce-full": (a * keep * kl + (1 - a) * ce_keep + ce_u).mean(),
            "drop": (a * keep * kl + (1 - a) * ce_keep).sum() / keep.sum()}[discard]
    loss, terms = tllm_loss(zs, zt, _mixed(y, y2, lam), U, T, a, discard)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert terms["kd_kl"] == pytest.approx((kl.mean() / T ** 2).item(), rel=1e-6)
    assert terms["ce"] == pytest.approx((ce_keep + ce_u).mean().item(), rel=1e-6)
    assert terms["discarded"] == pytest.approx((1 - keep).mean().item(), rel=1e-6)


def test_tllm_drop_with_everything_discarded_is_zero_not_nan():
    zs, zt = torch.randn(2, 2), torch.randn(2, 2)
    y = torch.tensor([1, 1])
    loss, _ = tllm_loss(zs, zt, _mixed(y, y, 1.0), torch.tensor([False, True]), 2.0, 0.5, "drop")
    assert loss.item() == 0.0
    with pytest.raises(NastyError) as e:
        tllm_loss(zs, zt, _mixed(y, y, 1.0), torch.tensor([False, True]), 2.0, 0.5, "nope")
    assert str(e.value) == "discard must be one of kd-term, ce-full, drop, got 'nope'"


def test_helpers():
    assert deltas([90.0, None, 50.0, 10.0], [80.0, 70.0, None, 30.0]) == [10.0, None, None, -20.0]
    pred, y = torch.tensor([0, 1, 1, 2, 2, 2]), torch.tensor([0, 1, 2, 2, 2, 1])
    assert subset_accuracy(pred, y, [2]) == pytest.approx(200 / 3)
    assert subset_accuracy(pred, y, [0, 1]) == pytest.approx(200 / 3)
    assert subset_accuracy(pred, y, []) is None and subset_accuracy(pred, y, [3]) is None
    model = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, -1.0]])
    assert class_accuracy(model, x, torch.tensor([0, 1, 0, 2]), 4) == [50.0, 100.0, 100.0, None]


def test_every_kth_epoch_skips_the_last():
    seen = []
    hook = every_kth_epoch(lambda m, e: seen.append((m, e)), 2, 7)
    for done in range(1, 8):
        hook("m", done)
    assert seen == [("m", 2), ("m", 4), ("m", 6)]
    seen.clear()
    hook = every_kth_epoch(lambda m, e: seen.append(e), 3, 6)
    for done in range(1, 7):
        hook(None, done)
    assert seen == [3]


@pytest.mark.parametrize("key,value", [("eval_every", 0), ("eval_every", 1.5), ("patience", 0), ("patience", -1),
                                       ("prelim_epochs", 0), ("prelim_epochs", True)])
def test_tllm_settings_refused_with_their_name(key, value):
    with pytest.raises(NastyError) as e:
        get_attack("tllm")(**{key: value}).validate()
    assert f"tllm {key} must be a positive integer, got {value!r}" in str(e.value)


def test_tllm_settings_at_their_bounds_accepted():
    get_attack("tllm")(eval_every=1, patience=1, prelim_epochs=1).validate()
    get_attack("tllm")(prelim_epochs=None).validate()


# -- what TLLM reports about its identification (scripted per-class accuracies, as in test_mutants_attacks.py)

CE_VAL = [90.0] * 10
KD_VAL = [90.0, 85.0, 88.5, 87.9, 88.0, 91.0, 90.0, 90.0, 90.0, 90.0]  # deltas 0, -5, -1.5, -2.1, -2 (at the bar), +1


@pytest.fixture
def scripted(monkeypatch):
    import nasty.attacks.tllm as tllm_mod

    first: list = []

    def fake(model, x, y, num_classes):
        if not first:
            first.append(model)
        return list(CE_VAL if model is first[0] else globals()["KD_VAL"])

    monkeypatch.setattr(tllm_mod, "class_accuracy", fake)
    flags_seen: list = []
    real = tllm_mod.tllm_loss

    def spy(student_logits, teacher_logits, m, undistillable, *a, **k):
        flags_seen.append(undistillable.clone())
        return real(student_logits, teacher_logits, m, undistillable, *a, **k)

    monkeypatch.setattr(tllm_mod, "tllm_loss", spy)
    return flags_seen


@pytest.mark.parametrize("mode", ["oneshot", "online"])
def test_tllm_reports_its_identification(digits, small_teacher, scripted, mode):
    """The classes identified are the ones the final run stops distilling; a class exactly at -delta is not one;
    online, a class enters after ``patience`` consecutive evaluations below the bar."""
    from nasty.attacks import run_attack
    from nasty.metrics import predict_logits
    from nasty.train import TrainConfig

    params = {"mode": mode, "delta": 2.0, "min_val": 1}  # per-class identification even on digits' 14 validation images a class
    params.update({"prelim_epochs": 1} if mode == "oneshot" else {"patience": 2, "eval_every": 1})
    cfg = TrainConfig(epochs=1 if mode == "oneshot" else 3, batch_size=256, seed=0)
    model, res = run_attack("tllm", data=digits, teachers=[small_teacher], student="mlp:hidden=16", train=cfg,
                            log=lambda m: None, params=params)
    info = res["identification"]
    assert {k: info[k] for k in ("mode", "split", "n_val", "delta_threshold")} == {
        "mode": mode, "split": "attacker validation split", "n_val": len(digits.y_val), "delta_threshold": 2.0}
    if mode == "oneshot":
        assert info["ce_val_per_class"] == CE_VAL and info["kd_val_per_class"] == KD_VAL
    else:
        assert info["entered_after_epoch"] == {"1": 2, "3": 2} and info["eval_every"] == 1 and info["patience"] == 2
        assert [h["epoch"] for h in info["history"]] == [1, 2]
        assert info["history"][0]["delta"][1] == pytest.approx(-5.0)
    assert res["undistillable_classes"] == [1, 3]
    assert scripted[-1].tolist() == [c in (1, 3) for c in range(10)]  # the last step of the final run discards U
    pred = predict_logits(model, digits.x_test).argmax(1)
    assert res["accuracy_undistillable"] == pytest.approx(subset_accuracy(pred, digits.y_test, [1, 3]))
    assert res["accuracy_distillable"] == pytest.approx(subset_accuracy(pred, digits.y_test, [0, 2, 4, 5, 6, 7, 8, 9]))
    assert res["best_epoch"] >= 1 and 0 <= res["val_accuracy"] <= 100


@pytest.mark.parametrize("mode", ["oneshot", "online"])
def test_tllm_preliminary_runs_are_named_and_kept_apart(digits, small_teacher, tmp_path, mode):
    """The preliminary runs log under their own names and into run_dir/prelim-ce and run_dir/prelim-kd;
    ``prelim_epochs`` shortens them (oneshot), the final run keeps the run's epochs."""
    from nasty.attacks import run_attack
    from nasty.train import TrainConfig

    logs: list[str] = []
    params = {"mode": mode, "prelim_epochs": 1} if mode == "oneshot" else {"mode": mode, "patience": 5}
    run_attack("tllm", data=digits, teachers=[small_teacher], student="mlp:hidden=16",
               train=TrainConfig(epochs=2, batch_size=256, seed=0), log=logs.append, params=params, out_dir=tmp_path)
    epochs = [ln.split("]")[0] + "] " + ln.split()[2] for ln in logs if " epoch " in ln]
    if mode == "oneshot":
        assert epochs == ["[tllm-ce:mlp:hidden=16] 1/1", "[tllm-kd:mlp:hidden=16] 1/1",
                          "[tllm:mlp:hidden=16] 1/2", "[tllm:mlp:hidden=16] 2/2"]
        assert any(ln.startswith("[tllm] undistillable classes [") and ln.endswith("(delta < -0 on validation)")
                   for ln in logs)
        subdirs = ("prelim-ce", "prelim-kd")
    else:
        assert epochs == ["[tllm-ce:mlp:hidden=16] 1/2", "[tllm-ce:mlp:hidden=16] 2/2",
                          "[tllm:mlp:hidden=16] 1/2", "[tllm:mlp:hidden=16] 2/2"]
        subdirs = ("prelim-ce",)
    for sub in subdirs:
        n = len((tmp_path / sub / "metrics.jsonl").read_text().splitlines())
        assert n == (1 if mode == "oneshot" else 2), sub
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("kd_val, expected", [(KD_VAL, []), ([80.0] * 10, list(range(10)))])
def test_tllm_falls_back_to_one_global_decision_on_a_thin_validation_split(digits, small_teacher, scripted, kd_val, expected,
                                                                           monkeypatch):
    """Fewer than min_val validation images in a class: per-class deltas are noise, so U is every class when KD
    loses more than delta overall (n-weighted) on validation, else empty; the run says so."""
    from nasty.attacks import run_attack
    from nasty.train import TrainConfig

    monkeypatch.setitem(globals(), "KD_VAL", kd_val)
    per_class = torch.bincount(digits.y_val, minlength=10)
    assert int(per_class.min()) < 20  # digits' validation split is thin: the default min_val applies
    _, res = run_attack("tllm", data=digits, teachers=[small_teacher], student="mlp:hidden=16", log=lambda m: None,
                        train=TrainConfig(epochs=1, batch_size=256, seed=0), params={"delta": 2.0, "prelim_epochs": 1})
    fb = res["identification"]["global_fallback"]
    n = per_class.tolist()
    assert fb["overall_delta"] == pytest.approx(sum(k * (kv - 90.0) for k, kv in zip(n, kd_val)) / sum(n))
    assert res["undistillable_classes"] == expected
    assert any("one global decision" in note for note in res["notes"])


def test_tllm_drop_of_every_class_is_a_failed_attack_not_a_result(digits, small_teacher, scripted, monkeypatch):
    from nasty.attacks import run_attack
    from nasty.errors import TrainingDiverged
    from nasty.train import TrainConfig

    monkeypatch.setitem(globals(), "KD_VAL", [50.0] * 10)
    with pytest.raises(TrainingDiverged, match="nothing to train on"):
        run_attack("tllm", data=digits, teachers=[small_teacher], student="mlp:hidden=16", log=lambda m: None,
                   train=TrainConfig(epochs=1, batch_size=256, seed=0), params={"prelim_epochs": 1, "discard": "drop"})
