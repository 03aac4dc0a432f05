"""The one served function of a decision-locked teacher (nasty/models/served.py): the decision on top
with a real gap on every input, for every lock rule and keep kind, eager and exported; its golden
values; keep=confidence and its calibration bins; and the output chain after a lock."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from nasty.errors import NastyError
from nasty.models import create_model
from nasty.models.served import MIN_GAP, TOP_MAX, Served, fit_bins, lock_rule, parse_keep, serve, served_gap, top_floor

GAP = 1.01e-3  # what the gap rule aims at (MIN_GAP plus its rounding allowance), for golden values
RULES = [("swap", 0.0), ("margin", 0.0), ("margin", 0.5)]
KEEPS = ["decision", "confidence", "confidence:bins=4", "confidence:bins=1", "decision:top=2", "confidence:bins=3,top=2"]
NASTY_VALUES = [0.0, 1.0, -1.0, 1e-30, -1e-30, 1e30, -1e30, 3e38, -3e38, float("nan"), float("inf"), float("-inf")]


def _served(c: int, rule: str, margin: float, keep: str, seed: int = 0) -> Served:
    s = Served(c, rule, margin, keep)
    if s.bins is not None:  # bins fitted on a seeded synthetic validation set
        g = torch.Generator().manual_seed(seed)
        s.set_bins(*fit_bins(3 * torch.randn(200, c, generator=g), torch.randint(0, c, (200,), generator=g), s.bins))
    return s


@st.composite
def rows(draw, finite_normal: bool = False):
    """(nasty logits, normal logits) (N, C): random, tied, huge, tiny, all-equal and non-finite rows."""
    c = draw(st.integers(2, 12))
    n = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["random", "special", "tied", "equal", "scaled"]))
    if kind == "random":
        z = draw(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=n * c, max_size=n * c))
    elif kind == "special":
        z = draw(st.lists(st.sampled_from(NASTY_VALUES), min_size=n * c, max_size=n * c))
    elif kind == "tied":
        v = draw(st.sampled_from(NASTY_VALUES[:8]))
        z = [v if draw(st.booleans()) else draw(st.floats(-10, 10, width=32)) for _ in range(n * c)]
    elif kind == "equal":
        z = [draw(st.sampled_from(NASTY_VALUES))] * (n * c)
    else:
        scale = draw(st.sampled_from([1e-7, 1e-3, 1.0, 1e3, 1e20]))
        z = [scale * v for v in draw(st.lists(st.floats(-3, 3, width=32), min_size=n * c, max_size=n * c))]
    normal_values = st.floats(-50, 50, width=32) if finite_normal else \
        st.one_of(st.floats(-50, 50, width=32), st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e30]))
    normal = draw(st.lists(normal_values, min_size=n * c, max_size=n * c))
    return torch.tensor(z, dtype=torch.float32).view(n, c), torch.tensor(normal, dtype=torch.float32).view(n, c)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=rows(), rule=st.sampled_from(RULES), keep=st.sampled_from(KEEPS))
@example(data=(torch.tensor([[0.0, 104.0]]), torch.zeros(1, 2)), rule=("swap", 0.0), keep="decision:top=2")  # exp(-104) underflows
def test_the_served_argmax_is_the_decision_with_a_real_gap(data, rule, keep):
    """Every lock rule x keep kind, on any nasty logits: the served probabilities' argmax is the normal
    model's decision and leads every other class by MIN_GAP. Seen failing (gap 0 on tied rows, NaN rows)
    with the gap rule removed (``ok`` always true)."""
    z, normal = data
    out = _served(z.shape[1], *rule, keep)(z, normal)
    assert torch.isfinite(out).all()
    p = out.softmax(1)
    d = normal.argmax(1)
    assert torch.equal(p.argmax(1), d)
    assert float(served_gap(p, d).min()) >= MIN_GAP
    assert torch.allclose(p.sum(1), torch.ones(len(p)), atol=1e-5)


def test_the_old_float_step_tie_rule_would_fail_where_this_one_holds():
    """The measured failure: small logits with the margin rule, all-equal logits, NaN and two +inf."""
    g = torch.Generator().manual_seed(0)
    z = torch.cat([1e-6 * torch.randn(500, 10, generator=g), torch.zeros(10, 10),
                   torch.full((5, 10), float("nan")), torch.tensor([[float("inf"), float("inf")] + [0.0] * 8] * 5)])
    normal = torch.randn(len(z), 10, generator=g)
    for rule in RULES:
        for keep in KEEPS:
            p = _served(10, *rule, keep)(z, normal).softmax(1)
            assert torch.equal(p.argmax(1), normal.argmax(1)), (rule, keep)
            assert float(served_gap(p, normal.argmax(1)).min()) >= MIN_GAP, (rule, keep)


def test_golden_values():
    """Hand-checked: t_min = (1 + 2 g) / 3 for 3 classes; the cap mixes the others' shares with uniform."""
    t_min = (1 + 2 * GAP) / 3
    third = [(1 - t_min) / 2, t_min, (1 - t_min) / 2]
    # all-equal nasty logits (and a NaN row, sanitised to all-equal), decision 1: the least top leading uniform others
    normal = torch.tensor([[0.0, 1.0, 0.0]] * 2)
    p = serve(torch.tensor([[0.0, 0.0, 0.0], [float("nan"), 1.0, 2.0]]), normal).softmax(1)
    assert torch.allclose(p, torch.tensor([third, third]), atol=1e-7)
    # keep=confidence: top = the normal model's 0.7; the rest shared 3:1 as the locked nasty row says
    normal = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    z = torch.log(torch.tensor([[0.1, 0.3, 0.6]]))
    assert torch.allclose(serve(z, normal, "swap", keep="confidence").softmax(1), torch.tensor([[0.7, 0.225, 0.075]]), atol=1e-6)
    assert torch.allclose(serve(z, normal, "margin", keep="confidence").softmax(1), torch.tensor([[0.7, 0.1, 0.2]]), atol=1e-6)
    # the cap: top 0.4, others' shares 0.9 : 0.1 would put 0.54 on class 1; mixed with uniform until 0.4 - g
    normal = torch.log(torch.tensor([[0.4, 0.35, 0.25]]))
    z = torch.log(torch.tensor([[0.5, 0.45, 0.05]]))
    want = torch.tensor([[0.4, 0.4 - GAP, 0.2 + GAP]])
    assert torch.allclose(serve(z, normal, "margin", keep="confidence").softmax(1), want, atol=1e-6)
    # keep=decision where the row already leads: the locked row's softmax, untouched
    z = torch.tensor([[1.0, 5.0, 2.0]])
    want = torch.tensor([[1.0, 2.0, 5.0]]).softmax(1)
    assert torch.allclose(serve(z, torch.tensor([[0.0, 0.0, 1.0]])).softmax(1), want, atol=1e-7)


def test_fit_bins_golden():
    """4 validation rows, 2 classes, 2 equal-mass bins: edge at the median 0.75; accuracies 1/2 and 1."""
    conf = torch.tensor([0.6, 0.7, 0.8, 0.9])
    logits = torch.stack([torch.log(conf), torch.log(1 - conf)], 1)  # class 0 predicted
    edges, values = fit_bins(logits, torch.tensor([0, 1, 0, 0]), 2)
    assert torch.allclose(edges, torch.tensor([0.75]))
    assert torch.allclose(values, torch.tensor([top_floor(2), TOP_MAX]))  # 0.5 and 1.0, clipped


def test_one_bin_serves_the_validation_accuracy_on_every_row():
    """keep=confidence:bins=1: no inner edge, one value = the decisions' validation accuracy (3 of 4 right),
    served as the top probability of every row whatever the normal model's confidence: calibrated on
    average and nothing beyond the decision."""
    conf = torch.tensor([0.6, 0.7, 0.8, 0.9])
    logits = torch.stack([torch.log(conf), torch.log(1 - conf)], 1)
    edges, values = fit_bins(logits, torch.tensor([0, 1, 0, 0]), 1)
    assert edges.shape == (0,) and torch.allclose(values, torch.tensor([0.75]))
    s = Served(3, "swap", 0.0, "confidence:bins=1")
    s.set_bins(edges, values)
    g = torch.Generator().manual_seed(0)
    normal = 5 * torch.randn(500, 3, generator=g)
    top = s(torch.randn(500, 3, generator=g), normal).softmax(1).amax(1)
    assert torch.allclose(top, torch.full_like(top, 0.75), atol=1e-6)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=rows(finite_normal=True), rule=st.sampled_from(RULES))
def test_keep_confidence_serves_the_normal_top_probability(data, rule):
    """Where the gap allows (t_min <= p_max <= TOP_MAX) the served top is the normal model's p_max; else
    the nearest allowed value. Seen failing with the nasty row's own top served (keep ignored)."""
    z, normal = data
    c = z.shape[1]
    p_max = normal.double().softmax(1).amax(1)
    top = serve(z, normal, *rule, keep="confidence").softmax(1).amax(1).double()
    assert torch.allclose(top, p_max.clamp(top_floor(c), TOP_MAX), atol=1e-6, rtol=0)


def _synthetic(n: int, c: int, temper: float, seed: int):
    """Normal logits and labels drawn from softmax(logits / temper): calibrated for temper 1,
    overconfident above it."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, c, generator=g)
    y = torch.multinomial((logits / temper).softmax(1), 1, generator=g)[:, 0]
    return logits, y


@pytest.mark.parametrize("temper,slack", [(1.0, 1.0), (2.5, None)])
def test_keep_bins_calibrates_the_served_top_probability(temper, slack):
    """ECE of the served probabilities, bins fitted on a validation half, scored on the other half: no
    worse than the normal model's (+1 point) when it is calibrated, far better when overconfident.
    Seen failing (overconfident: served ECE 28.6 vs normal 28.8) with the bins left unfitted."""
    from nasty.metrics import expected_calibration_error as ece

    c, n = 10, 40000
    logits, y = _synthetic(2 * n, c, temper, 0)
    s = Served(c, "swap", 0.0, "confidence:bins=10")
    s.set_bins(*fit_bins(logits[:n], y[:n], 10))
    z = torch.randn(n, c, generator=torch.Generator().manual_seed(1))
    served = s(z, logits[n:]).softmax(1)
    normal_ece, served_ece = ece(logits[n:].softmax(1), y[n:]), ece(served, y[n:])
    assert torch.equal(served.argmax(1), logits[n:].argmax(1))
    if slack is not None:
        assert served_ece <= normal_ece + slack, (served_ece, normal_ece)
    else:
        assert normal_ece > 10 and served_ece < normal_ece / 3, (served_ece, normal_ece)


def test_keep_parsing():
    assert parse_keep("decision") == ("decision", None, None)
    assert parse_keep("confidence") == ("confidence", None, None)
    assert parse_keep("confidence:bins=2") == ("confidence", 2, None) and parse_keep("confidence:bins=1000") == ("confidence", 1000, None)
    assert parse_keep("decision:top=5") == ("decision", None, 5) and parse_keep("confidence:top=2") == ("confidence", None, 2)
    assert parse_keep("confidence:bins=3,top=5") == parse_keep(" confidence: top = 5 , bins = 3 ") == ("confidence", 3, 5)
    for bad in ("", "conf", "decision:bins=3", "confidence:bins=0", "confidence:bins=1001", "confidence:bins=nan",
                "confidence:bins=-3", "confidence:bins=2.5", "confidence:edges=3", "confidence:bins", None, 3,
                "confidence:", "decision:", "decision:top=1", "decision:top=0", "decision:top=1001", "decision:top=\u00b2",
                "confidence:bins=3,bins=3", "confidence:top=5,top=5", "confidence:bins=3,", "confidence:,top=5", "decision:top"):
        with pytest.raises(ValueError, match="keep must be"):
            parse_keep(bad)
    with pytest.raises(NastyError, match="^model locked: keep must be"):
        create_model("locked:keep='confidence:bins=0'", 10, 1, (8, 8))
    with pytest.raises(NastyError, match="top=11 is more than the 10 classes"):
        create_model("locked:keep='decision:top=11'", 10, 1, (8, 8))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=rows(finite_normal=True), rule=st.sampled_from(RULES), kind=st.sampled_from(["decision", "confidence", "confidence:bins=3"]),
       top=st.integers(2, 12))
def test_keep_top_serves_the_normal_models_top_set(data, rule, kind, top):
    """``top=K``: the served K most probable classes are the normal model's K (the decision first, the
    nasty order within the set and outside it), and the other classes' shares are the nasty part's
    shares, permuted. Checked on rows whose nasty logits are finite and distinct (elsewhere shares tie).
    Seen failing with the set taken from the nasty logits instead of the normal ones."""
    z, normal = data
    c = z.shape[1]
    top = min(top, c)
    keep = f"{kind}{',' if 'bins' in kind else ':'}top={top}"
    s, plain = _served(c, *rule, keep), _served(c, *rule, kind)
    with torch.no_grad():
        p, q = s(z, normal).exp().double(), plain(z, normal).exp().double()
    d = normal.argmax(1)
    locked = lock_rule(z.double(), d[:, None], *rule)  # the nasty order after the lock rule
    for i in range(len(z)):
        zi = locked[i]
        if not torch.isfinite(z[i]).all() or len(set(zi.tolist())) < c or zi.abs().max() > 1e6:
            continue
        n_order = normal[i].double().scatter(0, d[i:i + 1], float("inf")).argsort(descending=True, stable=True)
        served_order = p[i].argsort(descending=True, stable=True)
        assert served_order[0] == d[i]
        if len(set(p[i].tolist())) == c:  # distinct served probabilities: the set and the orders are exact
            assert set(served_order[:top].tolist()) == set(n_order[:top].tolist())
            in_set, rest = served_order[1:top], served_order[top:]
            assert torch.equal(zi[in_set].argsort(descending=True), torch.arange(len(in_set)))
            assert torch.equal(zi[rest].argsort(descending=True), torch.arange(len(rest)))
        # the same top probability and the same multiset of other shares as without the set
        assert abs(float(p[i, d[i]] - q[i, d[i]])) <= 1e-6
        others = lambda v: torch.sort(v[torch.arange(c) != d[i]]).values
        assert torch.allclose(others(p[i]), others(q[i]), atol=1e-6)


def test_the_lock_serves_the_function_and_its_bins_round_trip(tmp_path, digits):
    """LockedTeacher.forward is serve() on its parts; the bins are buffers a checkpoint restores."""
    from nasty.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    m = create_model("locked", 10, 1, (8, 8), decision="cnn:width=0.25", lock="margin", margin=0.5, keep="confidence:bins=5").eval()
    x = digits.x_test[:100]
    with torch.no_grad():
        normal = m.decision(x)
        m.served.set_bins(*fit_bins(normal, digits.y_test[:100], 5))
        want = serve(m.nasty(m.decision.forward_features(x)), normal, "margin", 0.5, "confidence:bins=5",
                     m.served.bin_edges, m.served.bin_values)
        assert torch.equal(m(x), want)
    save_checkpoint(tmp_path / "c", m, classes=digits.classes, input_shape=(1, 8, 8), mean=digits.mean, std=digits.std, dataset="digits")
    back, side = load_checkpoint(tmp_path / "c")
    assert side["model"]["kwargs"]["keep"] == "confidence:bins=5"
    assert torch.equal(back.served.bin_values, m.served.bin_values) and torch.equal(back.served.bin_edges, m.served.bin_edges)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


@pytest.mark.parametrize("keep", KEEPS)
def test_the_head_trains_through_what_is_served(digits, keep):
    """ServedHead on the cached features (normal logits appended) = the assembled teacher's forward."""
    import dataclasses

    from nasty.defenses.lock import ServedHead, _with_normal_logits, assemble, served_for
    from nasty.models.locked import head_module

    torch.manual_seed(0)
    normal = create_model("cnn:width=0.25", 10, 1, (8, 8)).eval()
    dcfg = {"lock_rule": "swap", "lock_margin": 0.0, "keep": keep, "nasty_head": "linear"}
    data = dataclasses.replace(digits)
    head = head_module("linear", normal.num_features, 10)
    net = ServedHead(head, served_for(normal, data, dcfg))
    locked = assemble(normal, head, data, "two-head", dcfg)
    x = digits.x_test[:100]
    with torch.no_grad():
        assert torch.allclose(net(_with_normal_logits(normal, x)[:, :, None, None]), locked(x), atol=1e-6)


# ---- exported: the same probabilities

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each lock rule x keep kind exported once (served probabilities of (nasty, normal) logits)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")

    class Probe(torch.nn.Module):
        def __init__(self, served):
            super().__init__()
            self.served = served

        def forward(self, z, normal):
            return self.served(z, normal).softmax(1)

    out = {}
    folder = tmp_path_factory.mktemp("onnx")
    for c in (2, 7):
        for rule in RULES:
            for keep in KEEPS:
                probe = Probe(_served(c, *rule, keep)).eval()
                path = folder / f"{c}-{rule[0]}-{rule[1]}-{keep.replace(':', '_')}.onnx"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(probe, (torch.randn(2, c), torch.randn(2, c)), str(path), dynamo=False,
                                      input_names=["z", "normal"], output_names=["p"], opset_version=17,
                                      dynamic_axes={"z": {0: "n"}, "normal": {0: "n"}, "p": {0: "n"}})
                out[(c, rule, keep)] = (probe, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=rows(finite_normal=True), rule=st.sampled_from(RULES), keep=st.sampled_from(KEEPS), c=st.sampled_from([2, 7]))
def test_the_exported_function_serves_the_same_probabilities(exported, data, rule, keep, c):
    """ONNX Runtime = eager, on the same hostile rows (the normal logits finite: a NaN decision is
    torch's argmax convention). Seen failing with the traced graph given no gap rule (eager
    kept it)."""
    z, normal = data
    z, normal = torch.cat([z] * c, 1)[:, :c], torch.cat([normal] * c, 1)[:, :c]
    probe, sess = exported[(c, rule, keep)]
    with torch.no_grad():
        want = probe(z, normal)
    got = torch.from_numpy(sess.run(["p"], {"z": z.numpy(), "normal": normal.numpy()})[0])
    assert float((got - want).abs().max()) <= 1e-6
    assert torch.equal(got.argmax(1), normal.argmax(1)) and float(served_gap(got, normal.argmax(1)).min()) >= MIN_GAP


# ---- the output chain after a lock

KEEPING = st.one_of(st.builds(lambda k: f"topk:{k}", st.integers(1, 12)), st.builds(lambda d: f"round:{d}", st.integers(0, 12)),
                    st.just("label"), st.builds(lambda t: f"cutoff:{t:g}", st.floats(0.01, 0.99)), st.just("template"))


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=rows(finite_normal=True), rule=st.sampled_from(RULES), keep=st.sampled_from(KEEPS),
       chain=st.lists(KEEPING, min_size=1, max_size=3).map(",".join))
@example(data=(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])), rule=("swap", 0.0), keep="decision", chain="round:1")
@example(data=(torch.zeros(1, 10), torch.eye(10)[:1]), rule=("margin", 0.0), keep="decision", chain="topk:3,round:2")
def test_a_chain_a_lock_accepts_keeps_its_decision_with_a_gap(data, rule, keep, chain):
    """Every output defense declared keeps_decision, in any chain, after the served function: the decision
    on top by at least MIN_GAP / 2. Seen failing (round:1 tying the rows the gap rule served 0.5005 and
    0.4995) with round's 10**-d lead removed."""
    from nasty.defenses.output import check_after_lock, parse_output_defense

    z, normal = data
    c = z.shape[1]
    parsed = parse_output_defense(chain)
    try:
        check_after_lock(parsed, c)
    except NastyError as e:
        assert "template" in str(e)  # only the template can be refused for a class count (its rest above its top)
        return
    p = parsed(_served(c, *rule, keep)(z, normal).softmax(1))
    d = normal.argmax(1)
    assert torch.equal(p.argmax(1), d), chain
    assert float(served_gap(p, d).min()) >= MIN_GAP / 2, chain


@pytest.fixture(scope="module")
def locked_ckpt(tmp_path_factory, digits):
    from nasty.checkpoint import save_checkpoint

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("locked") / "L"
    save_checkpoint(folder, create_model("locked", 10, 1, (8, 8), decision="cnn:width=0.25"), classes=digits.classes,
                    input_shape=(1, 8, 8), mean=digits.mean, std=digits.std, dataset="digits")
    return folder


def _refused(rc, out, err, name):
    assert rc == 2 and err.startswith("error: ") and err.strip().count("\n") == 0 and "Traceback" not in err, (rc, err)
    assert f"output defense {name} can move a locked teacher's decision" in err and "refused" in err, err


def test_defended_model_refuses_a_decision_moving_defense_after_a_lock(locked_ckpt, digits):
    from nasty.checkpoint import load_checkpoint
    from nasty.defenses.output import DefendedModel

    model, _ = load_checkpoint(locked_ckpt)
    for spec, name in (("reverse-sigmoid", "reverse-sigmoid:beta=1.0:gamma=0.1"), ("topk:2,noise:0.1", "noise:scale=0.1:seed=0")):
        with pytest.raises(NastyError, match=f"^output defense {name} can move a locked teacher's decision"):
            DefendedModel(model, spec)
    with pytest.raises(NastyError, match="not a declared output defense"):
        DefendedModel(model, lambda p: p)
    x = digits.x_test[:200]
    with torch.no_grad():
        d = model.decision(x).argmax(1)
        for spec, gap in (("round:1", 0.1), ("round:2", 0.01), ("topk:2", MIN_GAP), ("label", 1.0), ("cutoff:0.3", MIN_GAP)):
            p = DefendedModel(model, spec).probabilities(x)
            assert torch.equal(p.argmax(1), d) and float(served_gap(p, d).min()) >= gap - 1e-6, spec
    DefendedModel(create_model("cnn:width=0.25", 10, 1, (8, 8)), "reverse-sigmoid")  # a plain model: any chain


def test_attack_and_audit_refuse_it_before_anything_runs(run_cli, locked_ckpt, tmp_path):
    name = "reverse-sigmoid:beta=1.0:gamma=0.1"
    _refused(*run_cli("attack", "--method", "kd", "--teacher", locked_ckpt, "--student", "mlp:hidden=16", "--epochs", "1",
                      "--query", "probs", "--output-defense", "reverse-sigmoid", "--out", tmp_path / "a"), name)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    _refused(*run_cli("audit", locked_ckpt, "--attacks", "kd", "--seeds", "1", "--query", "probs", "--epochs", "1",
                      "--output-defense", "reverse-sigmoid", "--out", tmp_path / "b"), name)
    assert not (tmp_path / "b" / "runs").exists()


def test_keep_on_the_command_line(run_cli, tmp_path):
    """--keep is checked with the config, before anything trains; --lock none has nothing to keep."""
    tiny = ["train-defended", "--dataset", "digits", "--epochs", "1", "--no-probe"]
    for value in ("confidence:bins=0", "confidence:bins=x", "top"):
        rc, _, err = run_cli(*tiny, "--keep", value, "--out", tmp_path / "o")
        assert rc == 2 and err.strip().count("\n") == 0 and "keep" in err and "confidence:bins=B" in err, err
    rc, _, err = run_cli(*tiny, "--keep", "confidence", "--lock", "none", "--out", tmp_path / "o")
    assert rc == 2 and "--lock none" in err and err.strip().count("\n") == 0, err
    rc, _, err = run_cli(*tiny, "--keep", "confidence:bins=3,top=11", "--out", tmp_path / "o")  # digits has 10 classes
    assert rc == 2 and "top=11 is more than the 10 classes" in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "o" / "normal").exists()


def test_train_defended_keep_bins_fits_on_validation(tmp_path, digits):
    """A tiny two-head run with keep=confidence:bins=5: the artifact's bins are the validation split's,
    its decisions the normal model's with the gap, its top probability the bin value."""
    from nasty.checkpoint import load_checkpoint
    from nasty.config import load_config
    from nasty.pipelines.defended import train_defended

    cfg = load_config(None, {"model": {"name": "cnn:width=0.25"}, "train": {"epochs": 2, "batch_size": 64, "seed": 0},
                             "defense": {"omega": 0.1, "head_epochs": 2, "keep": "confidence:bins=5"}})
    cfg["probe"]["enabled"] = False
    r = train_defended(cfg, tmp_path / "d", log=lambda m: None)
    assert r["accuracy_drop"] == 0.0 and r["defense_info"]["lock"]["keep"] == "confidence:bins=5"
    model, _ = load_checkpoint(tmp_path / "d" / "defended")
    normal, _ = load_checkpoint(tmp_path / "d" / "normal")
    with torch.no_grad():
        from nasty.metrics import predict_logits

        edges, values = fit_bins(predict_logits(normal, digits.x_val), digits.y_val, 5)  # as the run computed them
        assert torch.equal(model.served.bin_edges, edges) and torch.equal(model.served.bin_values, values)
        p = model(digits.x_test).softmax(1)
        n = normal(digits.x_test)
    d = n.argmax(1)
    assert torch.equal(p.argmax(1), d) and float(served_gap(p, d).min()) >= MIN_GAP
    from nasty.models.served import bin_of

    want = values[bin_of(n.softmax(1).amax(1, keepdim=True), edges)[:, 0]]
    assert torch.allclose(p.amax(1), want, atol=1e-6)
    assert not math.isnan(float(p.sum()))
    assert "validation split (" in r["defense_info"]["lock"]["calibration"]  # no held-out images: said so


def test_bins_calibrate_on_the_owners_held_out_images_when_the_teacher_trained_on_a_subset(tmp_path):
    """With a train_subset the bins are fitted on owner_holdout's images (never trained on, never used to pick
    an epoch), not on the validation split that selected the normal model's epoch; the run says where.
    Seen failing (bins equal to the validation split's) with the calibration split not passed to assemble."""
    from nasty.checkpoint import load_checkpoint
    from nasty.config import load_config
    from nasty.metrics import predict_logits
    from nasty.pipelines.defended import calibration_split, owner_holdout, train_defended
    from nasty.pipelines.leakage import thief_pool
    from nasty.runs import data_from_config

    cfg = load_config(None, {"data": {"train_subset": 500}, "model": {"name": "cnn:width=0.25"},
                             "train": {"epochs": 2, "batch_size": 64, "seed": 0},
                             "defense": {"omega": 0.1, "head_epochs": 2, "keep": "confidence:bins=3"},
                             "probe": {"labelled": 20, "queries": 100}})
    cfg["probe"]["enabled"] = False
    r = train_defended(cfg, tmp_path / "d", log=lambda m: None)
    data = data_from_config(cfg)
    x, y = owner_holdout(cfg, thief_pool(cfg, data)[0], data)
    assert len(y) > 2 * len(data.y_val) and calibration_split(cfg, data)[0][1].tolist() == y.tolist()
    assert r["defense_info"]["lock"]["calibration"].startswith(f"calibration bins fitted on {len(y)} held-out images")
    model, _ = load_checkpoint(tmp_path / "d" / "defended")
    normal, _ = load_checkpoint(tmp_path / "d" / "normal")
    with torch.no_grad():
        edges, values = fit_bins(predict_logits(normal, x), y, 3)
        val_edges, _ = fit_bins(predict_logits(normal, data.x_val), data.y_val, 3)
    assert torch.equal(model.served.bin_edges, edges) and torch.equal(model.served.bin_values, values)
    assert not torch.equal(edges, val_edges)
    cfg["defense"]["keep"] = "decision"
    assert calibration_split(cfg, data) == (None, None)
