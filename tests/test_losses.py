"""Golden values for the loss functions (reference numbers computed independently with numpy)."""

import math

import pytest
import torch

from nasty.losses import adversary_kl, kd_loss, kl_div, nasty_loss


def test_nasty_loss_golden():
    zt = torch.tensor([[1.0, 2.0, 3.0]])
    za = torch.tensor([[3.0, 2.0, 1.0]])
    loss, terms = nasty_loss(zt, za, torch.tensor([2]), tau=2.0, omega=0.5)
    assert terms["kl_adv"] == pytest.approx(0.32015666782980645, rel=1e-6)
    assert terms["ce"] == pytest.approx(0.4076059644443804, rel=1e-6)
    assert loss.item() == pytest.approx(0.4076059644443804 - 0.5 * 4 * 0.32015666782980645, rel=1e-6)
    assert loss.item() == pytest.approx(-0.2327073712152325, rel=1e-6)


def test_kd_loss_golden():
    zs = torch.tensor([[0.5, 0.0, -0.5]])
    zt = torch.tensor([[1.0, 2.0, 3.0]])
    loss, terms = kd_loss(zs, zt, torch.tensor([0]), temperature=2.0, alpha=0.9)
    assert terms["kd_kl"] == pytest.approx(0.17918591463629863, rel=1e-6)
    assert terms["ce"] == pytest.approx(0.6802696706417346, rel=1e-6)
    assert loss.item() == pytest.approx(0.7130962597548485, rel=1e-6)


def test_kd_without_labels_is_pure_distillation():
    zs, zt = torch.randn(5, 4), torch.randn(5, 4)
    loss, _ = kd_loss(zs, zt, None, temperature=3.0, alpha=0.5)
    expected = 9.0 * kl_div(torch.log_softmax(zt / 3, 1), torch.log_softmax(zs / 3, 1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_kl_handles_zero_probabilities_without_nan():
    # top-k outputs: the teacher reveals two classes, the rest are log 0 = -inf
    log_pt = torch.log(torch.tensor([[0.7, 0.3, 0.0, 0.0]]))
    zs = torch.zeros(1, 4, requires_grad=True)
    kl = kl_div(log_pt, torch.log_softmax(zs, 1))
    kl.backward()
    expected = 0.7 * math.log(0.7 / 0.25) + 0.3 * math.log(0.3 / 0.25)
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(zs.grad).all()


def _descend(omega: float):
    torch.manual_seed(0)
    za = torch.randn(16, 10)
    zt = (za + 0.5 * torch.randn(16, 10)).requires_grad_(True)
    y = za.argmax(1)
    before = adversary_kl(zt, za, 4.0).item()
    opt = torch.optim.SGD([zt], lr=1.0)
    for _ in range(50):
        loss, _ = nasty_loss(zt, za, y, tau=4.0, omega=omega)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, adversary_kl(zt, za, 4.0).item(), (zt.argmax(1) == y).float().mean().item()


def test_nasty_gradient_pushes_teacher_away_from_adversary():
    before, after, acc = _descend(2.0)
    _, after_plain, _ = _descend(0.0)
    assert after > 3 * before  # the tempered distribution moved away from the adversary's
    assert after > 2 * after_plain  # and because of the KL term, not the CE term
    assert acc == 1.0  # while the CE term keeps the labels


def test_nasty_gradient_flows_through_first_kl_slot_only():
    zt = torch.randn(3, 5, requires_grad=True)
    za = torch.randn(3, 5, requires_grad=True)
    adversary_kl(zt, za.detach(), 2.0).backward()
    assert zt.grad is not None and zt.grad.abs().sum() > 0
    assert za.grad is None


def test_kl_cap_and_weight():
    zt, za = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    full = adversary_kl(zt, za, 1.0).item()
    assert adversary_kl(zt, za, 1.0, kl_cap=0.5).item() == pytest.approx(0.5)
    assert adversary_kl(zt, za, 1.0, weight=torch.tensor([0.0])).item() == 0.0
    assert full > 0.5
