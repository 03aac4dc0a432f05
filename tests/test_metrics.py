"""What served probabilities give a user (top-k with ties, ECE, NLL; golden values computed by hand) and
what they say beyond the class (the conditional mutual information: leave-one-out batch penalty, whole-split
served measure)."""

from __future__ import annotations

import math

import pytest
import torch

from nasty.defenses.lock import conditional_mi
from nasty.metrics import class_conditional_mi, expected_calibration_error, quality_of_probabilities, served_cmi, topk_hits


def _onehot(d: list[int], c: int = 10) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(d), c).double()


def test_topk_counts_a_tied_group_straddling_the_boundary_by_its_share_of_the_slots():
    p = _onehot([0, 0])
    assert topk_hits(p, torch.tensor([0, 3]), 5).tolist() == pytest.approx([1.0, 4 / 9])  # 9 tied zeros, 4 slots left
    assert topk_hits(p, torch.tensor([3]).repeat(2), 1).tolist() == [0.0, 0.0]
    assert topk_hits(p, torch.tensor([3, 3]), 10).tolist() == [1.0, 1.0]
    # the class template: 0.5 on the decision, 0.45 on the decoy, 0.00625 on each of 8 others -> 3 slots of 8
    t = torch.full((1, 10), 0.05 / 8, dtype=torch.float64)
    t[0, 2], t[0, 3] = 0.5, 0.45
    assert topk_hits(t.repeat(3, 1), torch.tensor([2, 3, 7]), 5).tolist() == pytest.approx([1.0, 1.0, 3 / 8])
    # a tie at the top: top-1 is a coin flip between the two, not the lower index
    q = torch.tensor([[0.4, 0.4, 0.2]], dtype=torch.float64)
    assert topk_hits(q, torch.tensor([1]), 1).item() == 0.5 and topk_hits(q, torch.tensor([0]), 1).item() == 0.5
    assert topk_hits(q, torch.tensor([2]), 2).item() == 0.0


def test_labels_only_top5_is_top1_plus_four_ninths_of_the_misses():
    """7 of 10 one-hot answers right: top-5 = 70 + 30 * 4/9, not 100."""
    y = torch.arange(10)
    d = y.clone()
    d[7:] = torch.tensor([0, 1, 2])
    q = quality_of_probabilities(_onehot(d.tolist()), y)
    assert q["top1"] == pytest.approx(70.0)
    assert q["top5"] == pytest.approx(70.0 + 30.0 * 4 / 9)
    assert q["nll"] == pytest.approx(0.3 * -math.log(1e-12))  # a withheld true class costs -log(1e-12) nats, not inf
    assert q["ece"] == pytest.approx(30.0)  # confidence 1 in one bin, accuracy 0.7


def test_ece_and_nll_golden():
    p = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.5, 0.5]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1])
    # bins of width 1/15: 0.9 -> 13, 0.6 -> 9, 0.8 -> 12, 0.5 -> 7; each bin one row
    # |1 - .9| + |1 - .6| + |1 - .8| + |0.5 - .5| (the tie at the top is right half of the time) = 0.7, / 4 rows
    assert expected_calibration_error(p, y) == pytest.approx(100 * 0.7 / 4)
    q = quality_of_probabilities(p, y)
    assert q["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.6) + math.log(0.8) + math.log(0.5)) / 4)
    assert q["top1"] == pytest.approx(100 * 3.5 / 4)
    assert q["top5"] == pytest.approx(100.0)


def _loo_by_hand(p: torch.Tensor, y: torch.Tensor) -> float:
    vals = []
    for i in range(len(y)):
        others = [j for j in range(len(y)) if j != i and y[j] == y[i]]
        if not others:
            continue
        q = sum(p[j] for j in others) / len(others)
        vals.append(sum(float(p[i, k] * math.log(p[i, k] / q[k])) for k in range(p.shape[1])))
    return sum(vals) / len(vals)


def test_leave_one_out_cmi_golden_and_singletons_left_out():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 3.0], [5.0, -2.0, 0.0], [0.0, 0.0, 4.0], [1.0, 2.0, 3.0]])
    y = torch.tensor([0, 0, 0, 1, 1, 2])  # class 2 is alone in the batch
    tau = 2.0
    p = torch.softmax(z.double() / tau, 1)
    got = conditional_mi(z, y, tau)
    assert float(got) == pytest.approx(_loo_by_hand(p, y), rel=1e-5)
    # the lone sample contributes nothing, whatever it outputs
    z2 = z.clone()
    z2[5] = torch.tensor([9.0, -9.0, 0.0])
    assert float(conditional_mi(z2, y, tau)) == pytest.approx(float(got), rel=1e-6)
    # every sample alone: 0, and still differentiable
    zz = z[:3].clone().requires_grad_(True)
    none = conditional_mi(zz, torch.tensor([0, 1, 2]), tau)
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(zz.grad).all()


def test_cmi_is_zero_when_outputs_are_a_function_of_the_class_and_gradients_are_finite():
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    z = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, 1.0, 5.0]])[y].requires_grad_(True)
    c = conditional_mi(z, y, 4.0)
    c.backward()
    assert abs(c.item()) < 1e-9 and torch.isfinite(z.grad).all()


def _dirichlet(m: torch.Tensor, y: torch.Tensor, alpha: float, g: torch.Generator) -> torch.Tensor:
    gam = torch._standard_gamma(alpha * m[y], generator=g)
    return gam / gam.sum(1, keepdim=True)


def test_leave_one_out_is_not_biased_low_where_the_own_mean_form_is():
    """Outputs with a known CMI (class-conditional Dirichlet, 10 classes, batch 64): averaged over batches the
    leave-one-out estimate lies above the truth (it bounds it in expectation), the own-mean form well below."""
    g = torch.Generator().manual_seed(0)
    C, alpha = 10, 20.0
    m = _dirichlet(torch.full((1, C), 1.0 / C, dtype=torch.float64), torch.zeros(C, dtype=torch.long), float(C), g).clamp_min(1e-6)
    m = m / m.sum(1, keepdim=True)
    yt = torch.randint(0, C, (20000,), generator=g)
    pt = _dirichlet(m, yt, alpha, g)
    truth = float((pt * (pt.clamp_min(1e-300).log() - m[yt].log())).sum(1).mean())
    loo, own = [], []
    for _ in range(60):
        y = torch.randint(0, C, (64,), generator=g)
        lp = _dirichlet(m, y, alpha, g).clamp_min(1e-300).log()
        loo.append(float(class_conditional_mi(lp, y, leave_one_out=True)))
        own.append(float(class_conditional_mi(lp, y, leave_one_out=False)))
    assert sum(loo) / len(loo) > truth > 1.1 * sum(own) / len(own), (sum(loo) / len(loo), truth, sum(own) / len(own))


class _Fixed(torch.nn.Module):
    """Serves fixed logits, one row per input index."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.z = z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.z[x.long().flatten()]


def test_served_cmi_whole_split_golden():
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    x = torch.arange(6).float()
    # outputs that depend on the class only: nothing beyond the class
    p = torch.tensor([[0.7, 0.3], [0.2, 0.8]], dtype=torch.float64)
    assert served_cmi(_Fixed(p.log()[y]), x, y) == pytest.approx(0.0, abs=1e-12)
    # labels only with one error in class 0: Q_0 = (3/4, 1/4) (the whole split, the sample inside its mean),
    # CMI = (3 log(4/3) + log 4) / 6; a withheld class (-inf logit) weighs 0, never NaN
    d = torch.tensor([0, 0, 0, 1, 1, 1])
    z = torch.full((6, 2), float("-inf"))
    z[torch.arange(6), d] = 0.0
    assert served_cmi(_Fixed(z), x, y) == pytest.approx((3 * math.log(4 / 3) + math.log(4)) / 6, rel=1e-9)


def test_pareto_plot_points_read_the_served_quality_with_the_labels_only_point():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("plot_locked", Path(__file__).resolve().parent.parent / "benchmarks" / "plot_locked.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    q = {k: {"top1": 90.0, "top5": t5, "ece": ece, "nll": 1.0}
         for k, t5, ece in (("normal", 99.0, 2.0), ("locked", 96.0, 30.0), ("template", 95.0, 45.0), ("label", 94.4, 10.0))}
    rows = [{"quality": q, "gains": {"mlp": {"label-smoothing": 1.0, "normal-kd": 5.0, "normal-rehead-affine": 3.0, "kd": -2.0,
                                             "template-kd": 0.5, "template-rehead-affine": 0.0}}}]
    assert plot.points(rows, "ece") == {"label": (10.0, 0.0), "normal": (2.0, 4.0), "locked": (30.0, -3.0), "template": (45.0, -0.5)}
    assert plot.points(rows, "top5")["label"] == (94.4, 0.0)


def test_cmi_penalty_reuses_the_objectives_served_outputs():
    """with_cmi adds the CMI of the outputs the objective already computed: one head pass per step, the same
    loss and gradients as a second pass would give."""
    from nasty.data import Batch
    from nasty.defenses.lock import with_cmi
    from nasty.train import Objective

    class Counted(torch.nn.Linear):
        calls = 0

        def forward(self, x):
            Counted.calls += 1
            return super().forward(x)

    torch.manual_seed(0)
    head = Counted(6, 4)
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    batch = Batch(x, y, torch.arange(32), False)
    base = Objective(lambda m, b, e: (torch.nn.functional.cross_entropy(m(b.x), b.y), {}))
    total, terms = with_cmi(base, 10.0, 4.0).loss(head, batch, 0)
    assert Counted.calls == 1
    total.backward()
    got = head.weight.grad.clone()
    head.weight.grad = None
    want = torch.nn.functional.cross_entropy(head(x), y) + 10.0 * conditional_mi(head(x), y, 4.0)
    want.backward()
    assert total.item() == pytest.approx(want.item(), rel=1e-6) and torch.allclose(got, head.weight.grad, atol=1e-6)
    assert terms["cmi"] == pytest.approx(float(conditional_mi(head(x), y, 4.0)), rel=1e-6)
