"""Tests that kill mutants of the core (issue 15): each fails under one deliberate one-line breakage
(``benchmarks/mutation.py`` lists them) and passes on the real code.

- model selection returns the weights of the best validation epoch, not the last epoch's;
- the checkpoint hash covers the whole weights file (a > 1 MiB checkpoint with one byte flipped past
  the first MiB is refused);
- the nasty teacher's objective is ``CE - omega * tau^2 * KL`` (sign included) and training on it
  pushes the teacher's outputs away from the adversary's.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nasty.data import Batch
from nasty.errors import NastyError
from nasty.losses import adversary_kl, nasty_loss
from nasty.metrics import accuracy, predict_logits
from nasty.models import create_model
from nasty.train import TrainConfig, fit

# ---------------------------------------------------------------- model selection


def _val_acc(model, digits) -> float:
    return accuracy(predict_logits(model, digits.x_val).argmax(1), digits.y_val)


def _good_then_poisoned(model, batch, epoch):
    """Cross-entropy on the true labels in epoch 1, on labels shifted by one class afterwards."""
    y = batch.y if epoch == 0 else (batch.y + 1) % 10
    loss = F.cross_entropy(model(batch.x), y)
    return loss, {"ce": loss.item()}


@pytest.mark.parametrize("select,best", [("best-val", 1), ("last", 3)])
def test_fit_returns_the_best_validation_epochs_weights(digits, select, best):
    torch.manual_seed(0)
    m = create_model("mlp:hidden=32", 10, 1, (8, 8))
    res = fit(m, _good_then_poisoned, digits, TrainConfig(epochs=3, batch_size=32, lr=0.1, seed=0, select=select), log=None)
    curve = [row["val_accuracy"] for row in res.history]
    assert curve[0] > 70 and curve[-1] < 30, curve  # the poisoned epochs ruin the model
    assert res.best_epoch == best and res.best_val_accuracy == curve[best - 1]
    # the returned model *is* that epoch's model
    assert _val_acc(m, digits) == pytest.approx(curve[best - 1], abs=1e-4)


# ---------------------------------------------------------------- checkpoint hash over the whole file


def test_checkpoint_over_one_mib_with_a_flipped_byte_late_in_the_file_is_refused(digits, tmp_path):
    from nasty.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    m = create_model("mlp:hidden=4096", 10, 1, (8, 8))  # about 1.2 MB of float32 weights
    save_checkpoint(tmp_path, m, classes=digits.classes, input_shape=(1, 8, 8), mean=digits.mean, std=digits.std,
                    dataset="digits")
    w = tmp_path / "model.safetensors"
    blob = bytearray(w.read_bytes())
    assert len(blob) > (1 << 20) + 4096
    m2, _ = load_checkpoint(tmp_path)  # the intact file loads
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    pos = len(blob) - 8  # past the first MiB; the low mantissa byte of a float32 (the weights stay finite)
    assert pos > 1 << 20 and pos % 4 == 0
    blob[pos] ^= 0x01
    w.write_bytes(bytes(blob))
    with pytest.raises(NastyError, match="SHA-256"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------- the nasty objective


def _nasty(omega: float = 0.5, tau: float = 4.0, **extra):
    from nasty.config import load_config
    from nasty.defenses import get_defense

    cfg = load_config(None, {"defense": {"omega": omega, "tau": tau, **extra}})["defense"]
    return get_defense("nasty")(cfg)


def test_nasty_objective_is_ce_minus_omega_tau2_kl(digits, small_teacher):
    torch.manual_seed(0)
    teacher = create_model("cnn:width=0.25", 10, 1, (8, 8))
    idx = torch.arange(64)
    batch = Batch(digits.x_train[idx], digits.y_train[idx], idx, False)
    with torch.no_grad():
        z_a = small_teacher(batch.x)
    objective = _nasty(omega=0.5, tau=4.0).objective([lambda b: small_teacher(b.x)])
    loss, terms = objective(teacher, batch, 0)
    z = teacher(batch.x)
    ce = F.cross_entropy(z, batch.y)
    kl = adversary_kl(z, z_a, 4.0)
    assert kl.item() > 1e-3  # the two networks disagree: the KL term is not zero
    assert loss.item() == pytest.approx((ce - 0.5 * 16 * kl).item(), rel=1e-6)
    assert loss.item() == pytest.approx(nasty_loss(z, z_a, batch.y, 4.0, 0.5)[0].item(), rel=1e-6)
    assert terms["kl_adv"] == pytest.approx(kl.item(), rel=1e-6) and terms["ce"] == pytest.approx(ce.item(), rel=1e-6)


def test_training_on_the_nasty_objective_moves_away_from_the_adversary(digits, small_teacher):
    """One epoch of fine-tuning from the adversary itself: the nasty objective drives the tempered KL
    up, plain cross-entropy leaves it near zero."""
    from nasty.train import ce_objective

    def kl_to_adversary(model) -> float:
        with torch.no_grad():
            return adversary_kl(model(digits.x_val), small_teacher(digits.x_val), 4.0).item()

    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.01, seed=0, select="last")
    nasty_t, plain_t = copy.deepcopy(small_teacher).train(), copy.deepcopy(small_teacher).train()
    for m in (nasty_t, plain_t):  # the shared fixture may have been frozen by an attack that queried it
        m.requires_grad_(True)
    fit(nasty_t, _nasty(omega=0.5, tau=4.0).objective([lambda b: small_teacher(b.x)]), digits, cfg, log=None)
    fit(plain_t, ce_objective(), digits, cfg, log=None)
    nasty_t.eval(), plain_t.eval(), small_teacher.eval()
    k_nasty, k_plain = kl_to_adversary(nasty_t), kl_to_adversary(plain_t)
    assert k_nasty > 0.02 and k_nasty > 10 * k_plain, (k_nasty, k_plain)
