"""Golden values for nasty.losses written so that operator-level mutants die (issue 15; mutmut's
survivors on this file, see docs/results.md): batches of several *different* rows (a sum over the
batch, or a softmax over the wrong axis, changes the value), classes a teacher withholds (``p = 0``,
``log q = -inf``), KD's per-sample mask, and the weight and cap that nasty_loss passes on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nasty.losses import adversary_kl, kd_loss, kl_div, nasty_loss, tempered_log_softmax

P = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
Q = [[0.5, 0.25, 0.25], [0.3, 0.3, 0.4]]


def kl_rows(p, q):
    return [sum(a * math.log(a / b) for a, b in zip(pr, qr) if a > 0) for pr, qr in zip(p, q)]


def test_kl_div_is_the_batch_mean_of_row_kls():
    got = kl_div(torch.tensor(P).log(), torch.tensor(Q).log()).item()
    rows = kl_rows(P, Q)
    assert rows[0] != pytest.approx(rows[1])
    assert got == pytest.approx(sum(rows) / 2, rel=1e-6)


def test_kl_div_withheld_classes_count_zero_even_where_log_q_is_minus_inf():
    p = torch.tensor([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0]])  # a top-k student: log q = -inf where p = 0
    got = kl_div(p.log(), q.log())
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(sum(kl_rows(p.tolist(), q.tolist())) / 2, rel=1e-6)


def test_tempered_log_softmax_is_per_row():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]])
    got = tempered_log_softmax(z, 2.0)
    for i in range(2):
        expected = [v / 2 - math.log(sum(math.exp(u / 2) for u in z[i].tolist())) for v in z[i].tolist()]
        assert got[i].tolist() == pytest.approx(expected, rel=1e-6)


def _per_sample_kd(zs, zt, T):
    return [T * T * k for k in kl_rows(F.softmax(zt / T, 1).tolist(), F.softmax(zs / T, 1).tolist())]


def test_kd_loss_mask_keeps_the_kd_term_only_where_true():
    zs = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, 0.0, 3.0]])
    zt = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 1, 2])
    T, a = 2.0, 0.7
    per = _per_sample_kd(zs, zt, T)  # T^2 * KL per sample
    ce = F.cross_entropy(zs, y).item()
    mask = torch.tensor([True, False, True])
    loss, terms = kd_loss(zs, zt, y, T, a, mask=mask)
    assert terms["kd_kl"] == pytest.approx((per[0] + per[2]) / 3 / T**2, rel=1e-5)  # mean over the whole batch
    assert loss.item() == pytest.approx(a * (per[0] + per[2]) / 3 + (1 - a) * ce, rel=1e-5)
    full, _ = kd_loss(zs, zt, y, T, a, mask=torch.ones(3, dtype=torch.bool))
    assert full.item() == pytest.approx(kd_loss(zs, zt, y, T, a)[0].item(), rel=1e-6)
    assert full.item() == pytest.approx(a * sum(per) / 3 + (1 - a) * ce, rel=1e-5)
    # a top-k teacher (p = 0 on withheld classes) under a mask: finite, withheld classes count 0
    zt_top = torch.tensor([[3.0, 0.0, -math.inf], [-math.inf, 1.0, 2.0], [1.0, -math.inf, 1.0]])
    masked, _ = kd_loss(zs, zt_top, y, T, a, mask=mask)
    assert torch.isfinite(masked)
    zs_top = torch.where(torch.isinf(zt_top), torch.full_like(zs, -math.inf), zs)  # a student that withholds the same
    both_top, _ = kd_loss(zs_top, zt_top, None, T, a, mask=mask)
    assert torch.isfinite(both_top)
    # without labels: the KD term alone (alpha counts as 1)
    nolab, t2 = kd_loss(zs, zt, None, T, a, mask=mask)
    assert nolab.item() == pytest.approx((per[0] + per[2]) / 3, rel=1e-5) and t2["ce"] == 0.0


def test_nasty_loss_passes_weight_and_cap_on():
    zt = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0]])
    za = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
    y = torch.tensor([0, 1, 2])
    tau, omega = 2.0, 0.3
    per = kl_rows(F.softmax(zt / tau, 1).tolist(), F.softmax(za / tau, 1).tolist())
    ce = F.cross_entropy(zt, y).item()
    w = torch.tensor([1.0, 0.0, 0.5])
    loss, terms = nasty_loss(zt, za, y, tau, omega, weight=w)
    kl_w = (per[0] * 1.0 + per[2] * 0.5) / 3
    assert terms["kl_adv"] == pytest.approx(kl_w, rel=1e-5)
    assert loss.item() == pytest.approx(ce - omega * tau**2 * kl_w, rel=1e-5)
    cap = sorted(per)[1]  # caps the largest KL only
    loss_c, terms_c = nasty_loss(zt, za, y, tau, omega, kl_cap=cap)
    kl_c = sum(min(k, cap) for k in per) / 3
    assert terms_c["kl_adv"] == pytest.approx(kl_c, rel=1e-5) and kl_c < sum(per) / 3
    assert loss_c.item() == pytest.approx(ce - omega * tau**2 * kl_c, rel=1e-5)
    both = adversary_kl(zt, za, tau, w, cap).item()
    assert nasty_loss(zt, za, y, tau, omega, weight=w, kl_cap=cap)[1]["kl_adv"] == pytest.approx(both, rel=1e-6)
    assert terms["ce"] == pytest.approx(ce, rel=1e-6)
