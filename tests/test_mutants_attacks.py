"""Tests that kill mutants of the attack side (issue 15): each checks a behaviour a user relies on and
fails when one deliberate one-line breakage is applied (``benchmarks/mutation.py`` lists them).

- KD uses the ``--temperature`` it is given (not 1);
- the answers the attacker's oracle gives are the *defended* answers (``--output-defense topk:2``:
  exactly two classes revealed per image);
- TLLM identifies its undistillable classes on the attacker's validation split, never the test
  split, with the threshold ``delta_c < -delta`` exactly;
- the probe's "KD from the defended teacher" distils from the defended teacher.
"""

from __future__ import annotations

import json

import pytest
from conftest import save_trained_teacher
import torch
import torch.nn as nn

from nasty.attacks import prepare_attack, run_attack
from nasty.attacks.base import Oracle
from nasty.data import Batch
from nasty.defenses.output import parse_output_defense
from nasty.losses import kd_loss
from nasty.train import TrainConfig


def quiet(msg: str) -> None:
    pass


class Shifted(nn.Module):
    """A teacher whose logits are rotated by one class: confidently wrong on every class."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).roll(1, dims=1)


@pytest.fixture(scope="module")
def teacher_dir(digits, tmp_path_factory):
    """A small digits teacher saved as a checkpoint."""
    return save_trained_teacher(digits, tmp_path_factory.mktemp("teacher"), "cnn:width=0.25", 3)


@pytest.fixture
def seen_by_kd(monkeypatch):
    """Records what the KD attack's loss receives: the temperature and the teacher's answers."""
    import nasty.attacks.kd as kd_mod

    calls: list[dict] = []
    real = kd_mod.distill_loss

    def spy(student_logits, teacher_logits, m, temperature, alpha, labels):
        calls.append({"T": temperature, "alpha": alpha, "teacher": teacher_logits.detach().clone()})
        return real(student_logits, teacher_logits, m, temperature, alpha, labels)

    monkeypatch.setattr(kd_mod, "distill_loss", spy)
    return calls


# ---------------------------------------------------------------- KD temperature


def _first_batch(digits, n: int = 64) -> Batch:
    idx = torch.arange(n)
    return Batch(digits.x_train[idx], digits.y_train[idx], idx, False)


def test_kd_objective_is_hinton_kd_at_the_given_temperature(digits, small_teacher):
    from nasty.models import create_model

    batch = _first_batch(digits)
    torch.manual_seed(0)
    student = create_model("mlp:hidden=16", digits.num_classes, digits.in_channels, digits.image_size)
    with torch.no_grad():
        z_t = small_teacher(batch.x)
    losses = {}
    for T in (1.0, 7.0):
        prep = prepare_attack("kd", data=digits, teachers=[small_teacher], student="mlp:hidden=16",
                              train=TrainConfig(epochs=1, batch_size=64), params={"temperature": T, "alpha": 0.6})
        loss, terms = prep.attack.objective(prep.ctx, student)(student, batch, 0)
        expected, _ = kd_loss(student(batch.x), z_t, batch.y, T, 0.6)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6), T
        losses[T] = loss.item()
    assert abs(losses[7.0] - losses[1.0]) > 1e-3  # the temperature matters at all


def test_cli_kd_temperature_reaches_the_loss(run_cli, teacher_dir, tmp_path, seen_by_kd):
    rc, out, err = run_cli("attack", "--method", "kd", "--teacher", teacher_dir, "--student", "mlp:hidden=16", "--epochs", "1",
                           "--temperature", "7", "--alpha", "0.5", "--out", tmp_path / "kd", "--json")
    assert rc == 0, err
    assert seen_by_kd and {c["T"] for c in seen_by_kd} == {7.0} and {c["alpha"] for c in seen_by_kd} == {0.5}
    assert json.loads(out)["params"]["temperature"] == 7.0


# ---------------------------------------------------------------- the oracle behind an output defense


def _revealed(logit_like: torch.Tensor) -> torch.Tensor:
    """Classes the oracle revealed per row: probability > 0 (log p finite)."""
    return torch.isfinite(logit_like).sum(1)


def test_oracle_reveals_only_what_its_access_level_allows(digits, small_teacher):
    x = digits.x_test[:50]
    with torch.no_grad():
        z = small_teacher(x)
    log_p = torch.log_softmax(z, 1)
    assert torch.equal(Oracle(small_teacher, "logits")(x), z)
    assert torch.allclose(Oracle(small_teacher, "probs")(x), log_p, atol=1e-5)
    top3 = Oracle(small_teacher, "topk:3")(x)
    assert (_revealed(top3) == 3).all()
    kept = torch.isfinite(top3)
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(1, z.topk(3, 1).indices, True))  # the 3 largest
    assert torch.allclose(top3[kept], log_p[kept], atol=1e-5)
    label = Oracle(small_teacher, "label")(x)
    assert (_revealed(label) == 1).all() and torch.equal(label.argmax(1), z.argmax(1))
    assert (label[torch.isfinite(label)] == 0).all()  # log 1: nothing but the decision


@pytest.mark.parametrize("query", ["logits", "probs", "weights"])
def test_oracle_applies_the_output_defense(digits, small_teacher, query):
    x = digits.x_test[:50]
    plain = Oracle(small_teacher, query)(x)
    assert (_revealed(plain) == 10).all()
    defended = Oracle(small_teacher, query, parse_output_defense("topk:2"))(x)
    assert (_revealed(defended) == 2).all()
    p = torch.softmax(small_teacher(x), 1)
    expected = parse_output_defense("topk:2")(p)
    assert torch.allclose(torch.softmax(defended, 1), expected, atol=1e-6)


def test_run_attack_queries_through_the_output_defense(digits, small_teacher, seen_by_kd):
    _, res = run_attack("kd", data=digits, teachers=[small_teacher], student="mlp:hidden=16",
                        train=TrainConfig(epochs=1, batch_size=256, seed=0), log=quiet,
                        output_defense=parse_output_defense("topk:2"))
    answers = torch.cat([c["teacher"] for c in seen_by_kd])
    assert len(answers) == len(digits.y_train) and (_revealed(answers) == 2).all()
    assert res["resources"]["output_defense"] == "topk:k=2"


def test_cli_output_defense_is_what_the_attacker_sees(run_cli, teacher_dir, tmp_path, seen_by_kd):
    rc, out, err = run_cli("attack", "--method", "kd", "--teacher", teacher_dir, "--student", "mlp:hidden=16", "--epochs", "1",
                           "--output-defense", "topk:2", "--out", tmp_path / "kd", "--json")
    assert rc == 0, err
    answers = torch.cat([c["teacher"] for c in seen_by_kd])
    assert len(answers) > 0 and (_revealed(answers) == 2).all()
    assert json.loads(out)["resources"]["output_defense"] == "topk:k=2"


# ---------------------------------------------------------------- TLLM: validation split and threshold

CE_VAL = [90.0] * 10
KD_VAL = [90.0, 85.0, 88.5, 87.9, 90.0, 91.0, 90.0, 90.0, 90.0, 90.0]  # deltas 0, -5, -1.5, -2.1, 0, +1, ...
KD_TEST = [90.0, 90.0, 90.0, 90.0, 90.0, 90.0, 80.0, 90.0, 90.0, 90.0]  # what the test split would say


@pytest.fixture
def scripted_class_accuracy(monkeypatch, digits):
    """TLLM's per-class accuracies, scripted: the label-only student (the first model evaluated) scores
    ``CE_VAL``; a KD student scores ``KD_VAL`` on the validation split and ``KD_TEST`` anywhere else."""
    import nasty.attacks.tllm as tllm_mod

    first: list = []
    splits: list[str] = []

    def fake(model, x, y, num_classes):
        if not first:
            first.append(model)
        on_val = x.shape == digits.x_val.shape and torch.equal(x, digits.x_val) and torch.equal(y, digits.y_val)
        splits.append("val" if on_val else "other")
        if model is first[0]:
            return list(CE_VAL)
        return list(KD_VAL if on_val else KD_TEST)

    monkeypatch.setattr(tllm_mod, "class_accuracy", fake)
    return splits


@pytest.mark.parametrize("mode", ["oneshot", "online"])
def test_tllm_identifies_on_validation_with_the_exact_threshold(digits, small_teacher, scripted_class_accuracy, mode):
    params = {"mode": mode, "delta": 2.0, "min_val": 1}  # per-class identification on digits' thin validation split
    params.update({"prelim_epochs": 1} if mode == "oneshot" else {"patience": 1, "eval_every": 1})
    cfg = TrainConfig(epochs=1 if mode == "oneshot" else 2, batch_size=256, seed=0)
    _, res = run_attack("tllm", data=digits, teachers=[small_teacher], student="mlp:hidden=16", train=cfg, log=quiet, params=params)
    assert scripted_class_accuracy and set(scripted_class_accuracy) == {"val"}  # TLLM never scores on another split
    # delta_c < -2 exactly: class 1 (-5) and 3 (-2.1); not class 2 (-1.5, inside a halved threshold)
    assert res["undistillable_classes"] == [1, 3]
    assert res["delta"][1] == pytest.approx(-5.0) and res["delta"][2] == pytest.approx(-1.5)
    assert res["identification"]["delta_threshold"] == 2.0


# ---------------------------------------------------------------- the probe distils from the defended teacher


def test_probe_kd_from_defended_uses_the_defended_teacher(digits, tiny_teacher, tmp_path):
    from nasty.config import load_config
    from nasty.pipelines.probe import run_probe

    cfg = load_config(None, {"probe": {"students": ["mlp:hidden=32"]},
                             "train": {"epochs": 3, "batch_size": 64, "lr": 0.05, "seed": 0}})
    wrong = Shifted(tiny_teacher).eval()  # a "defended" teacher that teaches the wrong class everywhere
    res = run_probe(cfg, digits, tiny_teacher, wrong, tmp_path, quiet)
    row = res["students"][0]
    assert row["kd_normal_accuracy"] > 80, row
    # KD from the wrong teacher (alpha 0.9) drags the student far below both labels alone and KD from normal
    assert row["kd_defended_accuracy"] < row["scratch_accuracy"] - 20, row
    assert row["kd_defended_accuracy"] < row["kd_normal_accuracy"] - 20, row
    assert row["kd_gain_defended"] == pytest.approx(row["kd_defended_accuracy"] - row["scratch_accuracy"])
