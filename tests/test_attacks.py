"""Attack suite, deterministic pieces: golden values of the losses and targets, the augmentation,
stage layouts, and the threat-model refusals of ``run_attack`` (no training here)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nasty.attacks import check_requirements, get_attack, run_attack
from nasty.attacks.attention import at_loss, attention_map, parse_pairs
from nasty.attacks.augment import Mixed, Mixer, mixed_ce, parse_augment
from nasty.attacks.averager import class_mean_targets
from nasty.attacks.base import TeacherFeatures, Oracle, kd_per_sample, match_spatial, resolve_stage
from nasty.attacks.ensemble import ensemble_targets
from nasty.attacks.hint import hint_loss, make_adapter
from nasty.attacks.skeptical import Skeptical
from nasty.attacks.tllm import tllm_loss
from nasty.data import Batch
from nasty.errors import NastyError
from nasty.losses import kd_loss, kl_div
from nasty.models import create_model
from nasty.train import TrainConfig


def plain(y: torch.Tensor, x: torch.Tensor | None = None) -> Mixed:
    x = torch.zeros(len(y), 1, 2, 2) if x is None else x
    return Mixed(Batch(x, y, torch.arange(len(y)), False), y, 1.0)


# ---------------------------------------------------------------- attention transfer


def test_attention_map_and_loss_golden():
    fs = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # (1, 2, 1, 2): mean_c F^2 = [5, 10]
    ft = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])  # mean_c F^2 = [1, 0]
    assert torch.allclose(attention_map(fs), torch.tensor([[[5.0, 10.0]]]))
    # normalised maps [1, 2]/sqrt(5) and [1, 0]: mean squared difference = (2 - 2/sqrt(5)) / 2
    assert at_loss(fs, ft).item() == pytest.approx((2 - 2 / math.sqrt(5)) / 2, abs=1e-6)
    assert at_loss(fs, fs).item() == pytest.approx(0.0, abs=1e-12)


def test_attention_loss_matches_spatial_sizes_and_ignores_width():
    fs = torch.arange(16.0).reshape(1, 1, 4, 4)  # attention map 4x4 -> pooled 2x2
    ft = torch.ones(1, 3, 2, 2)  # uniform attention
    pooled = F.avg_pool2d(fs.pow(2), 2).flatten(1)
    expected = (F.normalize(pooled, dim=1) - 0.5).pow(2).mean()
    assert at_loss(fs, ft).item() == pytest.approx(expected.item(), rel=1e-6)
    a, b = match_spatial(torch.ones(2, 4, 4), torch.zeros(2, 2, 2))
    assert a.shape == b.shape == (2, 2, 2)


def test_attention_pairs():
    assert parse_pairs(None, 3, 3) == [(1, 1), (2, 2), (3, 3)]
    assert parse_pairs(None, 3, 4) == [(1, 1), (2, 3), (3, 4)]
    assert parse_pairs("1:2,3:3", 3, 3) == [(1, 2), (3, 3)]
    with pytest.raises(NastyError, match="pairs"):
        parse_pairs("1-2", 3, 3)


# ---------------------------------------------------------------- FitNets hint


def test_hint_loss_golden_feature_maps():
    fs = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    adapter = make_adapter((1, 2, 2), (2, 1, 1))
    assert isinstance(adapter, nn.Conv2d)
    with torch.no_grad():
        adapter.weight.copy_(torch.tensor([2.0, -1.0]).reshape(2, 1, 1, 1))
    ft = torch.tensor([[[[4.0]], [[-2.0]]]])
    # adapter -> channels 2x and -x, pooled to 1x1: 5 and -2.5; MSE to (4, -2) = (1 + 0.25) / 2
    assert hint_loss(fs, ft, adapter).item() == pytest.approx(0.625)


def test_hint_loss_golden_vector_student_map_teacher():
    fs = torch.tensor([[1.0, 2.0, 3.0]])
    adapter = make_adapter((3,), (2, 2, 2))
    with torch.no_grad():
        adapter.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    ft = torch.stack([torch.full((2, 2), 2.0), torch.tensor([[1.0, 3.0], [5.0, 7.0]])])[None]  # pooled: (2, 4)
    assert hint_loss(fs, ft, adapter).item() == pytest.approx(((1 - 2) ** 2 + (3 - 4) ** 2) / 2)


# ---------------------------------------------------------------- averager, ensemble, per-sample KD


def test_averager_class_mean_golden():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.6, 0.2, 0.2], [0.3, 0.3, 0.4]])
    y = torch.tensor([0, 1, 0, 1, 2])
    out = class_mean_targets(p.log(), y, temperature=1.0)
    q = F.softmax(out, dim=1)
    assert torch.allclose(q[0], torch.tensor([0.3, 0.175, 0.525]), atol=1e-6)
    assert torch.allclose(q[2], q[0])
    assert torch.allclose(q[1], torch.tensor([0.4, 0.45, 0.15]), atol=1e-6) and torch.allclose(q[3], q[1])
    assert torch.allclose(q[4], p[4], atol=1e-6)  # a class seen once keeps its output


def test_averager_tempered_and_logit_modes():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, generator=g) * 3
    y = torch.tensor([0, 0, 1, 1, 1, 3])
    T = 4.0
    q = F.softmax(class_mean_targets(z, y, T) / T, dim=1)
    expect = F.softmax(z / T, dim=1)[2:5].mean(0)
    assert torch.allclose(q[3], expect, atol=1e-6)
    zl = class_mean_targets(z, y, T, "logits")
    assert torch.allclose(zl[0], z[:2].mean(0)) and torch.allclose(zl[5], z[5])
    with pytest.raises(NastyError, match="finite"):
        class_mean_targets(torch.tensor([[0.0, -math.inf]]), torch.tensor([0]), T, "logits")
    # top-k outputs (-inf for hidden classes) are fine in probs mode
    top = class_mean_targets(torch.tensor([[0.0, -math.inf], [0.0, 0.0]]), torch.tensor([0, 0]), 2.0)
    assert torch.allclose(F.softmax(top / 2.0, 1), torch.tensor([[0.75, 0.25], [0.75, 0.25]]))


def test_ensemble_targets_are_mean_distribution():
    z1, z2 = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 3.0, 0.0]])
    T = 2.0
    out = ensemble_targets([z1, z2], T)
    expect = (F.softmax(z1 / T, 1) + F.softmax(z2 / T, 1)) / 2
    assert torch.allclose(F.softmax(out / T, 1), expect, atol=1e-6)
    assert torch.allclose(ensemble_targets([z1, z2], T, "logits"), (z1 + z2) / 2)


def test_kd_per_sample_agrees_with_kl_div():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    T = 3.0
    ref = T**2 * kl_div(F.log_softmax(zt / T, 1), F.log_softmax(zs / T, 1))
    assert kd_per_sample(zs, zt, T).mean().item() == pytest.approx(ref.item(), rel=1e-6)


# ---------------------------------------------------------------- TLLM loss


def test_tllm_loss_without_undistillable_is_kd():
    g = torch.Generator().manual_seed(2)
    zs, zt, y = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g), torch.randint(0, 4, (8,), generator=g)
    none = torch.zeros(4, dtype=torch.bool)
    loss, _ = tllm_loss(zs, zt, plain(y), none, 4.0, 0.9)
    ref, _ = kd_loss(zs, zt, y, 4.0, 0.9)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_tllm_discard_modes_golden():
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    y = torch.tensor([0, 1, 2, 1])
    U = torch.tensor([False, True, False])  # class 1 undistillable: samples 1 and 3
    T, a = 2.0, 0.75
    kl = kd_per_sample(zs, zt, T)
    ce = F.cross_entropy(zs, y, reduction="none")
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0])
    kd_term = (a * keep * kl + (1 - a) * ce).mean()
    ce_full = (a * keep * kl + (1 - a) * keep * ce + (1 - keep) * ce).mean()
    drop = (a * kl + (1 - a) * ce)[keep.bool()].mean()
    for mode, want in (("kd-term", kd_term), ("ce-full", ce_full), ("drop", drop)):
        got, terms = tllm_loss(zs, zt, plain(y), U, T, a, mode)
        assert got.item() == pytest.approx(want.item(), rel=1e-6), mode
        assert terms["discarded"] == pytest.approx(0.5)
    with pytest.raises(NastyError, match="discard"):
        tllm_loss(zs, zt, plain(y), U, T, a, "nope")


def test_tllm_loss_on_mixed_batch_weights_by_lambda():
    zs, zt = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]])
    m = Mixed(Batch(torch.zeros(1, 1, 1, 1), torch.tensor([0]), torch.tensor([0]), True), torch.tensor([1]), 0.25)
    U = torch.tensor([False, True])
    loss, terms = tllm_loss(zs, zt, m, U, 1.0, 1.0)  # alpha 1: only the KD term, kept for 25% of the sample
    assert loss.item() == pytest.approx(0.25 * kd_per_sample(zs, zt, 1.0).item(), rel=1e-6)
    assert terms["discarded"] == pytest.approx(0.75)


# ---------------------------------------------------------------- augmentation


def test_mixup_and_cutmix_are_exact_mixtures():
    x = torch.arange(6.0)[:, None, None, None].expand(6, 1, 8, 8).contiguous()  # image i is constant i
    y = torch.arange(6)
    batch = Batch(x, y, torch.arange(6), False)
    for kind in ("mixup", "cutmix"):
        m = Mixer(kind, seed=0)(batch)
        assert m.batch.augmented and 0 <= m.lam <= 1
        perm_y = m.y2
        if kind == "mixup":
            assert torch.allclose(m.x, m.lam * x + (1 - m.lam) * x[perm_y])
        else:  # every pixel comes from one of the two images; the kept share is lam exactly
            own = (m.x == x).float().mean((1, 2, 3))
            differs = perm_y != y
            assert torch.allclose(own[differs], torch.full_like(own[differs], m.lam))
    plain_batch = Mixer("none")(batch)
    assert plain_batch.batch is batch and plain_batch.lam == 1.0


def test_mixed_ce_golden():
    z = torch.tensor([[2.0, 0.0]])
    m = Mixed(Batch(torch.zeros(1, 1, 1, 1), torch.tensor([0]), torch.tensor([0]), True), torch.tensor([1]), 0.25)
    want = 0.25 * F.cross_entropy(z, torch.tensor([0])) + 0.75 * F.cross_entropy(z, torch.tensor([1]))
    assert mixed_ce(z, m).item() == pytest.approx(want.item())


def test_parse_augment():
    assert parse_augment(None) == ("none", 0.0)
    assert parse_augment("mixup") == ("mixup", 1.0)
    assert parse_augment("cutmix:0.5") == ("cutmix", 0.5)
    for bad, msg in (("mixip", "did you mean 'mixup'"), ("mixup:-1", "positive"), ("mixup:x", "number")):
        with pytest.raises(NastyError, match=msg):
            parse_augment(bad)


# ---------------------------------------------------------------- stages and teacher features


def test_skeptical_default_layout_on_any_model():
    sk = Skeptical()
    cases = {"cnn": ("block1", "block2"), "resnet18": ("layer2", "layer3"), "mlp": ("fc0", "fc0"), "resnet20": ("layer1", "layer2")}
    for spec, want in cases.items():
        model = create_model(spec, 10, 1, (8, 8))
        assert sk.layout(model) == want, spec
    with pytest.raises(NastyError, match="out of range"):
        resolve_stage(create_model("cnn", 10, 1, (8, 8)), 4, "student")


def test_teacher_features_roundtrip():
    model = create_model("cnn:width=0.25", 10, 1, (8, 8)).eval()
    feats = TeacherFeatures(Oracle(model, "weights"), ["block1", "block3"], 1, (8, 8))
    x = torch.randn(3, 1, 8, 8)
    z, (f1, f3) = feats.unpack(feats(x))
    with torch.no_grad():
        assert torch.allclose(z, model(x))
        assert torch.allclose(f1, model.block1(x))
    assert f3.shape == (3, 32, 1, 1) and feats.oracle.queries == 3


# ---------------------------------------------------------------- threat model refusals


@pytest.mark.parametrize("method,kwargs,msg", [
    ("hint", {"query": "probs"}, "needs teacher access weights"),
    ("attention", {"query": "logits"}, "needs teacher access weights"),
    ("averager", {"query": "label"}, "needs teacher access"),
    ("tllm", {"query": "label"}, "needs teacher access"),
    ("skeptical", {"query": "label"}, "needs teacher access"),
    ("ensemble", {}, "at least 2 teachers"),
    ("kd", {"n_teachers": 2}, "use --method ensemble"),
    ("scratch", {"labels": False}, "needs the ground-truth labels"),
    ("tllm", {"labels": False}, "needs the ground-truth labels"),
    ("tllm", {"unlabelled_queries": True}, "surrogate queries carry no labels"),
    ("averager", {"augment": "mixup"}, "does not support --augment"),
    ("copycat", {"augment": "cutmix"}, "does not support --augment"),
    ("kd", {"n_teachers": 0}, "needs a teacher"),
])
def test_requirements_refused(method, kwargs, msg):
    kw = {"query": "logits", "labels": True, "n_teachers": 1, **kwargs}
    with pytest.raises(NastyError, match=msg):
        check_requirements(get_attack(method), **kw)


def test_requirements_accepted_and_degraded():
    (note,) = check_requirements(get_attack("kd"), query="label")
    assert note.startswith("label-only access: the KD term is alpha * T^2 * cross-entropy")  # what the loss is (issue 11)
    assert check_requirements(get_attack("copycat"), query="label", labels=False) == []
    assert check_requirements(get_attack("knockoff"), query="topk:2", labels=False, unlabelled_queries=True, augment="mixup") == []
    assert check_requirements(get_attack("hint"), query="weights") == []
    assert check_requirements(get_attack("ensemble"), query="probs", n_teachers=3) == []


@pytest.mark.parametrize("method,params,msg", [
    ("tllm", {"mode": "sometimes"}, "mode must be oneshot or online"),
    ("tllm", {"delta": -1}, "delta"),
    ("tllm", {"patience": 0}, "patience"),
    ("skeptical", {"sd_weight": 2}, "sd_weight"),
    ("skeptical", {"kd_delay": -1}, "kd_delay"),
    ("averager", {"average": "median"}, "probs or logits"),
    ("hint", {"beta": -1}, "beta"),
    ("knockoff", {"temperature": 0}, "temperature"),
    ("kd", {"head_stage": 2}, "no parameter 'head_stage'"),
])
def test_bad_parameters(method, params, msg):
    with pytest.raises(NastyError, match=msg):
        get_attack(method)(**params)


def test_run_attack_refuses_before_training(digits):
    teacher = create_model("cnn:width=0.25", 10, 1, (8, 8)).eval()
    cfg = TrainConfig(epochs=1)
    with pytest.raises(NastyError, match="needs teacher access weights"):
        run_attack("hint", data=digits, teachers=[teacher], student="mlp", train=cfg, query="probs", log=None)
    with pytest.raises(NastyError, match="query budget"):
        run_attack("kd", data=digits, teachers=[teacher], student="mlp", train=cfg, query_budget=10**6, log=None)
