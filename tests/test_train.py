import pytest
import torch

from nasty.data import Batch
from nasty.errors import TrainingDiverged
from nasty.models import create_model
from nasty.train import Frozen, TrainConfig, ce_objective, fit


def test_frozen_cache_runs_each_sample_once():
    net = torch.nn.Linear(4, 3)
    x = torch.randn(10, 4)
    f = Frozen(net, n=10)
    idx = torch.tensor([0, 1, 2, 3])
    a = f(Batch(x[idx], torch.zeros(4, dtype=torch.long), idx, augmented=False))
    b = f(Batch(x[idx], torch.zeros(4, dtype=torch.long), idx, augmented=False))
    assert torch.equal(a, b) and f.samples_run == 4
    assert torch.allclose(a, net(x[idx]))
    idx2 = torch.tensor([3, 4])
    f(Batch(x[idx2], torch.zeros(2, dtype=torch.long), idx2, augmented=False))
    assert f.samples_run == 5  # only sample 4 was new
    f(Batch(x[idx2], torch.zeros(2, dtype=torch.long), idx2, augmented=True))
    assert f.samples_run == 7  # augmented batches are never served from the cache
    assert not any(p.requires_grad for p in net.parameters())


def test_fit_learns_and_selects_on_val(digits, tmp_path):
    m = create_model("mlp:hidden=32", 10, 1, 8)
    res = fit(m, ce_objective(), digits, TrainConfig(epochs=3, batch_size=64, lr=0.1, seed=0), run_dir=tmp_path, log=None)
    assert res.best_val_accuracy > 80
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and '"val_accuracy"' in lines[0]


def test_fit_is_deterministic_in_seed(digits):
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        m = create_model("cnn:width=0.25", 10, 1, 8)
        fit(m, ce_objective(), digits, TrainConfig(epochs=1, batch_size=64, seed=3, deterministic=True), log=None)
        outs.append(torch.cat([p.flatten() for p in m.state_dict().values() if p.is_floating_point()]))
    assert torch.equal(outs[0], outs[1])


def test_nan_loss_stops_with_clear_error(digits):
    m = create_model("mlp:hidden=8", 10, 1, 8)

    def bad(model, batch, epoch):
        out = model(batch.x).sum()
        return out * float("nan") if epoch == 1 else out * 0 + 1.0, {"term": 1.0}

    with pytest.raises(TrainingDiverged, match="epoch 2, step 1"):
        fit(m, bad, digits, TrainConfig(epochs=3, batch_size=64), log=None)
