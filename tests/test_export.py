"""`nasty export`: one ONNX (or TorchScript) file with the whole served defense, checked against
nasty's own eager serving path on every digits test image; bad input is one line, exit 2."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nasty.models.served import served_gap
from nasty.export import _EXPORTABLE, export_cmd, exportable_output_defense, reference_probabilities

DEFENSES = [None, "topk:2", "round:2", "topk:3,round:3", "cutoff:0.2", "template", "label", "topk:4,round:1"]


def invoke(*args):
    """The command on its own (click's runner, stderr apart): (exit code, stdout, stderr)."""
    res = CliRunner().invoke(export_cmd, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="module")
def locked_run(tmp_path_factory):
    """A decision-locked teacher from the default command (two-head lock, swap rule), tiny."""
    from nasty.cli import main

    out = tmp_path_factory.mktemp("export") / "defended"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["train-defended", "--dataset", "digits", "--model", "cnn:width=0.25", "--epochs", "2", "--omega", "0.1",
                   "--head-epochs", "2", "--no-probe", "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def test_images(digits):
    """Every test image of digits as the exported file takes it: pixels in [0, 1], before normalisation."""
    mean = torch.tensor(digits.mean).view(1, -1, 1, 1)
    std = torch.tensor(digits.std).view(1, -1, 1, 1)
    return (digits.x_test * std + mean).clamp(0, 1)


def onnx_probabilities(path: Path, x: torch.Tensor) -> torch.Tensor:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images"] and [o.name for o in sess.get_outputs()] == ["probabilities"]
    return torch.from_numpy(sess.run(["probabilities"], {"images": x.numpy()})[0])


@pytest.mark.parametrize("defense", DEFENSES)
def test_onnx_serves_what_nasty_serves(locked_run, test_images, tmp_path, defense):
    """ONNX Runtime on every test image = nasty's eager path (the served function, DefendedModel)."""
    pytest.importorskip("onnx")
    from nasty.checkpoint import load_checkpoint

    f = tmp_path / "m.onnx"
    rc, out, err = invoke(locked_run, "--out", f, "--json", *(["--output-defense", defense] if defense else []))
    assert rc == 0, err
    res = json.loads(out)
    assert res["output"]["name"] == "probabilities" and res["check"]["argmax_agreement"] == 1.0
    model, side = load_checkpoint(locked_run)
    got = onnx_probabilities(f, test_images)
    ref = reference_probabilities(model, side, test_images, defense)
    diff = float((got - ref).abs().max())
    print(f"\n{defense}: {len(test_images)} test images, max |onnx - torch| = {diff:.3g}")
    assert diff <= 1e-4
    assert torch.equal(got.argmax(1), ref.argmax(1))  # every test image
    # the lock is in the file: its decisions are the normal model's (after every output defense a locked
    # teacher accepts, with a gap), its soft outputs the nasty head's
    norm = side["normalization"]
    with torch.no_grad():
        normal = model.decision((test_images - torch.tensor(norm["mean"]).view(1, -1, 1, 1)) / torch.tensor(norm["std"]).view(1, -1, 1, 1))
    assert torch.equal(got.argmax(1), normal.argmax(1))
    assert float(served_gap(got, normal.argmax(1)).min()) >= (1e-3 if defense != "round:2" else 1e-2) - 1e-6
    if defense is None:
        assert (got - normal.softmax(1)).abs().max() > 0.1


def test_margin_lock_and_a_timm_decision_model(locked_run, test_images, tmp_path):
    """The other lock rule, on a library model (random init): the same agreement."""
    pytest.importorskip("onnx")
    pytest.importorskip("timm")
    from nasty.checkpoint import read_sidecar, save_checkpoint
    from nasty.models import create_model

    _, side = read_sidecar(locked_run)
    torch.manual_seed(0)
    m = create_model("locked:decision='timm:test_resnet',lock='margin',margin=0.5", 10, 1, (8, 8)).eval()
    save_checkpoint(tmp_path / "ck", m, classes=side["classes"], input_shape=(1, 8, 8), mean=side["normalization"]["mean"],
                    std=side["normalization"]["std"], dataset="digits")
    rc, out, err = invoke(tmp_path / "ck", "--out", tmp_path / "m.onnx", "--output-defense", "topk:3")
    assert rc == 0, err
    got = onnx_probabilities(tmp_path / "m.onnx", test_images)
    ref = reference_probabilities(m, {"normalization": side["normalization"]}, test_images, "topk:3")
    assert float((got - ref).abs().max()) <= 1e-4 and torch.equal(got.argmax(1), ref.argmax(1))


def test_torchscript(locked_run, test_images, tmp_path):
    from nasty.checkpoint import load_checkpoint

    rc, out, err = invoke(locked_run, "--format", "torchscript", "--out", tmp_path / "m.pt", "--output-defense", "round:3")
    assert rc == 0, err
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in torch 2.14
        got = torch.jit.load(str(tmp_path / "m.pt"))(test_images)
    model, side = load_checkpoint(locked_run)
    ref = reference_probabilities(model, side, test_images, "round:3")
    assert float((got - ref).abs().max()) <= 1e-4 and torch.equal(got.argmax(1), ref.argmax(1))


def test_exportable_forms_equal_the_eager_defenses():
    """Each exportable output defense is the eager one, also on the edge rows (ties, zeros, one-hot)."""
    from nasty.defenses.output import parse_output_defense

    g = torch.Generator().manual_seed(0)
    p = torch.rand(200, 10, generator=g) ** 4
    p = p / p.sum(1, keepdim=True)
    edge = torch.tensor([[0.5, 0.5] + [0.0] * 8, [1.0] + [0.0] * 9, [0.1] * 10, [0.0, 0.3, 0.3, 0.4] + [0.0] * 6])
    p = torch.cat([p, edge])
    specs = ["topk:1", "topk:2", "topk:12", "round:0", "round:1", "round:3", "label", "reverse-sigmoid", "reverse-sigmoid:beta=2:gamma=1",
             "cutoff:0.05", "cutoff:0.9", "template", "template:top=0.6:decoy=0.3:shift=3"]
    assert {s.split(":")[0] for s in specs} == set(_EXPORTABLE)
    for spec in specs:
        parts, _ = exportable_output_defense(spec)
        got = parts[0](p)
        want = parse_output_defense(spec)(p)
        assert torch.allclose(got, want, atol=1e-7), spec


def test_the_file_serves_the_one_served_function(locked_run):
    """The exported graph's model step is the locked teacher's own forward (no second tie rule)."""
    from nasty.checkpoint import load_checkpoint
    from nasty.export import ServedModel

    model, side = load_checkpoint(locked_run)
    served = ServedModel(model, side["normalization"]["mean"], side["normalization"]["std"])
    x = torch.randn(64, *side["input_shape"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(served.logits(x), model(x))


@pytest.mark.parametrize("chain,name", [("reverse-sigmoid", "reverse-sigmoid:beta=1.0:gamma=0.1"),
                                        ("topk:3,reverse-sigmoid:beta=0.5", "reverse-sigmoid:beta=0.5:gamma=0.1"),
                                        ("template:top=0.1:decoy=0.05", "template:top=0.1:decoy=0.05:shift=1")])
def test_an_output_defense_that_can_move_a_locked_decision_is_refused_by_name(locked_run, tmp_path, monkeypatch, chain, name):
    """After a locked teacher: one line naming the part, exit 2, no file, before the checkpoint is loaded."""
    import nasty.checkpoint

    monkeypatch.setattr(nasty.checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before refusing"))
    rc, out, err = invoke(locked_run, "--out", tmp_path / "m.onnx", "--format", "torchscript", "--output-defense", chain)
    assert rc == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"output defense {name} can move a locked teacher's decision" in err and "refused" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,needle", [
    (["--format", "tflite"], "unknown --format 'tflite'"),
    (["--output-defense", "noise:0.1"], "output defense noise:scale=0.1:seed=0 cannot be exported: it is random"),
    (["--output-defense", "topk:2,gaussian"], "output defense noise"),
    (["--output-defense", "round:nan"], "round decimals"),
    (["--output-defense", "reverse-sigmoid:beta=nan"], "beta"),
    (["--output-defense", "topkk:2"], "did you mean 'topk'"),
])
def test_bad_input_before_any_work(locked_run, tmp_path, monkeypatch, args, needle):
    """One line on stderr, exit 2, no file; refused before the checkpoint is even loaded."""
    import nasty.checkpoint

    monkeypatch.setattr(nasty.checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before refusing"))
    rc, out, err = invoke(locked_run, "--out", tmp_path / "m.onnx", *args)
    assert rc == 2 and out == ""
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists() and list(tmp_path.iterdir()) == []


def test_bad_paths(locked_run, tmp_path):
    """Checked before the tools: these refusals need no onnx either."""
    rc, _, err = invoke(tmp_path / "nope", "--out", tmp_path / "m.onnx")
    assert rc == 2 and "checkpoint not found" in err and err.count("\n") == 1
    (tmp_path / "m.onnx").write_bytes(b"old")
    rc, _, err = invoke(locked_run, "--out", tmp_path / "m.onnx")
    assert rc == 2 and "--force" in err and (tmp_path / "m.onnx").read_bytes() == b"old"
    rc, _, err = invoke(locked_run, "--out", Path(locked_run) / "defended" / "model.json", "--force")
    assert rc == 2 and "checkpoint itself" in err


def test_through_the_nasty_cli(locked_run, tmp_path, run_cli):
    """Registered in the CLI (one add_command), the same one-line contract, also for click's own errors."""
    pytest.importorskip("onnx")
    from nasty import cli

    had = cli.cli.commands.get("export")
    cli.cli.add_command(export_cmd)
    try:
        rc, out, err = run_cli("export", locked_run, "--out", tmp_path / "m.onnx", "--output-defense", "topk:2")
        assert rc == 0, err
        assert re.search(r"decision on 100% of them on top|not checked", out)
        rc, out, err = run_cli("export", locked_run)  # --out missing: a usage error
        assert rc == 2 and err.count("\n") == 1 and "--out" in err
        rc, out, err = run_cli("export", locked_run, "--out", tmp_path / "n.onnx", "--output-defense", "noise")
        assert rc == 2 and err.count("\n") == 1 and "random" in err
    finally:
        if had is None:
            cli.cli.commands.pop("export", None)
        else:
            cli.cli.add_command(had)


def test_readme_serving_example_runs(locked_run, tmp_path, monkeypatch):
    """The README's ONNX Runtime example, as written, on a file exported from a real run."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## Serving a defended model", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    rc, _, err = invoke(locked_run, "--out", tmp_path / "model.onnx")
    assert rc == 0, err
    monkeypatch.chdir(tmp_path)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 (our own README's example)
    assert re.search(r"\d", buf.getvalue())


def test_plain_teacher_and_two_net_lock(locked_run, test_images, tmp_path):
    """A checkpoint without a lock (the run's normal model), and the two-network lock."""
    pytest.importorskip("onnx")
    from nasty.checkpoint import load_checkpoint, save_checkpoint
    from nasty.models import create_model

    normal, side = load_checkpoint(locked_run / "normal")
    rc, _, err = invoke(locked_run / "normal", "--out", tmp_path / "n.onnx", "--output-defense", "reverse-sigmoid")
    assert rc == 0, err
    got = onnx_probabilities(tmp_path / "n.onnx", test_images)
    ref = reference_probabilities(normal, side, test_images, "reverse-sigmoid")
    assert float((got - ref).abs().max()) <= 1e-4 and torch.equal(got.argmax(1), ref.argmax(1))
    torch.manual_seed(1)
    two = create_model("locked:decision='cnn:width=0.25',nasty='mlp:hidden=16',form='two-net'", 10, 1, (8, 8)).eval()
    two.decision.load_state_dict(normal.state_dict())
    save_checkpoint(tmp_path / "two", two, classes=side["classes"], input_shape=(1, 8, 8), mean=side["normalization"]["mean"],
                    std=side["normalization"]["std"], dataset="digits")
    rc, _, err = invoke(tmp_path / "two", "--out", tmp_path / "t.onnx")
    assert rc == 0, err
    got = onnx_probabilities(tmp_path / "t.onnx", test_images)
    ref = reference_probabilities(two, side, test_images)
    assert float((got - ref).abs().max()) <= 1e-4 and torch.equal(got.argmax(1), ref.argmax(1))
    assert torch.equal(got.argmax(1), ref.argmax(1)) and torch.equal(ref.argmax(1), reference_probabilities(normal, side, test_images).argmax(1))


def test_an_unexportable_layer_is_named(tmp_path, capfd):
    """An operator ONNX lacks: one line naming it and the module it sits in; nothing written, nothing printed."""
    pytest.importorskip("onnx")
    from nasty.errors import NastyError
    from nasty.export import export_model

    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.nextafter(x, x + 1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
            self.odd = Odd()

        def forward(self, x):
            return self.odd(self.body(x))

    side = {"model": {"name": "net"}, "normalization": {"mean": [0.0], "std": [1.0]}, "input_shape": [1, 8, 8],
            "num_classes": 10, "classes": [str(i) for i in range(10)]}
    capfd.readouterr()
    with pytest.raises(NastyError) as e:
        export_model(Net(), side, tmp_path / "m.onnx")
    msg = str(e.value)
    assert "\n" not in msg and "aten::nextafter" in msg and "in module odd (Odd)" in msg, msg
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # the exporter's graph dump is not let through
    assert list(tmp_path.iterdir()) == []


def test_onnx_missing_says_how_to_install(locked_run, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    rc, out, err = invoke(locked_run, "--out", tmp_path / "m.onnx")
    assert rc == 2 and err.count("\n") == 1 and "pip install 'nasty[onnx]'" in err and not (tmp_path / "m.onnx").exists()
