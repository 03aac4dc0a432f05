"""Output defenses (nasty.defenses.output): golden values, batch safety, parsing, the model wrapper, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nasty.defenses.output import (DefendedModel, GaussianNoise, HighConfidence, Label, ReverseSigmoid, Round, TopK,
                                   parse_output_defense)
from nasty.errors import NastyError

P = torch.tensor([[0.5, 0.3, 0.15, 0.05],
                  [0.1, 0.2, 0.3, 0.4],
                  [0.02, 0.9, 0.05, 0.03]], dtype=torch.float64)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


def test_topk_golden_renormalised():
    out = TopK(k=2)(P)
    assert close(out, [[0.625, 0.375, 0, 0], [0, 0, 3 / 7, 4 / 7], [0, 0.9 / 0.95, 0.05 / 0.95, 0]])
    assert close(TopK(k=1)(P), [[1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]])
    assert close(TopK(k=10)(P), P)  # k >= C keeps everything


def test_round_golden_and_top_class_kept():
    p = torch.tensor([[0.62, 0.27, 0.08, 0.03], [0.041, 0.04, 0.919, 0.0]], dtype=torch.float64)
    assert close(Round(decimals=1)(p), [[0.6, 0.3, 0.1, 0.0], [0.0, 0.0, 0.9, 0.0]])
    assert close(Round(decimals=2)(p), [[0.62, 0.27, 0.08, 0.03], [0.04, 0.04, 0.92, 0.0]])
    flat = torch.full((2, 25), 0.04, dtype=torch.float64)  # every entry rounds to 0 at one decimal
    out = Round(decimals=1)(flat)
    assert close(out.sum(1), [0.1, 0.1]) and (out > 0).sum(1).tolist() == [1, 1]


def test_label_marks_each_rows_own_winner():
    out = Label()(P)
    assert close(out, [[1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]])
    assert out.sum(1).tolist() == [1.0, 1.0, 1.0]  # the known bug puts every row's winner in every row


def test_reverse_sigmoid_golden(rsig_reference):
    out = ReverseSigmoid(beta=1.0, gamma=0.1)(P)
    assert close(out[0], [0.439557, 0.282344, 0.169897, 0.108202], 1e-5)  # worked by hand
    for beta, gamma in ((1.0, 0.1), (0.7, 0.5), (2.0, 0.05)):
        out = ReverseSigmoid(beta=beta, gamma=gamma)(P)
        for i in range(len(P)):
            assert close(out[i], rsig_reference(P[i].tolist(), beta, gamma), 1e-9)
    assert close(out.sum(1), [1, 1, 1])
    assert close(ReverseSigmoid()(torch.tensor([[0.5, 0.5]], dtype=torch.float64)), [[0.5, 0.5]])  # p = 1/2: no perturbation


def test_cutoff_golden_keeps_top_class():
    out = HighConfidence(threshold=0.25)(P)
    assert close(out, [[0.5, 0.3, 0, 0], [0, 0, 0.3, 0.4], [0, 0.9, 0, 0]])
    low = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2001]], dtype=torch.float64)
    assert close(HighConfidence(threshold=0.25)(low), [[0, 0, 0, 0, 0.2001]])


def test_gaussian_noise_properties():
    assert close(GaussianNoise(scale=0.0)(P), P)
    a, b = GaussianNoise(scale=0.05, seed=3)(P), GaussianNoise(scale=0.05, seed=3)(P)
    assert torch.equal(a, b)  # seeded: reproducible
    assert (a >= 0).all() and close(a.sum(1), [1, 1, 1])
    big = torch.full((2000, 10), 0.1, dtype=torch.float64)
    out = GaussianNoise(scale=0.02, seed=0)(big)
    dev = (out - big).abs().mean().item()
    assert 0.01 < dev < 0.025  # about E|N(0, 0.02^2)| = 0.016, shrunk a little by renormalisation
    assert not torch.equal(out[0], out[1])  # rows get their own noise


@pytest.mark.parametrize("spec", ["topk:2", "round:2", "label", "rsig:beta=1.5:gamma=0.3", "cutoff:0.2", "topk:3,round:1"])
def test_batch_safety_rows_independent(spec):
    d = parse_output_defense(spec)
    gen = torch.Generator().manual_seed(0)
    p = F.softmax(torch.randn(16, 7, generator=gen, dtype=torch.float64) * 2, dim=1)
    whole = d(p)
    one_by_one = torch.cat([d(p[i:i + 1]) for i in range(len(p))])
    assert torch.allclose(whole, one_by_one)
    assert (whole.argmax(1) == p.argmax(1)).all() or spec.startswith("rsig")


def test_parse_describe_round_trip_and_aliases():
    d = parse_output_defense("topk:2,round:3")
    assert d.describe() == "topk:k=2,round:decimals=3"
    assert parse_output_defense(d.describe()).describe() == d.describe()
    assert parse_output_defense("stingy:1").describe() == "topk:k=1"
    assert parse_output_defense("rsig:gamma=0.2").describe() == "reverse-sigmoid:beta=1.0:gamma=0.2"
    assert parse_output_defense("gaussian:0.1:7").describe() == "noise:scale=0.1:seed=7"
    chain = parse_output_defense("topk:3,label")
    assert close(chain(P), Label()(P))


@pytest.mark.parametrize("spec,msg", [
    ("topc:2", "did you mean 'topk'"),
    ("topk:0", "topk k must be a positive integer"),
    ("topk:two", "not an integer"),
    ("round:2:3", "at most 1 value"),
    ("rsig:gama=1", "did you mean 'gamma'"),
    ("rsig:beta=-1", "beta must be positive"),
    ("cutoff:1.5", "threshold must be in (0, 1)"),
    ("noise:-0.1", "scale must be >= 0"),
    ("topk:2,,label", "empty item"),
    ("", "empty"),
])
def test_parse_errors(spec, msg):
    with pytest.raises(NastyError, match=None) as e:
        parse_output_defense(spec)
    assert msg in str(e.value)


def test_defended_model_wraps_any_model():
    torch.manual_seed(0)
    model = nn.Linear(5, 4).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    wrapped = DefendedModel(model, "topk:2")
    z = wrapped(x)
    expected = TopK(k=2)(F.softmax(model(x), 1))
    assert torch.allclose(F.softmax(z, 1), expected)
    assert (torch.isinf(z).sum(1) == 2).all()  # two withheld classes per row are -inf
    assert torch.equal(z.argmax(1), model(x).argmax(1))
    assert wrapped.describe() == "topk:k=2"
    lab = DefendedModel(model, "label")(x)
    assert torch.equal(lab.argmax(1), model(x).argmax(1)) and (torch.isfinite(lab).sum(1) == 1).all()


def test_oracle_applies_output_defense_in_attack(digits, small_teacher, tmp_path, run_cli):
    from nasty.runs import save_model

    save_model(tmp_path / "teacher", small_teacher, digits, {}, {})
    rc, out, err = run_cli("attack", "--teacher", tmp_path / "teacher", "--student", "mlp:hidden=16", "--epochs", "1",
                           "--output-defense", "topk:2,round:2", "--out", tmp_path / "a", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["resources"]["output_defense"] == "topk:k=2,round:decimals=2"
    rc, out, err = run_cli("attack", "--teacher", tmp_path / "teacher", "--output-defense", "topk:x", "--out", tmp_path / "b")
    assert rc == 2 and err.strip().count("\n") == 0 and "topk" in err
    assert not (tmp_path / "b").exists()  # refused before anything was written
