"""Issue 22, class 6: an artifact is what its name says.

A defended file never serves other decisions than its model's (nasty/export.py ``check_keeps_decisions``,
on PyTorch's chain before writing and on the written file); a lock is refused when its nasty part is its
decision model or serves its decision model's probabilities (nasty/pipelines/checkpoints.py ``_lock``);
the decision model of a locked multi-adversary teacher is the adversary named by ``--model``
(nasty/pipelines/defended.py)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from nasty.checkpoint import load_checkpoint, save_checkpoint
from nasty.errors import NastyError
from nasty.export import _part_names, check_keeps_decisions, export_cmd, run_exported, ServedModel, exportable_output_defense

SPEC = "mlp:hidden=16"


def _trained(digits, seed: int, epochs: int = 2):
    from nasty.models import create_model
    from nasty.train import TrainConfig, ce_objective, fit

    torch.manual_seed(seed)
    model = create_model(SPEC, digits.num_classes, digits.in_channels, digits.image_size)
    fit(model, ce_objective(), digits, TrainConfig(epochs=epochs, batch_size=64, lr=0.05, seed=seed), log=None)
    return model.eval()


def _save(folder, model, digits):
    save_checkpoint(folder, model, classes=digits.classes, input_shape=(digits.in_channels, *digits.image_size),
                    mean=digits.mean, std=digits.std, dataset="digits", config={"model": {"name": SPEC}})
    return folder


@pytest.fixture(scope="module")
def plain(digits, tmp_path_factory):
    return _save(tmp_path_factory.mktemp("plain") / "a", _trained(digits, 0), digits)


@pytest.fixture(scope="module")
def other(digits, tmp_path_factory):
    return _save(tmp_path_factory.mktemp("other") / "b", _trained(digits, 1), digits)


def invoke(*args):
    res = CliRunner().invoke(export_cmd, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


# ---- (b) an exported defended file decides as its model does

CHAINS = st.one_of(
    st.builds(lambda b, g: f"reverse-sigmoid:beta={b:g}:gamma={g:g}", st.floats(0.01, 1e6), st.floats(0.01, 100)),
    st.builds(lambda k: f"topk:{k}", st.integers(1, 12)),
    st.builds(lambda d: f"round:{d}", st.integers(0, 6)),
    st.builds(lambda t: f"cutoff:{t:g}", st.floats(0.0, 1.0)),
    st.just("label"), st.just("template"),
)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(chain=st.lists(CHAINS, min_size=1, max_size=3).map(",".join))
def test_an_exported_file_never_serves_other_decisions(plain, tmp_path_factory, chain):
    """Whatever the chain: either the export is refused, naming the output defense that moves a decision,
    or the file's argmax is the model's own decision on every checked image. Seen failing
    (reverse-sigmoid with a large beta exported, 'argmax agrees on 100%') with check_keeps_decisions
    and the file check made no-ops."""
    try:
        exportable_output_defense(chain)
    except NastyError:
        return  # refused as a spec (bounds): not this invariant
    out = tmp_path_factory.mktemp("x") / "m.pt"
    rc, stdout, err = invoke(plain, "--format", "torchscript", "--out", out, "--output-defense", chain)
    model, side = load_checkpoint(plain)
    from nasty.export import check_images

    x = check_images(side)
    decisions = ServedModel(model, side["normalization"]["mean"], side["normalization"]["std"]).decisions(x)
    if rc == 0:
        got = run_exported(out, x, "torchscript")
        top, mine = got.max(1).values, got.gather(1, decisions[:, None])[:, 0]
        assert bool((mine >= top).all()) and bool((got.min(1).values < top).all()), chain  # the decision on top, never a flat row
        assert "the model's own decision on 100%" in stdout
    else:
        assert rc == 2 and len(err.strip().splitlines()) == 1 and not out.exists(), err
        assert "output defense " in err and "changes the model's decision" in err, err
        assert any(name in err for name in _part_names(chain)), err


def test_a_decision_moving_reverse_sigmoid_is_refused_by_name(plain, tmp_path):
    rc, _, err = invoke(plain, "--format", "torchscript", "--out", tmp_path / "m.pt", "--output-defense",
                        "topk:3,reverse-sigmoid:beta=1000000")
    assert rc == 2 and "output defense reverse-sigmoid:beta=1000000" in err.replace("1e+06", "1000000") and \
        "changes the model's decision" in err, err
    assert not (tmp_path / "m.pt").exists()


def test_the_check_names_the_step(plain):
    model, side = load_checkpoint(plain)
    parts, _ = exportable_output_defense("topk:2,reverse-sigmoid:beta=1000000")
    served = ServedModel(model, side["normalization"]["mean"], side["normalization"]["std"], parts)
    from nasty.export import check_images

    with pytest.raises(NastyError, match=r"^output defense reverse-sigmoid.* changes the model's decision"):
        check_keeps_decisions(served, _part_names("topk:2,reverse-sigmoid:beta=1000000"), check_images(side))


# ---- (a) a lock whose nasty part is (or serves as) its decision model is refused


def _lock(run_cli, decision, nasty_part, out):
    return run_cli("lock", "--decision", decision, "--nasty", nasty_part, "--out", out)


def _one_line(rc, err, *needles):
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (rc, err)
    for n in needles:
        assert n in err, err


def test_lock_refuses_the_decision_model_as_its_own_nasty_part(run_cli, plain, tmp_path):
    """Seen failing (a 'locked' teacher written) with the sha256 comparison in pipelines/checkpoints._lock
    and check_lock_defends both removed."""
    _one_line(*_lock(run_cli, plain, plain, tmp_path / "l")[::2], "decision model's own weights")
    assert not (tmp_path / "l").exists()


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(shift=st.floats(-50, 50).filter(lambda v: abs(v) > 1e-3))
def test_lock_refuses_a_nasty_part_that_serves_the_decision_models_probabilities(run_cli, plain, digits, tmp_path_factory, shift):
    """Other bytes, same probabilities (every logit shifted by one constant): caught on data, not by the
    files. Seen failing (locked, exit 0) with check_lock_defends made a no-op."""
    model, side = load_checkpoint(plain)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias += shift
    folder = tmp_path_factory.mktemp("shift")
    twin = _save(folder / "twin", model, digits)
    rc, _, err = _lock(run_cli, plain, twin, folder / "l")
    _one_line(rc, err, "decision model's own probabilities", "validation images of digits")
    assert not (folder / "l").exists()


def test_lock_of_two_different_models_is_kept(run_cli, plain, other, tmp_path):
    rc, out, err = _lock(run_cli, plain, other, tmp_path / "l")
    assert rc == 0, err
