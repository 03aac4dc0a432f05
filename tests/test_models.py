import pytest
import torch

from nasty.errors import NastyError
from nasty.models import create_model, list_models, parse_model_spec

SMALL = {"mlp": {}, "cnn": {}, "resnet20": {"width": 0.5}, "resnet32": {"width": 0.25}, "resnet56": {"width": 0.25},
         "resnet18": {"width": 0.125}, "mobilenetv2": {"width": 0.25}, "shufflenetv2": {"width": 0.5}}


def test_registry_lists_all_required_models():
    assert set(SMALL) <= set(list_models())


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("channels,size", [(1, 8), (3, 32), (1, 28), (3, 64)])
def test_forward_backward(name, channels, size):
    if size == 64 and name in ("resnet56", "resnet18", "mobilenetv2"):
        pytest.skip("covered at 32x32; keeps the suite fast")
    m = create_model(name, 7, channels, size, **SMALL[name])
    x = torch.randn(2, channels, size, size)
    out = m(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    # stage interface used by feature distillation and auxiliary heads
    assert m.stage_names and all(hasattr(m, s) for s in m.stage_names)


def test_spec_parsing_and_errors():
    assert parse_model_spec("cnn:width=0.25") == ("cnn", {"width": 0.25})
    assert parse_model_spec("mlp:hidden=[64,32]") == ("mlp", {"hidden": [64, 32]})
    with pytest.raises(NastyError, match="did you mean 'cnn'"):
        create_model("cnnn", 10, 1, 8)
    with pytest.raises(NastyError, match="no option"):
        create_model("cnn:depth=3", 10, 1, 8)
    m = create_model("cnn:width=0.25", 10, 1, 8)
    assert m.nasty_spec == {"name": "cnn", "kwargs": {"width": 0.25}}
    assert m.block1[0].out_channels == 8


def test_a_constructor_error_is_one_line():
    """torch's own error for an absurd width spans many lines (a C++ trace); the model error is its first line."""
    with pytest.raises(NastyError) as e:
        create_model("mlp", 10, 1, 8, hidden=2**70)
    assert str(e.value).startswith("model mlp: ") and "\n" not in str(e.value)
