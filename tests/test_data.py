import numpy as np
import pytest
import torch

from nasty.data import iterate_batches, load_dataset, random_crop, stratified_indices
from nasty.errors import NastyError


def test_digits_splits_disjoint_deterministic_and_stratified():
    a = load_dataset("digits")
    b = load_dataset("digits")
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_train, b.y_train)
    total = len(a.y_train) + len(a.y_val) + len(a.y_test)
    assert total == 1797
    # no image appears in two splits (digits has a few exact duplicates; compare by multiset size)
    tr = {tuple(r) for r in a.x_train.flatten(1).tolist()}
    va = {tuple(r) for r in a.x_val.flatten(1).tolist()}
    te = {tuple(r) for r in a.x_test.flatten(1).tolist()}
    assert len(tr & va) <= 2 and len(tr & te) <= 2
    assert len(a.y_val) == pytest.approx(0.1 * (len(a.y_train) + len(a.y_val)), abs=2)
    counts = torch.bincount(a.y_val, minlength=10)
    assert counts.min() >= 14 and counts.max() <= 20
    # normalised with training statistics
    assert a.x_train.mean().abs() < 1e-4
    c = load_dataset("digits", split_seed=1)
    assert not torch.equal(a.y_val, c.y_val)


def test_subset_is_stratified_and_exact():
    d = load_dataset("digits", train_subset=500)
    assert len(d.y_train) + len(d.y_val) == 500
    assert d.info["train_subset"] == 500
    idx = stratified_indices(np.repeat(np.arange(4), 25), 10, 0)
    assert len(idx) == 10 and len(set(idx.tolist())) == 10


def test_errors_are_one_line():
    with pytest.raises(NastyError, match="did you mean 'mnist'"):
        load_dataset("mnsit")
    with pytest.raises(NastyError, match="not found"):
        load_dataset("cifar10", data_root="/nonexistent")
    with pytest.raises(NastyError, match="train_subset"):
        load_dataset("digits", train_subset=10**6)


def test_npz_dataset(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 255, (40, 12, 12), dtype=np.uint8), y_train=np.arange(40) % 4,
             x_test=rng.integers(0, 255, (8, 12, 12), dtype=np.uint8), y_test=np.arange(8) % 4)
    d = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert d.num_classes == 4 and d.in_channels == 1 and d.image_size == (12, 12)


def test_random_crop_and_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    out = random_crop(x, 1, g)
    assert out.shape == x.shape
    # every crop is a shifted window of the padded image: each output value comes from its own image or padding
    for i in range(2):
        assert set(out[i].flatten().tolist()) <= set(x[i].flatten().tolist()) | {0.0}
    xs, ys = torch.randn(10, 1, 4, 4), torch.arange(10)
    seen = torch.cat([b.idx for b in iterate_batches(xs, ys, 3, g)])
    assert sorted(seen.tolist()) == list(range(10))
