"""Every shipped config parses against the schema; datasets that are absent give one clear line."""

from pathlib import Path

import pytest

from nasty.config import load_config, train_config
from nasty.data import load_dataset
from nasty.errors import NastyError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid(path):
    cfg = load_config(path)
    train_config(cfg)
    train_config(cfg, cfg["defense"]["train"])
    train_config(cfg, cfg["probe"]["train"])


def test_paper_recipes():
    c10 = load_config(Path(__file__).parent.parent / "configs" / "cifar10.toml")
    assert (c10["defense"]["tau"], c10["defense"]["omega"], c10["train"]["epochs"]) == (4.0, 0.04, 160)
    c100 = load_config(Path(__file__).parent.parent / "configs" / "cifar100.toml")
    assert (c100["defense"]["tau"], c100["defense"]["omega"], c100["train"]["epochs"]) == (20.0, 0.005, 200)


def test_missing_cifar_says_where(tmp_path):
    with pytest.raises(NastyError, match="cifar-10-batches-py"):
        load_dataset("cifar10", data_root=str(tmp_path))


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_official_split():
    d = load_dataset("fashion-mnist")
    assert len(d.y_train) + len(d.y_val) == 60000 and len(d.y_test) == 10000
    assert d.image_size == (28, 28) and d.classes[0] == "T-shirt/top"
    import torch

    assert torch.bincount(d.y_test).tolist() == [1000] * 10


MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist.npz"


@pytest.mark.skipif(not MNIST.is_file(), reason="../shared/datasets/mnist.npz not present")
def test_mnist_from_shared_npz():
    d = load_dataset("mnist", data_root=str(MNIST.parent))
    assert len(d.y_test) == 10000 and d.num_classes == 10
