"""Every registered model honours the contract the rest of nasty relies on. Parametrised over
``list_models()``: a model added with ``@register_model`` is covered without editing this file."""

import pytest
import torch

from nasty.checkpoint import load_checkpoint, save_checkpoint
from nasty.models import create_model, list_models, model_spec

REQUIRED = {"locked": {"decision": "cnn:width=0.25"}}  # options a model cannot do without
NO_SINGLE_HEAD = {"locked"}  # its answer combines the decision model and the nasty part: no features -> head split


@pytest.mark.parametrize("name", list_models())
def test_registered_model_contract(name, tmp_path):
    torch.manual_seed(0)
    m = create_model(name, 5, 1, 8, **REQUIRED.get(name, {})).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        z = m(x)
        assert z.shape == (3, 5)
        if name not in NO_SINGLE_HEAD:
            f = m.forward_features(x)  # the two-head lock and feature attacks split the model here
            assert f.ndim == 2 and f.shape[0] == 3
            assert torch.allclose(m.forward_head(f), z, atol=1e-5)
    assert m.stage_names and all(m.get_submodule(s) is not None for s in m.stage_names)  # dotted paths resolve
    # a checkpoint holds the weights plus what rebuilds the model, and loads without pickle
    save_checkpoint(tmp_path / "c", m, classes=[str(i) for i in range(5)], input_shape=(1, 8, 8), mean=[0.5], std=[0.25],
                    dataset="digits")
    back, side = load_checkpoint(tmp_path / "c")
    assert model_spec(back) == model_spec(m) and side["model"]["name"] == name
    with torch.no_grad():
        assert torch.equal(back.eval()(x), z)
