"""Output defenses (nasty.defenses.output) at their edges, written to kill mutmut's survivors (issue 15,
docs/results.md): rows a perturbation empties, probabilities of exactly 0, 1 or the threshold, large
reverse-sigmoid perturbations, the noise's generator and dtype, the template's fixed vectors."""

from __future__ import annotations


import pytest
import torch

from nasty.defenses.output import (GaussianNoise, HighConfidence, Label, ReverseSigmoid, Template, TopK, _renormalise,
                                   parse_output_defense)
from nasty.errors import NastyError


def test_renormalise_turns_an_emptied_row_into_the_one_hot_of_its_argmax():
    fallback = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.2, 0.0]], dtype=torch.float64)
    out = _renormalise(q, fallback)
    assert out.tolist() == [[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]


def test_defenses_refuse_a_single_row_vector():
    with pytest.raises(NastyError, match=r"output defense topk needs probabilities of shape \(N, C\), got \(3,\)"):
        TopK(k=2)(torch.tensor([0.5, 0.3, 0.2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_label_and_noise_keep_the_dtype(dtype):
    p = torch.tensor([[0.2, 0.8], [0.6, 0.4]], dtype=dtype)
    assert Label()(p).dtype == dtype and GaussianNoise(scale=0.1, seed=0)(p).dtype == dtype


@pytest.mark.parametrize("beta,gamma", [(1.0, 0.1), (10.0, 1.0), (3.0, 0.5)])
def test_reverse_sigmoid_at_exact_zero_and_one_and_large_perturbations(beta, gamma, rsig_reference):
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.99, 0.005, 0.005], [0.3, 0.3, 0.4]], dtype=torch.float64)
    out = ReverseSigmoid(beta=beta, gamma=gamma)(p)
    for i in range(len(p)):
        assert out[i].tolist() == pytest.approx(rsig_reference(p[i].tolist(), beta, gamma), abs=1e-9), (i, out[i])


def test_gaussian_noise_is_float64_noise_from_its_own_seeded_generator():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=torch.float64)
    noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.05
    q = (p + noise).clamp_min(0.0)
    expected = q / q.sum(1, keepdim=True)
    assert torch.allclose(GaussianNoise(scale=0.05, seed=5)(p), expected, atol=1e-12)
    assert torch.allclose(GaussianNoise(scale=0.05, seed=5)(p.float()), expected.float(), atol=1e-6)
    # noise that wipes out a whole row: the row's own argmax, one-hot
    big = GaussianNoise(scale=50.0, seed=0)
    rows = torch.tensor([[0.2, 0.8]] * 200, dtype=torch.float64)
    out = big(rows)
    assert torch.allclose(out.sum(1), torch.ones(200, dtype=torch.float64))
    wiped = (out == torch.tensor([0.0, 1.0], dtype=torch.float64)).all(1)
    assert wiped.any()  # some rows were all-negative before clipping


def test_cutoff_keeps_a_probability_equal_to_the_threshold():
    p = torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64)
    assert HighConfidence(threshold=0.25)(p).tolist() == [[0.5, 0.25, 0.0, 0.0]]


def test_template_fixed_vectors_shift_and_two_classes():
    p = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    out = Template(top=0.6, decoy=0.3, shift=2)(p)
    # decided class gets top, class (d + shift) mod C the decoy, the rest share what is left
    assert torch.allclose(out, torch.tensor([[0.05, 0.6, 0.05, 0.3], [0.6, 0.05, 0.3, 0.05]], dtype=torch.float64))
    two = Template(top=0.7, decoy=0.2)(torch.tensor([[0.4, 0.6], [0.9, 0.1]], dtype=torch.float64))
    assert torch.allclose(two, torch.tensor([[0.3, 0.7], [0.7, 0.3]], dtype=torch.float64))  # two classes: decoy = 1 - top
    assert parse_output_defense("template").describe() == "template:top=0.5:decoy=0.45:shift=1"


@pytest.mark.parametrize("kw,msg", [({"top": 0.4, "decoy": 0.5}, "0 < decoy < top < 1"),
                                    ({"top": 0.7, "decoy": 0.4}, "top + decoy <= 1"),
                                    ({"top": 1.0, "decoy": 0.0}, "0 < decoy"),
                                    ({"shift": 0}, "shift must be a positive integer"),
                                    ({"shift": True}, "shift")])
def test_template_validation(kw, msg):
    with pytest.raises(NastyError, match=re_escape(msg)):
        Template(**kw)


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


def test_template_decoy_position_wraps_and_three_classes():
    p4 = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]], dtype=torch.float64)
    one = Template(top=0.6, decoy=0.3, shift=1)(p4)
    assert one.argmax(1).tolist() == [0, 3] and (one == 0.3).nonzero()[:, 1].tolist() == [1, 0]  # d + 1 mod C
    four = Template(top=0.6, decoy=0.3, shift=4)(p4)  # shift mod (C - 1) = 1: never the decided class itself
    assert torch.equal(four, one)
    p3 = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    assert torch.allclose(Template(top=0.6, decoy=0.3)(p3), torch.tensor([[0.1, 0.6, 0.3]], dtype=torch.float64))


@pytest.mark.parametrize("spec", ["round:0", "round:12", "cutoff:0.001", "cutoff:0.999", "rsig:beta=0.001:gamma=0.001",
                                  "noise:0", "topk:1", "template:top=0.6:decoy=0.4", "template:top=0.5:decoy=0.001"])
def test_parameters_at_their_bounds_are_accepted(spec):
    parse_output_defense(spec)(torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64))


@pytest.mark.parametrize("spec,msg", [
    ("round:13", "round decimals must be an integer in 0..12, got 13"),
    ("round:-1", "in 0..12, got -1"),
    ("cutoff:0", "cutoff threshold must be in (0, 1), got 0.0"),
    ("cutoff:1", "cutoff threshold must be in (0, 1), got 1.0"),
    ("rsig:beta=0", "reverse-sigmoid beta must be positive"),
    ("rsig:gamma=0", "reverse-sigmoid gamma must be positive"),
    ("noise:0.1:1.5", "is not an integer"),
    ("rsig:beta=x", "'x' is not a number"),
    ("template:top=0.5:decoy=0", "template needs 0 < decoy < top < 1"),
    ("template:top=0.4:decoy=0.4", "template needs 0 < decoy < top < 1"),
    ("template:top=1:decoy=0.001", "template needs 0 < decoy < top < 1"),
    ("template:top=0.6:decoy=0.5", "top + decoy <= 1"),
    ("label:3", "output defense label takes at most 0 values (none), got 'label:3'"),
    ("round:2:3", "output defense round takes at most 1 values (decimals), got 'round:2:3'"),
    ("rsig:beta=2:beta=3", "output defense reverse-sigmoid: beta given twice in 'rsig:beta=2:beta=3'"),
    ("  ", "empty --output-defense spec (e.g. topk:2,round:3)"),
    ("rsig:1:2:3", "output defense reverse-sigmoid takes at most 2 values (beta, gamma), got 'rsig:1:2:3'"),
])
def test_out_of_range_parameters_are_refused_with_their_message(spec, msg):
    with pytest.raises(NastyError) as e:
        parse_output_defense(spec)
    assert msg in str(e.value), str(e.value)


def test_chains_and_wrappers_of_plain_callables():
    import torch.nn as nn

    from nasty.defenses.output import Compose, DefendedModel, make_output_defense

    def halve(p):
        return p / 2

    assert Compose([halve]).describe() == repr(halve)
    with pytest.raises(NastyError, match="an output defense chain needs at least one part"):
        Compose([])
    model = nn.Linear(3, 4)
    wrapped = DefendedModel(model, TopK(k=2))  # a defense object, not a spec
    assert wrapped.describe() == "topk:k=2" and (torch.isfinite(wrapped(torch.randn(5, 3))).sum(1) == 2).all()
    assert DefendedModel(model, halve).describe() == repr(halve)
    assert make_output_defense("stingy", k=1).describe() == "topk:k=1"  # aliases resolve
    with pytest.raises(NastyError, match="did you mean 'topk'"):
        make_output_defense("topc")
    with pytest.raises(NastyError, match="did you mean 'stingy'"):  # aliases are suggested too
        make_output_defense("stingi")
    with pytest.raises(NastyError, match="output defense topk has no parameter 'kk'"):
        make_output_defense("topk", kk=1)
