"""Bring your own model: ``timm:NAME`` and ``torchvision:NAME`` specs through the registry, the
checkpoint format and every command (tiny digits runs: 8x8 images, one epoch, small subsets)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from nasty.errors import NastyError
from nasty.models import create_model, model_prefixes, model_spec, parse_model_spec

TIMM = "timm:test_resnet"  # timm's own 0.4M-parameter test ResNet
TV = "torchvision:shufflenet_v2_x0_5"  # 0.35M parameters
CONTRACT = [TIMM, "timm:mobilenetv3_small_050", TV, "torchvision:mobilenet_v3_small", "torchvision:resnet18"]


def needs(spec: str) -> None:
    if spec.startswith("timm:"):
        pytest.importorskip("timm")


@pytest.mark.parametrize("spec", CONTRACT)
def test_contract(spec):
    """forward = forward_head(forward_features), pooled (N, num_features) features, stages that run."""
    needs(spec)
    torch.manual_seed(0)
    m = create_model(spec, 7, 1, (8, 8))
    x = torch.randn(3, 1, 8, 8)
    out = m(x)
    assert out.shape == (3, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    m.eval()
    with torch.no_grad():
        f = m.forward_features(x)
        assert f.shape == (3, m.num_features)
        assert torch.allclose(m.forward_head(f), m(x), atol=1e-6)
    assert m.stage_names and all(m.get_submodule(s) is not None for s in m.stage_names)
    assert model_spec(m) == {"name": spec, "kwargs": {}}
    # the same module tree on the meta device (checkpoint loading checks shapes there first)
    with torch.device("meta"):
        meta = create_model(spec, 7, 1, (8, 8))
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


def test_state_dict_keys_are_the_libraries_own():
    """So that `nasty convert` takes a state dict saved by the owner's own code."""
    import torchvision

    ours = create_model("torchvision:resnet18", 10, 3, (32, 32)).state_dict()
    theirs = torchvision.models.resnet18(num_classes=10).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    timm = pytest.importorskip("timm")
    ours = create_model(TIMM, 10, 1, (8, 8)).state_dict()
    theirs = timm.create_model("test_resnet", num_classes=10, in_chans=1).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_spec_options_and_sizes():
    assert parse_model_spec("timm:resnet10t:drop_rate=0.1,act_layer='relu'") == ("timm:resnet10t", {"drop_rate": 0.1, "act_layer": "relu"})
    assert parse_model_spec("torchvision:resnet18") == ("torchvision:resnet18", {})
    m = create_model("torchvision:resnet18:zero_init_residual=True", 4, 1, (8, 8))
    assert m.fc.out_features == 4 and m.conv1.in_channels == 1
    assert model_spec(m) == {"name": "torchvision:resnet18", "kwargs": {"zero_init_residual": True}}
    assert set(model_prefixes()) == {"timm", "torchvision"} and "nasty[timm]" in model_prefixes()["timm"]


@pytest.mark.parametrize("spec,needle", [
    ("torchvision:resnet19", "did you mean torchvision:resnet18"),
    ("timm:resnt18", "did you mean timm:resnet18"),
    ("torchvision:squeezenet1_1", "classifier head cannot be resized"),  # a Conv2d classifier
    ("timm:deit_tiny_distilled_patch16_224", "cannot be resized"),  # two classifiers
    ("timm:resnet18:pretrained=True", "never downloaded"),
    ("torchvision:resnet18:weights='DEFAULT'", "never downloaded"),
    ("timm:resnet18.a1_in1k", "never downloads"),
    ("torchvision:vit_b_16", "cannot take 1x8x8 inputs"),
    ("torchvision:googlenet", "aux_logits=False"),
    ("timm:resnet18:no_such_option=1", "no_such_option"),
    ("timm:", "needs a model name"),
])
def test_refusals_are_one_line(spec, needle):
    needs(spec)
    with pytest.raises(NastyError, match=needle) as e:
        create_model(spec, 10, 1, (8, 8))
    assert "\n" not in str(e.value)


def test_timm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(NastyError, match=r"pip install 'nasty\[timm\]'"):
        create_model("timm:resnet18", 10, 1, (8, 8))


def test_unknown_name_through_the_cli(run_cli, tmp_path):
    rc, _, err = run_cli("train-teacher", "--model", "torchvision:mobilenet_v3_smal", "--out", tmp_path / "x")
    assert rc == 2 and err.count("\n") == 1 and "did you mean torchvision:mobilenet_v3_small" in err


@pytest.mark.parametrize("spec", [TIMM, TV])
def test_teacher_defended_audit_on_digits(spec, run_cli, tmp_path):
    """train-teacher -> train-defended (two-head lock on the library model's features) -> audit, then
    eval, a feature-distillation attack on its stages, and a checkpoint that rebuilds the model."""
    needs(spec)
    from nasty.checkpoint import load_checkpoint

    rc, out, err = run_cli("train-teacher", "--dataset", "digits", "--model", spec, "--epochs", "1", "--train-subset", "300",
                           "--out", tmp_path / "t", "--json")
    assert rc == 0, err
    assert json.loads((tmp_path / "t" / "model.json").read_text())["model"] == {"name": spec, "kwargs": {}}
    rc, out, err = run_cli("train-defended", "--dataset", "digits", "--model", spec, "--adversary", tmp_path / "t",
                           "--epochs", "1", "--train-subset", "300", "--omega", "0.1", "--head-epochs", "1", "--no-probe",
                           "--out", tmp_path / "d", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["defended_accuracy"] == res["normal_accuracy"]  # the lock serves the normal model's decisions
    locked, side = load_checkpoint(tmp_path / "d")
    assert side["model"]["name"] == "locked" and side["model"]["kwargs"]["decision"] == spec
    assert type(locked.decision).__name__.startswith("Nasty") and model_spec(locked.decision)["name"] == spec
    rc, out, err = run_cli("audit", tmp_path / "d", "--seeds", "1", "--attacks", "kd", "--students", "mlp:hidden=16",
                           "--epochs", "1", "--train-subset", "200", "--out", tmp_path / "a", "--json")
    assert rc == 0, err
    assert json.loads(out)["status"] == "complete"
    assert json.loads((tmp_path / "a" / "audit.json").read_text())["targets"]["teacher"]["attacks"]["kd"]["status"] == "ok"
    rc, out, err = run_cli("eval", tmp_path / "t", "--json")
    assert rc == 0 and json.loads(out)["accuracy"] == pytest.approx(json.loads((tmp_path / "t" / "result.json").read_text())["accuracy"])
    # feature distillation reads the library model's stage_names (as teacher, and as the student)
    rc, out, err = run_cli("attack", "--method", "hint", "--teacher", tmp_path / "t", "--student", spec, "--dataset", "digits",
                           "--epochs", "1", "--train-subset", "200", "--out", tmp_path / "h", "--json")
    assert rc == 0, err
    assert json.loads((tmp_path / "h" / "model.json").read_text())["model"]["name"] == spec


@pytest.mark.parametrize("spec", [TIMM, "torchvision:resnet18"])
def test_convert_the_owners_state_dict(spec, run_cli, tmp_path):
    """The owner's own code builds the library model (1 input channel, 10 classes), trains it, saves
    ``model.state_dict()`` with torch.save: `nasty convert` takes it as it is."""
    needs(spec)
    from nasty.checkpoint import load_checkpoint

    torch.manual_seed(3)
    lib, name = spec.split(":")
    if lib == "timm":
        import timm

        owner = timm.create_model(name, num_classes=10, in_chans=1)
    else:
        import torchvision

        owner = torchvision.models.resnet18(num_classes=10)
        owner.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save(owner.state_dict(), tmp_path / "owner.pth")
    rc, out, err = run_cli("convert", tmp_path / "owner.pth", "--model", spec, "--dataset", "digits", "--out", tmp_path / "c", "--json")
    assert rc == 0, err
    loaded, side = load_checkpoint(tmp_path / "c")
    assert side["model"]["name"] == spec and side["converted"]["loader"] == "torch.load(weights_only=True)"
    for (k, a), (k2, b) in zip(owner.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    owner.eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(owner(x), loaded(x), atol=1e-5)  # the owner's model, answering as before
    # weights of another architecture are refused in one line
    rc, _, err = run_cli("convert", tmp_path / "owner.pth", "--model", "torchvision:mobilenet_v3_small", "--dataset", "digits",
                         "--out", tmp_path / "c2")
    assert rc == 2 and err.count("\n") == 1 and "do not fit" in err
