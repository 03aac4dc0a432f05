"""Datasets held in memory as tensors, deterministic splits, and per-batch tensor augmentation.

Every dataset is loaded once into float tensors (N, C, H, W) normalised with the *training* split's
per-channel mean and std. Augmentation (random crop with padding + horizontal flip) runs on whole
batches of tensors, so a 2-core machine does not spend its epoch in a per-sample PIL pipeline.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import NastyError

# name -> (loader, description, default augmentation)
_DATASETS: dict[str, tuple[Callable[..., "RawData"], str, str]] = {}

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class RawData:
    """Uint8/float arrays as read from disk, before splitting and normalisation."""

    x_train: np.ndarray  # (N, C, H, W)
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]


@dataclass
class DataBundle:
    """A dataset ready for training: normalised tensors and everything a checkpoint must remember."""

    name: str
    classes: list[str]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: list[float]
    std: list[float]
    augment: str = "none"
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in ("train", "val", "test"):
            raise NastyError(f"unknown split {name!r}; choose train, val or test")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def describe(self) -> dict:
        return {
            "name": self.name,
            "classes": self.classes,
            "in_channels": self.in_channels,
            "image_size": list(self.image_size),
            "mean": self.mean,
            "std": self.std,
            "augment": self.augment,
            "sizes": {s: int(getattr(self, f"y_{s}").numel()) for s in ("train", "val", "test")},
            **self.info,
        }


def register_dataset(name: str, description: str, augment: str = "none"):
    def deco(fn):
        _DATASETS[name] = (fn, description, augment)
        return fn

    return deco


def list_datasets() -> dict[str, str]:
    out = {k: v[1] for k, v in _DATASETS.items()}
    out["npz:PATH"] = "arrays x_train, y_train, x_test, y_test in an .npz file (optional 'classes')"
    out["imagefolder:PATH"] = "PATH/train/<class>/*.png and PATH/test/<class>/*.png"
    return out


# ----------------------------------------------------------------------------------------------
# readers


def _to_nchw(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return x.transpose(0, 3, 1, 2)
    if x.ndim == 4:
        return x
    raise NastyError(f"images must have shape (N,H,W), (N,H,W,C) or (N,C,H,W), got {x.shape}")


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) without pickle or downloads."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise NastyError(f"cannot read IDX file {path}: {e}") from None


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def _load_idx_dir(roots: list[Path]) -> RawData | None:
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for root in roots:
        paths = [_find_idx(root, s) for s in stems]
        if all(paths):
            xtr, ytr, xte, yte = (_read_idx(p) for p in paths)  # type: ignore[arg-type]
            return RawData(_to_nchw(xtr), ytr.astype(np.int64), _to_nchw(xte), yte.astype(np.int64), [])
    return None


def _default_root(data_root: str | None) -> Path:
    return Path(data_root or os.environ.get("NASTY_DATA_ROOT", "data")).expanduser()


@register_dataset("digits", "scikit-learn's bundled 8x8 digits (1797 images, 10 classes); no download", "none")
def _load_digits(data_root: str | None = None, download: bool = False) -> RawData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # (N,1,8,8) in [0,1]
    y = d.target.astype(np.int64)
    # digits has no official test split: a fixed, stratified 80/20 split (seed 0).
    rng = np.random.default_rng(0)
    test_idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: int(round(0.2 * (y == c).sum()))] for c in range(10)])
    mask = np.zeros(len(y), bool)
    mask[test_idx] = True
    return RawData(x[~mask], y[~mask], x[mask], y[mask], [str(i) for i in range(10)])


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@register_dataset("mnist", "MNIST: DATA_ROOT/mnist.npz or torchvision's DATA_ROOT/MNIST/raw IDX files", "none")
def _load_mnist(data_root: str | None = None, download: bool = False) -> RawData:
    root = _default_root(data_root)
    if (root / "mnist.npz").is_file():
        raw = load_npz(root / "mnist.npz")
        raw.classes = [str(i) for i in range(10)]
        return raw
    raw = _load_idx_dir([root / "MNIST" / "raw", root / "mnist", root])
    if raw is None and download:
        _torchvision_download("MNIST", root)
        raw = _load_idx_dir([root / "MNIST" / "raw"])
    if raw is None:
        raise NastyError(
            f"MNIST not found under {root}: put mnist.npz there (this workplace: ../shared/datasets/mnist.npz) "
            "or torchvision's MNIST/raw files, or pass --download"
        )
    raw.classes = [str(i) for i in range(10)]
    return raw


@register_dataset(
    "fashion-mnist",
    f"Fashion-MNIST IDX files in DATA_ROOT/fashion-mnist, DATA_ROOT/FashionMNIST/raw or {DEBIAN_FASHION_MNIST}",
    "none",
)
def _load_fashion(data_root: str | None = None, download: bool = False) -> RawData:
    root = _default_root(data_root)
    roots = [root / "fashion-mnist", root / "FashionMNIST" / "raw", root, DEBIAN_FASHION_MNIST]
    raw = _load_idx_dir(roots)
    if raw is None and download:
        _torchvision_download("FashionMNIST", root)
        raw = _load_idx_dir([root / "FashionMNIST" / "raw"])
    if raw is None:
        raise NastyError(
            f"Fashion-MNIST not found in {root}/fashion-mnist or {DEBIAN_FASHION_MNIST}: "
            "run `apt-get install dataset-fashion-mnist` (Debian) or pass --download"
        )
    raw.classes = list(FASHION_CLASSES)
    return raw


def _torchvision_download(name: str, root: Path, **kw):
    import torchvision.datasets as tvd

    cls = getattr(tvd, name)
    try:
        if name == "SVHN":
            return cls(str(root), split=kw["split"], download=True)
        return cls(str(root), train=kw.get("train", True), download=True)
    except Exception as e:  # network failures come in many types
        raise NastyError(f"download of {name} into {root} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _load_torchvision_cifar(name: str, data_root: str | None, download: bool) -> RawData:
    import torchvision.datasets as tvd

    root = _default_root(data_root)
    cls = getattr(tvd, name)
    folder = {"CIFAR10": "cifar-10-batches-py", "CIFAR100": "cifar-100-python"}[name]
    if not (root / folder).is_dir() and not download:
        raise NastyError(
            f"{name} not found: expected {root / folder} (torchvision's python version); "
            "copy it there or pass --download on a machine with internet"
        )
    # torchvision's CIFAR reader unpickles numpy arrays from the official archive. The files are
    # checked against their official md5 by torchvision before use.
    try:
        tr = cls(str(root), train=True, download=download)
        te = cls(str(root), train=False, download=download)
    except RuntimeError as e:
        raise NastyError(f"{name} in {root} is incomplete or corrupt: {str(e).splitlines()[0]}") from None
    return RawData(_to_nchw(tr.data), np.asarray(tr.targets, np.int64), _to_nchw(te.data), np.asarray(te.targets, np.int64), list(tr.classes))


@register_dataset("cifar10", "CIFAR-10 via torchvision in DATA_ROOT/cifar-10-batches-py", "crop-flip")
def _load_cifar10(data_root: str | None = None, download: bool = False) -> RawData:
    return _load_torchvision_cifar("CIFAR10", data_root, download)


@register_dataset("cifar100", "CIFAR-100 via torchvision in DATA_ROOT/cifar-100-python", "crop-flip")
def _load_cifar100(data_root: str | None = None, download: bool = False) -> RawData:
    return _load_torchvision_cifar("CIFAR100", data_root, download)


@register_dataset("svhn", "SVHN via torchvision: DATA_ROOT/train_32x32.mat and test_32x32.mat", "crop")
def _load_svhn(data_root: str | None = None, download: bool = False) -> RawData:
    import torchvision.datasets as tvd

    root = _default_root(data_root)
    if not (root / "train_32x32.mat").is_file() and not download:
        raise NastyError(f"SVHN not found: expected {root}/train_32x32.mat and test_32x32.mat, or pass --download")
    try:
        tr = tvd.SVHN(str(root), split="train", download=download)
        te = tvd.SVHN(str(root), split="test", download=download)
    except (RuntimeError, ImportError) as e:
        raise NastyError(f"SVHN in {root} could not be read: {str(e).splitlines()[0]}") from None
    return RawData(tr.data, tr.labels.astype(np.int64), te.data, te.labels.astype(np.int64), [str(i) for i in range(10)])


def load_npz(path: str | Path) -> RawData:
    path = Path(path)
    if not path.is_file():
        raise NastyError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z]
            if missing:
                raise NastyError(f"{path} lacks arrays {', '.join(missing)} (needs x_train, y_train, x_test, y_test)")
            arrays = [z[k] for k in ("x_train", "y_train", "x_test", "y_test")]
            classes = [str(c) for c in z["classes"].tolist()] if "classes" in z else []
    except NastyError:
        raise
    except Exception as e:
        raise NastyError(f"cannot read {path}: {e}") from None
    xtr, ytr, xte, yte = arrays
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise NastyError(f"{path}: images and labels differ in length")
    ytr, yte = ytr.astype(np.int64).reshape(-1), yte.astype(np.int64).reshape(-1)
    if not classes:
        classes = [str(i) for i in range(int(max(ytr.max(), yte.max())) + 1)]
    return RawData(_to_nchw(xtr), ytr, _to_nchw(xte), yte, classes)


def load_imagefolder(path: str | Path) -> RawData:
    from PIL import Image

    path = Path(path)
    if not (path / "train").is_dir() or not (path / "test").is_dir():
        raise NastyError(f"imagefolder dataset needs {path}/train/<class>/ and {path}/test/<class>/")
    classes = sorted(p.name for p in (path / "train").iterdir() if p.is_dir())
    if not classes:
        raise NastyError(f"no class folders in {path}/train")

    def read(split: str):
        xs, ys = [], []
        for ci, c in enumerate(classes):
            folder = path / split / c
            for f in sorted(folder.iterdir()) if folder.is_dir() else []:
                if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
                    with Image.open(f) as im:
                        xs.append(np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im))
                    ys.append(ci)
        if not xs:
            raise NastyError(f"no images in {path}/{split}")
        shapes = {x.shape for x in xs}
        if len(shapes) != 1:
            raise NastyError(f"images in {path}/{split} differ in size: {sorted(shapes)[:3]}")
        return _to_nchw(np.stack(xs)), np.asarray(ys, np.int64)

    xtr, ytr = read("train")
    xte, yte = read("test")
    return RawData(xtr, ytr, xte, yte, classes)


# ----------------------------------------------------------------------------------------------
# splits and normalisation


def stratified_indices(y: np.ndarray, fraction_or_count: float | int, seed: int) -> np.ndarray:
    """Pick a class-stratified subset of indices, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    n = len(y)
    total = int(fraction_or_count) if fraction_or_count >= 1 else int(round(fraction_or_count * n))
    classes, counts = np.unique(y, return_counts=True)
    # largest-remainder allocation so the counts add up exactly
    exact = counts / n * total
    alloc = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - alloc))[: total - alloc.sum()]:
        alloc[i] += 1
    picked = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, alloc)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def load_dataset(
    name: str,
    data_root: str | None = None,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    train_subset: int | None = None,
    download: bool = False,
    augment: str = "auto",
    normalization: tuple[list[float], list[float]] | None = None,
) -> DataBundle:
    """Load a dataset, carve a validation split from its training set, normalise.

    ``train_subset`` keeps a stratified subset of that many training images (the data an attacker
    holds); the validation split is then carved from the subset. Splits depend on ``split_seed``
    only, never on the training seed. ``normalization`` = (mean, std) overrides the statistics of
    the training split (an attacker feeds a teacher with the teacher's own normalisation).
    """
    if name.startswith("npz:"):
        raw, augment_default = load_npz(name[4:]), "none"
    elif name.startswith("imagefolder:"):
        raw, augment_default = load_imagefolder(name[len("imagefolder:") :]), "none"
    elif name in _DATASETS:
        loader, _, augment_default = _DATASETS[name]
        raw = loader(data_root=data_root, download=download)
    else:
        import difflib

        close = difflib.get_close_matches(name, list(_DATASETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise NastyError(f"unknown dataset {name!r}{hint} (known: {', '.join(list_datasets())})")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise NastyError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise NastyError(f"split_seed must be a non-negative integer, got {split_seed!r}")
    if train_subset is not None and (isinstance(train_subset, bool) or not isinstance(train_subset, int)):
        raise NastyError(f"train_subset must be an integer, got {train_subset!r}")
    if augment == "auto":
        augment = augment_default
    if augment not in AUGMENTATIONS:
        raise NastyError(f"unknown augmentation {augment!r} (choose {', '.join(AUGMENTATIONS)} or auto)")

    x_pool, y_pool = raw.x_train, raw.y_train
    n_classes = len(raw.classes)
    for y in (raw.y_train, raw.y_test):
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise NastyError(f"labels outside 0..{n_classes - 1} in dataset {name}")
    info: dict = {}
    if train_subset is not None:
        if not 0 < train_subset <= len(y_pool):
            raise NastyError(f"train_subset must be in 1..{len(y_pool)}, got {train_subset}")
        keep = stratified_indices(y_pool, int(train_subset), split_seed + 1)
        x_pool, y_pool = x_pool[keep], y_pool[keep]
        info["train_subset"] = int(train_subset)
    val_idx = stratified_indices(y_pool, val_fraction, split_seed)
    mask = np.zeros(len(y_pool), bool)
    mask[val_idx] = True

    scale = 255.0 if raw.x_train.dtype == np.uint8 else 1.0
    x_tr = torch.from_numpy(np.ascontiguousarray(x_pool[~mask])).float() / scale
    if normalization is None:
        mean = x_tr.mean(dim=(0, 2, 3))
        std = x_tr.std(dim=(0, 2, 3)).clamp_min(1e-6)
    else:
        mean, std = (torch.tensor(v, dtype=torch.float32) for v in normalization)
        if mean.numel() != x_tr.shape[1] or std.numel() != x_tr.shape[1]:
            raise NastyError(f"normalization has {mean.numel()} channels but dataset {name} has {x_tr.shape[1]}")

    def norm(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(x, copy=True)).float() / scale
        return (t - mean[None, :, None, None]) / std[None, :, None, None]

    info.update({"val_fraction": val_fraction, "split_seed": split_seed})
    return DataBundle(
        name=name,
        classes=list(raw.classes),
        x_train=(x_tr - mean[None, :, None, None]) / std[None, :, None, None],
        y_train=torch.from_numpy(y_pool[~mask].copy()),
        x_val=norm(x_pool[mask]),
        y_val=torch.from_numpy(y_pool[mask].copy()),
        x_test=norm(raw.x_test),
        y_test=torch.from_numpy(raw.y_test.copy()),
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        augment=augment,
        info=info,
    )


# ----------------------------------------------------------------------------------------------
# batches and augmentation


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop after zero padding, vectorised over the batch."""
    b, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return xp[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _aug_crop_flip(x, gen):
    return random_flip(random_crop(x, max(1, x.shape[-1] // 8), gen), gen)


def _aug_crop(x, gen):
    return random_crop(x, max(1, x.shape[-1] // 8), gen)


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None] = {
    "none": None,
    "crop": _aug_crop,
    "crop-flip": _aug_crop_flip,
}


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor  # indices into the training split, for caching frozen networks' outputs
    augmented: bool


def iterate_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, gen: torch.Generator, augment: str = "none", shuffle: bool = True
) -> Iterator[Batch]:
    n = len(y)
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    fn = AUGMENTATIONS[augment]
    for s in range(0, n, batch_size):
        idx = order[s : s + batch_size]
        xb = x[idx]
        if fn is not None:
            xb = fn(xb, gen)
        yield Batch(xb, y[idx], idx, fn is not None)
