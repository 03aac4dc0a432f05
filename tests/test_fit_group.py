"""Several students in one pass over the data (nasty.train.fit_group, nasty.attacks.run_attacks_together):
each must get exactly what it gets when trained alone; the teacher runs once per batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nasty.attacks import can_share_pass, prepare_attack, run_attack, run_attacks_together
from nasty.errors import NastyError, TrainingDiverged
from nasty.train import Member, TrainConfig, ce_objective, fit_group

CFG = TrainConfig(epochs=2, batch_size=64, lr=0.05, seed=3, deterministic=True)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_shared_pass_equals_separate_runs(digits, small_teacher):
    methods = [("scratch", "mlp"), ("label-smoothing", "mlp"), ("kd", "mlp"), ("kd", "cnn:width=0.25"), ("averager", "mlp")]
    alone = [run_attack(m, data=digits, teachers=[small_teacher], student=s, train=CFG) for m, s in methods]
    prepared = [prepare_attack(m, data=digits, teachers=[small_teacher], student=s, train=CFG) for m, s in methods]
    together = run_attacks_together(prepared)
    for (m, s), (ma, ra), out in zip(methods, alone, together):
        assert not isinstance(out, Exception)
        mt, rt = out
        assert _same_weights(ma, mt), f"{m}/{s}: weights differ between the shared pass and a run alone"
        assert rt["accuracy"] == ra["accuracy"] and rt["per_class_accuracy"] == ra["per_class_accuracy"]
        assert rt["resources"]["queries"] == ra["resources"]["queries"]  # still counted per attacker
        assert rt["trained_with"] == len(methods)


def test_teacher_runs_once_per_augmented_batch(digits, small_teacher):
    """With augmentation the teacher's outputs cannot be cached; students sharing a pass share its answers."""
    aug = dataclasses.replace(digits, augment="crop")
    calls = {"n": 0}
    hook = small_teacher.register_forward_pre_hook(lambda mod, inp: calls.__setitem__("n", calls["n"] + len(inp[0])))
    try:
        prepared = [prepare_attack("kd", data=aug, teachers=[small_teacher], student=s, train=CFG)
                    for s in ("mlp", "mlp:hidden=32", "cnn:width=0.25")]
        calls["n"] = 0
        outs = run_attacks_together(prepared)
        shared = calls["n"]
        calls["n"] = 0
        alone = [run_attack("kd", data=aug, teachers=[small_teacher], student=s, train=CFG)
                 for s in ("mlp", "mlp:hidden=32", "cnn:width=0.25")]
        separate = calls["n"]
    finally:
        hook.remove()
    n_train = len(aug.y_train) * CFG.epochs
    assert separate >= 3 * n_train  # alone, each run sends every augmented batch to the teacher
    assert shared < separate / 2
    assert shared >= n_train  # every augmented batch was answered once
    for (mt, rt), (ma, ra) in zip(outs, alone):
        assert _same_weights(mt, ma)
        assert rt["resources"]["queries"] == ra["resources"]["queries"]


def test_one_diverging_member_does_not_stop_the_others(digits):
    from nasty.models import create_model

    def nan_objective(model, batch, epoch):
        loss = torch.nn.functional.cross_entropy(model(batch.x), batch.y)
        return loss * float("nan"), {}

    good = create_model("mlp", digits.num_classes, digits.in_channels, digits.image_size)
    bad = create_model("mlp", digits.num_classes, digits.in_channels, digits.image_size)
    res = fit_group([Member(good, ce_objective(), desc="good"), Member(bad, nan_objective, desc="bad")], digits, CFG,
                    log=None, errors="collect")
    assert not isinstance(res[0], Exception) and res[0].best_val_accuracy > 50
    assert isinstance(res[1], TrainingDiverged) and "bad: loss is nan" in str(res[1])
    with pytest.raises(TrainingDiverged):
        fit_group([Member(bad, nan_objective, desc="bad")], digits, CFG, log=None)


def test_refuses_what_cannot_share_a_pass(digits, small_teacher):
    assert can_share_pass("kd") and can_share_pass("scratch") and not can_share_pass("tllm")
    a = prepare_attack("kd", data=digits, teachers=[small_teacher], student="mlp", train=CFG)
    b = prepare_attack("kd", data=digits, teachers=[small_teacher], student="mlp", train=dataclasses.replace(CFG, seed=4))
    with pytest.raises(NastyError, match="same images"):
        run_attacks_together([a, b])
    t = prepare_attack("tllm", data=digits, teachers=[small_teacher], student="mlp", train=CFG)
    with pytest.raises(NastyError, match="several stages"):
        run_attacks_together([t])
