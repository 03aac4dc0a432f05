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
from .registry import Registry

# name -> (loader, description, default augmentation)

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


@dataclass(frozen=True)
class DatasetEntry:
    """A named dataset: its loader ``fn(data_root=, download=) -> RawData``, a description, its default augmentation."""

    load: Callable[..., "RawData"]
    summary: str
    augment: str = "none"


DATASETS = Registry("dataset")


def register_dataset(name: str, description: str, augment: str = "none"):
    def deco(fn):
        DATASETS.register(DatasetEntry(fn, description, augment), name)
        return fn

    return deco


def list_datasets() -> dict[str, str]:
    out = DATASETS.summaries()
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
    _regular_file(path, "IDX file")
    budget = _data_budget(path.stat().st_size)
    try:
        with opener(path, "rb") as f:
            data = f.read(budget + 1)  # a gzip bomb stops here, not after expanding in full
        if len(data) > budget:
            raise NastyError(f"{path}: decompresses to more than {budget / 2**20:.0f} MiB (a compression bomb?); "
                             "set NASTY_MAX_DATA_BYTES to load a dataset known to be good")
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
            f"MNIST not found under {root}: put mnist.npz there "
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


MAX_CLASSES = 1000  # a label of 10**9 must not make a 10**9-way classifier (nor a 10**8-cell confusion matrix)
MAX_IMAGE_SIDE = 4096  # pixels per side of one image
MIN_DATA_BUDGET = 64 << 20  # bytes of decoded pixels always allowed ...
MAX_EXPANSION = 50  # ... and beyond that, at most this many times the bytes on disk (a deflate or PNG bomb expands ~1000x)


def _data_budget(on_disk: int) -> int:
    """Bytes of decoded arrays that ``on_disk`` bytes of files may hold: real image data compresses a
    few times; a bomb (a small file that decodes to gigabytes) is refused before it is decoded.
    ``NASTY_MAX_DATA_BYTES`` raises the limit for a dataset that is known to be good."""
    env = os.environ.get("NASTY_MAX_DATA_BYTES")
    if env:
        try:
            return int(env)
        except ValueError:
            raise NastyError(f"NASTY_MAX_DATA_BYTES must be an integer, got {env!r}") from None
    try:  # never more than half the machine's memory, whatever the files' (possibly sparse) size
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = 1 << 62
    return min(max(MIN_DATA_BUDGET, MAX_EXPANSION * on_disk), max(MIN_DATA_BUDGET, ram // 2))


def _regular_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file (following symlinks); a FIFO, device, folder or symlink loop
    is refused without being opened (opening a FIFO blocks forever)."""
    import stat

    try:
        st = path.stat()
    except OSError as e:
        raise NastyError(f"{what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise NastyError(f"{what} {path} is not a regular file")
    return path


def _npz_members(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of the arrays in an npz, read from the zip directory and the .npy headers
    only (nothing is decompressed beyond the headers). Refuses a file whose arrays would take more
    memory than :func:`_data_budget` allows for its size."""
    import zipfile

    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    total = 0
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > 64:
                raise NastyError(f"{path}: {len(infos)} arrays; a dataset npz holds x_train, y_train, x_test, y_test (and classes)")
            for info in infos:
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version in ((2, 0), (3, 0)):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        raise ValueError(f"unknown .npy version {version}")
                n = int(np.prod(shape, dtype=object)) * dtype.itemsize
                total += n
                out[info.filename[:-4]] = (tuple(int(d) for d in shape), dtype)
    except NastyError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError) as e:
        raise NastyError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    budget = _data_budget(path.stat().st_size)
    if total > budget:
        raise NastyError(f"{path}: its arrays would take {total / 2**20:.0f} MiB in memory, more than the "
                         f"{budget / 2**20:.0f} MiB allowed for a {path.stat().st_size / 2**20:.1f} MiB file "
                         "(a compression bomb?); set NASTY_MAX_DATA_BYTES to load a dataset known to be good")
    return out


def load_npz(path: str | Path) -> RawData:
    path = Path(path)
    if not path.exists():
        raise NastyError(f"npz file not found: {path}")
    _regular_file(path, "npz file")
    members = _npz_members(path)
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in members]
    if missing:
        raise NastyError(f"{path} lacks arrays {', '.join(missing)} (needs x_train, y_train, x_test, y_test)")
    for k in ("x_train", "x_test", "y_train", "y_test", "classes"):
        if k in members and members[k][1].kind not in ("u", "i", "f", "U", "S", "b"):
            raise NastyError(f"{path}: array {k} has dtype {members[k][1]}, not numbers")
    if "classes" in members and len(members["classes"][0]) == 1 and members["classes"][0][0] > MAX_CLASSES:
        raise NastyError(f"{path}: {members['classes'][0][0]} class names, more than the {MAX_CLASSES} nasty supports")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = [z[k] for k in ("x_train", "y_train", "x_test", "y_test")]
            classes = [str(c) for c in np.asarray(z["classes"]).reshape(-1).tolist()] if "classes" in z else []
    except NastyError:
        raise
    except MemoryError:
        raise NastyError(f"{path}: not enough memory to load its arrays") from None
    except Exception as e:
        raise NastyError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    xtr, ytr, xte, yte = arrays
    ytr, yte = _labels(ytr, f"{path} y_train"), _labels(yte, f"{path} y_test")
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise NastyError(f"{path}: images and labels differ in length ({len(xtr)} and {len(ytr)} train, {len(xte)} and {len(yte)} test)")
    if not classes:
        top = int(max(ytr.max(initial=-1), yte.max(initial=-1)))
        if top >= MAX_CLASSES:
            raise NastyError(f"{path}: a label of {top} means {top + 1} classes, more than the {MAX_CLASSES} nasty supports")
        classes = [str(i) for i in range(top + 1)]
    return RawData(_to_nchw(xtr), ytr, _to_nchw(xte), yte, classes)


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    """Integer class labels, one per image: shape (N,) or (N, 1); integers, or floats that are integers."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise NastyError(f"{where}: labels must be one integer per image, got shape {y.shape}")
    if y.dtype.kind in ("u", "i"):
        if y.dtype.kind == "u" and len(y) and y.max() > np.iinfo(np.int64).max:
            raise NastyError(f"{where}: labels out of range")
        return y.astype(np.int64)
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all() and (np.abs(y) < 2**62).all():
        return y.astype(np.int64)
    raise NastyError(f"{where}: labels must be integers, got dtype {y.dtype}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def load_imagefolder(path: str | Path) -> RawData:
    """``PATH/train/<class>/*.png`` and ``PATH/test/<class>/*.png``. Every file is checked before any
    is decoded: regular files only (no FIFO, folder or symlink loop named ``x.png``), one size and
    mode read from the image headers, and the decoded total within :func:`_data_budget`."""
    from PIL import Image

    path = Path(path)
    if not (path / "train").is_dir() or not (path / "test").is_dir():
        raise NastyError(f"imagefolder dataset needs {path}/train/<class>/ and {path}/test/<class>/")
    try:
        classes = sorted(p.name for p in (path / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
        extra = sorted(p.name for p in (path / "test").iterdir() if p.is_dir() and not p.name.startswith(".")
                       and p.name not in classes and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir()))
    except OSError as e:
        raise NastyError(f"cannot list {path}: {e.strerror or e}") from None
    if not classes:
        raise NastyError(f"no class folders in {path}/train")
    if extra:
        raise NastyError(f"{path}/test/{extra[0]} is a class with no training images ({path}/train/{extra[0]} is missing)")
    if len(classes) > MAX_CLASSES:
        raise NastyError(f"{path}/train: {len(classes)} class folders, more than the {MAX_CLASSES} nasty supports")

    def files(split: str) -> list[tuple[Path, int]]:
        out = []
        for ci, c in enumerate(classes):
            folder = path / split / c
            try:
                names = sorted(folder.iterdir()) if folder.is_dir() else []
            except OSError as e:
                raise NastyError(f"cannot list {folder}: {e.strerror or e}") from None
            out += [(_regular_file(f, "image"), ci) for f in names if f.suffix.lower() in IMAGE_SUFFIXES]
        if not out:
            raise NastyError(f"no images in {path}/{split}")
        return out

    found = {split: files(split) for split in ("train", "test")}
    # headers only: size and mode of every image, before decoding any
    shape = None
    pixels = on_disk = 0
    for split, items in found.items():
        for f, _ in items:
            try:
                with Image.open(f) as im:
                    (w, h), mode = im.size, im.mode
            except Exception as e:  # PIL raises many types for a file that is not an image
                raise NastyError(f"{f}: not a readable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
            if not (0 < w <= MAX_IMAGE_SIDE and 0 < h <= MAX_IMAGE_SIDE):
                raise NastyError(f"{f}: image of {w}x{h} pixels; nasty takes at most {MAX_IMAGE_SIDE} per side")
            this = (h, w, 1 if mode == "L" else 3)
            if shape is None:
                shape = this
            elif this != shape:
                raise NastyError(f"images differ in size or colour: {f} is {w}x{h} {mode}, the first image {shape[1]}x{shape[0]} "
                                 f"with {shape[2]} channel(s)")
            pixels += h * w * this[2]
            on_disk += f.stat().st_size
    budget = _data_budget(on_disk)
    if pixels > budget:
        raise NastyError(f"{path}: its images decode to {pixels / 2**20:.0f} MiB, more than the {budget / 2**20:.0f} MiB allowed "
                         f"for {on_disk / 2**20:.1f} MiB of files (an image bomb?); set NASTY_MAX_DATA_BYTES to load a dataset known to be good")

    def read(split: str):
        xs, ys = [], []
        for f, ci in found[split]:
            try:
                with Image.open(f) as im:
                    xs.append(np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im))
            except Exception as e:
                raise NastyError(f"{f}: cannot decode ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
            if xs[-1].shape != shape[: 2 if shape[2] == 1 else 3]:
                raise NastyError(f"{f}: decodes to shape {xs[-1].shape}, its header says {shape}")
            ys.append(ci)
        return _to_nchw(np.stack(xs)), np.asarray(ys, np.int64)

    xtr, ytr = read("train")
    xte, yte = read("test")
    return RawData(xtr, ytr, xte, yte, classes)


def pixel_scale(x: np.ndarray, name: str, split: str) -> float:
    """The one scale rule for pixels: what ``x`` is divided by to lie in [0, 1]. Integers (uint8 or any
    other integer type) are 8-bit levels 0..255 (divided by 255); floats are already in [0, 1]
    (divided by 1); booleans are 0/1. Values outside their type's range are refused (one line)."""
    if x.dtype.kind == "b":
        return 1.0
    if x.size == 0:
        return 255.0 if x.dtype.kind in "ui" else 1.0
    lo, hi = x.min(), x.max()
    if x.dtype.kind in "ui":
        if lo < 0 or hi > 255:
            raise NastyError(f"dataset {name}: {split} images are integers ({x.dtype}) from {lo} to {hi}; integer pixels "
                             "must be 8-bit levels 0..255 (floats must be in [0, 1])")
        return 255.0
    if lo < 0 or hi > 1:
        raise NastyError(f"dataset {name}: {split} images are floats ({x.dtype}) from {float(lo):g} to {float(hi):g}; float pixels "
                         "must be in [0, 1] (or give 8-bit integers 0..255)")
    return 1.0


def _scale_name(x: np.ndarray) -> str:
    return {"b": f"booleans ({x.dtype})", "u": f"8-bit integers ({x.dtype}, 0..255)", "i": f"8-bit integers ({x.dtype}, 0..255)"}.get(
        x.dtype.kind, f"floats ({x.dtype}, in [0, 1])")


def _check_raw(raw: RawData, name: str, labelled: bool = True) -> None:
    """What every dataset must satisfy before it is split, normalised or trained on: numeric images
    of one shape in both splits, finite pixels, at least one image per split, labels that name
    classes, and (``labelled``: its labels are trained on) at least two classes and no test class
    without training images."""
    for split in ("train", "test"):
        x, y = getattr(raw, f"x_{split}"), getattr(raw, f"y_{split}")
        if not isinstance(x, np.ndarray) or x.dtype.kind not in ("u", "i", "f", "b"):
            raise NastyError(f"dataset {name}: {split} images must be numbers, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 4 or 0 in x.shape[1:]:
            raise NastyError(f"dataset {name}: {split} images have shape {x.shape}")
        if len(x) == 0:
            raise NastyError(f"dataset {name} has no {split} images")
        if len(y) != len(x):
            raise NastyError(f"dataset {name}: {len(x)} {split} images but {len(y)} labels")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise NastyError(f"dataset {name}: {split} images hold NaN or inf pixels")
    if raw.x_train.shape[1:] != raw.x_test.shape[1:]:
        raise NastyError(f"dataset {name}: train images are {tuple(raw.x_train.shape[1:])} but test images {tuple(raw.x_test.shape[1:])}")
    if pixel_scale(raw.x_train, name, "train") != pixel_scale(raw.x_test, name, "test"):
        raise NastyError(f"dataset {name}: train images are {_scale_name(raw.x_train)} but test images are {_scale_name(raw.x_test)}; "
                         "give both splits on one scale")
    if any(d > MAX_IMAGE_SIDE for d in raw.x_train.shape[2:]):
        raise NastyError(f"dataset {name}: images of {raw.x_train.shape[2]}x{raw.x_train.shape[3]}; at most {MAX_IMAGE_SIDE} per side")
    n = len(raw.classes)
    if n > MAX_CLASSES:
        raise NastyError(f"dataset {name} has {n} classes, more than the {MAX_CLASSES} nasty supports")
    for y in (raw.y_train, raw.y_test):
        if len(y) and (y.min() < 0 or y.max() >= n):
            raise NastyError(f"labels outside 0..{n - 1} in dataset {name}")
    if not labelled:  # e.g. surrogate images queried without their labels
        return
    present = np.unique(raw.y_train)
    if len(present) < 2:
        raise NastyError(f"dataset {name}: its training images show {len(present)} class; a classifier needs at least 2")
    orphans = np.setdiff1d(np.unique(raw.y_test), present)
    if len(orphans):
        c = int(orphans[0])
        raise NastyError(f"dataset {name}: class {raw.classes[c]!r} has test images but no training images")


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
    labelled: bool = True,
    exclude_subset: int | None = None,
) -> DataBundle:
    """Load a dataset, carve a validation split from its training set, normalise.

    ``train_subset`` keeps a stratified subset of that many training images (the data an attacker
    holds); the validation split is then carved from the subset. Splits depend on ``split_seed``
    only, never on the training seed. ``normalization`` = (mean, std) overrides the statistics of
    the training split (an attacker feeds a teacher with the teacher's own normalisation).
    ``labelled=False``: images whose labels are never used (surrogate queries); their classes are
    not checked. ``exclude_subset=K`` leaves out the K training images that a run with
    ``train_subset=K`` (same ``split_seed``) trained on and validated with: a thief's pool of images the
    teacher never saw (it cannot be combined with ``train_subset``).
    """
    if name.startswith("npz:"):
        raw, augment_default = load_npz(name[4:]), "none"
    elif name.startswith("imagefolder:"):
        raw, augment_default = load_imagefolder(name[len("imagefolder:") :]), "none"
    else:
        entry = DATASETS.lookup(name, also=("npz:PATH", "imagefolder:PATH"))
        raw, augment_default = entry.load(data_root=data_root, download=download), entry.augment
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

    _check_raw(raw, name, labelled)
    x_pool, y_pool = raw.x_train, raw.y_train
    info: dict = {}
    if exclude_subset is not None:
        if train_subset is not None:
            raise NastyError("train_subset and exclude_subset cannot be combined")
        if isinstance(exclude_subset, bool) or not isinstance(exclude_subset, int) or not 0 < exclude_subset < len(y_pool):
            raise NastyError(f"exclude_subset must be in 1..{len(y_pool) - 1}, got {exclude_subset!r}")
        seen = np.zeros(len(y_pool), bool)
        seen[stratified_indices(y_pool, int(exclude_subset), split_seed + 1)] = True
        x_pool, y_pool = x_pool[~seen], y_pool[~seen]
        info["excluded_subset"] = int(exclude_subset)
    if train_subset is not None:
        if not 0 < train_subset <= len(y_pool):
            raise NastyError(f"train_subset must be in 1..{len(y_pool)}, got {train_subset}")
        keep = stratified_indices(y_pool, int(train_subset), split_seed + 1)
        x_pool, y_pool = x_pool[keep], y_pool[keep]
        info["train_subset"] = int(train_subset)
    val_idx = stratified_indices(y_pool, val_fraction, split_seed)
    if not 0 < len(val_idx) < len(y_pool):
        raise NastyError(f"dataset {name}: {len(y_pool)} training images leave {len(val_idx)} for validation at "
                         f"val_fraction {val_fraction}; use more training images (--train-subset) or another val_fraction")
    mask = np.zeros(len(y_pool), bool)
    mask[val_idx] = True

    scale = pixel_scale(raw.x_train, name, "train")  # the same for the test split (checked by _check_raw)
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
