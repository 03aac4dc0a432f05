"""Numerical faults: a NaN/inf loss stops the run with one line naming epoch, step and loss terms,
and the last good weights stay on disk (``last_good/`` checkpoint and the last epoch's training state)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from nasty.checkpoint import load_checkpoint
from nasty.errors import TrainingDiverged
from nasty.models import create_model
from nasty.train import TrainConfig, ce_objective, fit, state_path


def nan_at(epoch_k: int, step_k: int):
    """Cross-entropy, except at (epoch_k, step_k) (1-based) where the loss is NaN."""
    ce = ce_objective()

    def objective(model, batch, epoch):
        loss, _ = ce(model, batch, epoch)
        objective.step = getattr(objective, "step", 0) + 1 if getattr(objective, "epoch", None) == epoch else 1
        objective.epoch = epoch
        if (epoch + 1, objective.step) == (epoch_k, step_k):
            loss = loss * float("nan")
        return loss, {"ce": float(loss), "kl_adv": 0.25}

    return objective


def test_nan_loss_stops_with_one_line_and_keeps_last_good(digits, tmp_path):
    torch.manual_seed(0)
    model = create_model("mlp:hidden=16", 10, 1, (8, 8))
    cfg = TrainConfig(epochs=4, batch_size=64, select="last")
    with pytest.raises(TrainingDiverged) as exc:
        fit(model, nan_at(2, 3), digits, cfg, run_dir=tmp_path, desc="defended:nasty", save_state=True, log=None)
    msg = str(exc.value)
    assert "\n" not in msg and exc.value.exit_code == 3
    assert "defended:nasty: loss is nan at epoch 2, step 3 (ce=nan, kl_adv=0.25)" in msg
    assert "best weights so far (epoch 1)" in msg and str(tmp_path / "last_good") in msg
    # the last good weights: in the model, as a loadable checkpoint, and in the epoch-1 training state
    good, side = load_checkpoint(tmp_path / "last_good")
    assert side["diverged"] == msg.split("; the best")[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), good.state_dict().values()))
    with safe_open(str(state_path(tmp_path, "defended:nasty")), framework="pt") as f:
        assert json.loads(f.metadata()["nasty"])["epoch"] == 1
        assert torch.equal(f.get_tensor("model/head.weight"), good.state_dict()["head.weight"])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_nan_in_first_epoch_keeps_nothing(digits, tmp_path):
    model = create_model("mlp:hidden=16", 10, 1, (8, 8))
    with pytest.raises(TrainingDiverged, match="epoch 1, step 1 .*no epoch completed"):
        fit(model, nan_at(1, 1), digits, TrainConfig(epochs=2), run_dir=tmp_path, log=None)
    assert not (tmp_path / "last_good").exists()


def test_inf_weights_with_finite_loss_are_caught(digits):
    """The last step of an epoch may turn the weights to inf while its loss was finite."""
    model = create_model("mlp:hidden=16", 10, 1, (8, 8))

    def objective(m, batch, epoch):  # finite loss, gradient 1e30: one step of lr 1e30 overflows the bias to -inf
        return (m.head.bias * 1e30).sum() + 0 * m(batch.x).sum(), {}

    with pytest.raises(TrainingDiverged, match="weights became NaN/inf during epoch 1"):
        fit(model, objective, digits, TrainConfig(epochs=1, lr=1e30, momentum=0.0, weight_decay=0.0, batch_size=2000), log=None)


def test_cli_huge_omega_is_refused_before_training(run_cli, tmp_path):
    """The nasty objective is unbounded below: an absurd omega (1e38) used to overflow the loss to -inf
    after training had started (exit 3). omega is now bounded by its declaration: refused first, exit 2.
    (Divergence itself, a NaN/inf loss, is covered by test_nan_loss_stops_with_one_line_and_keeps_last_good.)"""
    out = tmp_path / "d"
    rc, _, err = run_cli("train-defended", "--dataset", "digits", "--model", "mlp:hidden=8", "--epochs", "1", "--omega", "1e38", "--lock", "none",
                         "--no-probe", "--out", out)
    assert rc == 2, err
    assert err.strip().splitlines() == [err.strip()] and "omega must be at most 1000, got 1e+38" in err and "Traceback" not in err
    assert not out.exists()
