"""Every shipped config parses against the schema; datasets that are absent give one clear line."""

import os
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


def _fashion_root() -> tuple[str | None, str]:
    """Where the Fashion-MNIST IDX files are (a data root for load_dataset, None: its default search), or why not."""
    env = os.environ.get("NASTY_DATA_ROOT")
    for root in ([env] if env else []):
        if (Path(root) / "fashion-mnist").is_dir() or (Path(root) / "FashionMNIST" / "raw").is_dir():
            return root, ""
    if Path("/usr/share/datasets/fashion-mnist").is_dir():
        return None, ""
    return "", ("fashion-mnist not found in /usr/share/datasets/fashion-mnist or $NASTY_DATA_ROOT "
                f"({env or 'unset'}): apt-get install dataset-fashion-mnist (README, Datasets)")


FASHION_ROOT, FASHION_MISSING = _fashion_root()


@pytest.mark.skipif(bool(FASHION_MISSING), reason=FASHION_MISSING)
def test_fashion_mnist_official_split():
    d = load_dataset("fashion-mnist", data_root=FASHION_ROOT)
    assert len(d.y_train) + len(d.y_val) == 60000 and len(d.y_test) == 10000
    assert d.image_size == (28, 28) and d.classes[0] == "T-shirt/top"
    import torch

    assert torch.bincount(d.y_test).tolist() == [1000] * 10


def _mnist() -> tuple[Path | None, str]:
    """``mnist.npz`` in $NASTY_DATA_ROOT, else in ``../shared/datasets`` beside the repository root (not the
    working directory: pytest may run from anywhere), or why it is missing."""
    repo = Path(__file__).resolve().parent.parent
    tried = ([Path(os.environ["NASTY_DATA_ROOT"]) / "mnist.npz"] if os.environ.get("NASTY_DATA_ROOT") else [])
    tried.append(repo.parent / "shared" / "datasets" / "mnist.npz")
    for p in tried:
        if p.is_file():
            return p, ""
    return None, f"mnist.npz not found (looked in {', '.join(map(str, tried))}): see README, Datasets"


MNIST, MNIST_MISSING = _mnist()


@pytest.mark.skipif(MNIST is None, reason=MNIST_MISSING)
def test_mnist_from_shared_npz():
    d = load_dataset("mnist", data_root=str(MNIST.parent))
    assert len(d.y_test) == 10000 and d.num_classes == 10
