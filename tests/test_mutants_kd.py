"""KD's loss on plain and mixed batches, written out from Hinton et al. 2015 (issue 15: mutmut found the
mixup/cutmix path of nasty/attacks/kd.py untested)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nasty.attacks.augment import Mixed
from nasty.attacks.kd import distill_loss
from nasty.data import Batch


def _kl(t, s, T):
    pt = F.softmax(t / T, 1)
    return (pt * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).sum(1).mean()


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g) * 3
    y, y2 = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 2, 1, 0, 2, 3])
    return s, t, y, y2


@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_kd_with_labels_is_alpha_t2_kl_plus_the_mixed_ce(logits, lam):
    s, t, y, y2 = logits
    T, a = 3.0, 0.6
    m = Mixed(Batch(torch.zeros(6, 1), y, torch.arange(6), lam != 1.0), y2, lam)
    loss, terms = distill_loss(s, t, m, T, a, True)
    ce = lam * F.cross_entropy(s, y) + (1 - lam) * F.cross_entropy(s, y2)
    assert loss.item() == pytest.approx((a * T * T * _kl(t, s, T) + (1 - a) * ce).item(), rel=1e-5)
    assert terms["kd_kl"] == pytest.approx(_kl(t, s, T).item(), rel=1e-5) and terms["ce"] == pytest.approx(ce.item(), rel=1e-5)


@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_kd_without_labels_is_the_kd_term_alone(logits, lam):
    s, t, y, y2 = logits
    m = Mixed(Batch(torch.zeros(6, 1), y, torch.arange(6), lam != 1.0), y2, lam)
    loss, terms = distill_loss(s, t, m, 2.0, 0.3, False)
    assert loss.item() == pytest.approx((4.0 * _kl(t, s, 2.0)).item(), rel=1e-5) and terms["ce"] == 0.0
