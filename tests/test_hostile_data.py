"""Issue 11, classes 2-5: hostile and careless datasets and weights files. Every case is refused
with one line and exit code 2 before any training, without a hang and within a small memory limit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nasty.errors import NastyError


def one_line(rc: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "internal error" not in err and "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def good_arrays(n_train=40, n_test=12, classes=4, shape=(1, 4, 4), seed=0):
    rng = np.random.default_rng(seed)
    return {"x_train": rng.random((n_train, *shape)).astype(np.float32), "y_train": np.arange(n_train) % classes,
            "x_test": rng.random((n_test, *shape)).astype(np.float32), "y_test": np.arange(n_test) % classes}


def write_npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_good_npz_loads(tmp_path):
    from nasty.data import load_dataset

    d = load_dataset(write_npz(tmp_path / "d.npz", **good_arrays()))
    assert d.num_classes == 4 and len(d.y_val) > 0


def _mut(**changes):
    return lambda a: {**a, **changes}


NPZ_CASES = {
    "nan-test-pixel": (lambda a: {**a, "x_test": np.where(np.arange(16).reshape(1, 1, 4, 4) == 3, np.nan, a["x_test"])}, "NaN or inf"),
    "inf-train-pixel": (lambda a: {**a, "x_train": np.full_like(a["x_train"], np.inf)}, "NaN or inf"),
    "string-labels": (lambda a: {**a, "y_train": np.array(["cat"] * 40)}, "labels must be integers"),
    "float-labels": (lambda a: {**a, "y_train": a["y_train"] + 0.5}, "labels must be integers"),
    "2d-labels": (lambda a: {**a, "y_train": np.zeros((40, 3), np.int64)}, "one integer per image"),
    "zero-train": (lambda a: {**a, "x_train": a["x_train"][:0], "y_train": a["y_train"][:0]}, "no train images"),
    "zero-test": (lambda a: {**a, "x_test": a["x_test"][:0], "y_test": a["y_test"][:0]}, "no test images"),
    "shape-mismatch": (lambda a: {**a, "x_test": np.zeros((12, 1, 5, 5), np.float32)}, "test images"),
    "channel-mismatch": (lambda a: {**a, "x_test": np.zeros((12, 3, 4, 4), np.float32)}, "test images"),
    "single-class": (lambda a: {**a, "y_train": np.zeros(40, np.int64), "y_test": np.zeros(12, np.int64)}, "at least 2"),
    "test-only-class": (lambda a: {**a, "y_test": np.full(12, 4)}, "no training images"),
    "huge-label": (lambda a: {**a, "y_train": np.where(np.arange(40) == 0, 10**9, a["y_train"])}, "more than the 1000 "),
    "negative-label": (lambda a: {**a, "y_train": a["y_train"] - 1}, "labels outside"),
    "object-images": (lambda a: {**a, "x_train": a["x_train"].astype(np.complex64)}, "not numbers"),
    "length-mismatch": (lambda a: {**a, "y_train": a["y_train"][:30]}, "differ in length"),
    "missing-array": (lambda a: {k: v for k, v in a.items() if k != "y_test"}, "lacks arrays y_test"),
    "too-few-for-validation": (lambda a: {**a, "x_train": a["x_train"][:4], "y_train": np.array([0, 1, 2, 3])}, "validation"),
    "too-many-class-names": (lambda a: {**a, "classes": np.array([str(i) for i in range(2000)])}, "more than the 1000 "),
}


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_bad_npz_refused_before_training(run_cli, tmp_path, case):
    mutate, needle = NPZ_CASES[case]
    ds = write_npz(tmp_path / "d.npz", **mutate(good_arrays()))
    rc, out, err = run_cli("train-teacher", "--dataset", ds, "--model", "mlp:hidden=4", "--epochs", "1", "--out", tmp_path / "run")
    one_line(rc, err, needle)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_train_subset_too_small_for_validation(run_cli, tmp_path):
    ds = write_npz(tmp_path / "d.npz", **good_arrays())
    rc, out, err = run_cli("train-teacher", "--dataset", ds, "--train-subset", "4", "--out", tmp_path / "run")
    one_line(rc, err, "validation")


def test_npz_that_is_not_a_zip(run_cli, tmp_path):
    (tmp_path / "d.npz").write_text("hello")
    rc, out, err = run_cli("train-teacher", "--dataset", f"npz:{tmp_path / 'd.npz'}", "--out", tmp_path / "run")
    one_line(rc, err, "cannot read")


# ---------------------------------------------------------------------------------------------- image folders


def make_folder(root: Path, classes=("a", "b"), n=6, size=(4, 4)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n if split == "train" else 2):
                Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8), "L").save(root / split / c / f"{i}.png")
    return root


def test_good_imagefolder_loads(tmp_path):
    from nasty.data import load_dataset

    d = load_dataset(f"imagefolder:{make_folder(tmp_path / 'ds')}")
    assert d.classes == ["a", "b"] and len(d.y_test) == 4


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _loop(p: Path) -> None:
    os.symlink(p.name, p)


def _truncated(p: Path) -> None:
    good = p.parent / "0.png"
    p.write_bytes(good.read_bytes()[:30])


def _different_size(p: Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((5, 4), np.uint8), "L").save(p)


def _huge_header(p: Path) -> None:
    from PIL import Image

    Image.new("1", (9000, 9000)).save(p)  # a few KB on disk, 81 Mpixel decoded


FOLDER_CASES = {
    "fifo-named-png": (_fifo, "not a regular file"),
    "dir-named-png": (lambda p: p.mkdir(), "not a regular file"),
    "symlink-loop": (_loop, "x.png"),
    "text-named-png": (lambda p: p.write_text("not an image"), "not a readable image"),
    "truncated-png": (_truncated, "x.png"),
    "different-size": (_different_size, "differ in size"),
    "huge-dimensions": (_huge_header, "at most 4096 per side"),
}


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
@pytest.mark.parametrize("split", ["train", "test"])
def test_bad_imagefolder_refused_quickly(run_cli, tmp_path, case, split):
    root = make_folder(tmp_path / "ds")
    make, needle = FOLDER_CASES[case]
    make(root / split / "b" / "x.png")
    t0 = time.perf_counter()
    rc, out, err = run_cli("train-teacher", "--dataset", f"imagefolder:{root}", "--epochs", "1", "--out", tmp_path / "run")
    one_line(rc, err, needle)
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "run").exists()


def test_fifo_in_folder_named_by_sidecar_does_not_hang(tmp_path):
    """`nasty eval` reads the dataset its checkpoint names: a FIFO there must not hang it (subprocess, timeout)."""
    root = make_folder(tmp_path / "ds")
    ck = _checkpoint(tmp_path / "ck", ["a", "b"], (1, 4, 4), dataset=f"imagefolder:{root}")
    os.mkfifo(root / "test" / "a" / "zz.png")
    r = subprocess.run([sys.executable, "-m", "nasty", "eval", str(ck)], capture_output=True, text=True, timeout=60)
    one_line(r.returncode, r.stderr, "not a regular file")


def test_test_only_class_folder_refused(run_cli, tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "test" / "c").mkdir()
    (root / "test" / "a" / "0.png").rename(root / "test" / "c" / "0.png")
    rc, out, err = run_cli("train-teacher", "--dataset", f"imagefolder:{root}", "--out", tmp_path / "run")
    one_line(rc, err, "no training images")


def test_single_class_folder_refused(run_cli, tmp_path):
    root = make_folder(tmp_path / "ds", classes=("a",))
    rc, out, err = run_cli("train-teacher", "--dataset", f"imagefolder:{root}", "--out", tmp_path / "run")
    one_line(rc, err, "at least 2")


def test_decoded_size_budget_checked_from_headers(run_cli, tmp_path, monkeypatch):
    root = make_folder(tmp_path / "ds", size=(64, 64))
    monkeypatch.setenv("NASTY_MAX_DATA_BYTES", "10000")  # 16 images of 4 KiB each do not fit
    rc, out, err = run_cli("train-teacher", "--dataset", f"imagefolder:{root}", "--out", tmp_path / "run")
    one_line(rc, err, "decode to")


# ---------------------------------------------------------------------------------------------- memory (subprocess)

MEMORY_LIMIT = 2 << 30  # address space for data; torch's import alone takes ~0.8 GiB of it


def _run_limited(args: list[str], timeout: float = 60) -> tuple[subprocess.CompletedProcess, int]:
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_DATA, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))\n"
        "from nasty.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        # VmHWM, not ru_maxrss: the latter survives exec and would count the parent pytest's memory
        "hwm = next(int(ln.split()[1]) for ln in open('/proc/self/status') if ln.startswith('VmHWM'))\n"
        "sys.stderr.write('maxrss %d\\n' % hwm)\n"
        "sys.exit(rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = r.stderr.splitlines()
    rss = int(lines[-1].split()[1]) * 1024 if lines and lines[-1].startswith("maxrss") else -1
    r.stderr = "\n".join(lines[:-1] if rss >= 0 else lines)
    return r, rss


def _npz_bomb(path: Path, n: int = 400, side: int = 1000) -> None:
    """An npz whose x_train is n x side x side zero bytes, deflated to well under 1 MB, streamed (no big array here)."""
    import zipfile

    header = {"descr": "|u1", "fortran_order": False, "shape": (n, side, side)}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x_train.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            chunk = bytes(side * side)
            for _ in range(n):
                f.write(chunk)
        for k, v in {"y_train": np.arange(n) % 2, "x_test": np.zeros((4, side, side), np.uint8), "y_test": np.arange(4) % 2}.items():
            with zf.open(f"{k}.npy", "w") as f:
                np.lib.format.write_array(f, v)


def test_npz_bomb_refused_before_decoding(tmp_path):
    _npz_bomb(tmp_path / "bomb.npz")
    assert (tmp_path / "bomb.npz").stat().st_size < 2 << 20
    r, rss = _run_limited(["train-teacher", "--dataset", f"npz:{tmp_path / 'bomb.npz'}", "--epochs", "1", "--out", str(tmp_path / "run")])
    one_line(r.returncode, r.stderr, "compression bomb")
    assert 0 < rss < 1 << 30


def test_huge_png_refused_from_its_header(tmp_path):
    root = make_folder(tmp_path / "ds")
    for i in range(3):
        _huge_header(root / "train" / "a" / f"big{i}.png")
    r, rss = _run_limited(["train-teacher", "--dataset", f"imagefolder:{root}", "--epochs", "1", "--out", str(tmp_path / "run")])
    one_line(r.returncode, r.stderr, "at most 4096 per side")
    assert 0 < rss < 1 << 30


# ---------------------------------------------------------------------------------------------- checkpoints


def _checkpoint(folder: Path, classes: list[str], shape=(1, 4, 4), dataset="digits") -> Path:
    from nasty.checkpoint import save_checkpoint
    from nasty.models import create_model

    model = create_model("mlp:hidden=4", len(classes), shape[0], shape[1:])
    save_checkpoint(folder, model, classes=classes, input_shape=shape, mean=[0.5] * shape[0], std=[0.25] * shape[0], dataset=dataset)
    return folder


def test_sparse_weights_refused_before_hashing(tmp_path):
    ck = _checkpoint(tmp_path / "ck", ["0", "1"])
    with open(ck / "model.safetensors", "r+b") as f:
        f.truncate(64 << 30)  # 64 GiB apparent size, a few KB on disk
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "nasty", "eval", str(ck)], capture_output=True, text=True, timeout=30)
    one_line(r.returncode, r.stderr, "header describes")
    assert time.perf_counter() - t0 < 20


def test_weights_fifo_refused(tmp_path):
    from nasty.checkpoint import load_checkpoint

    ck = _checkpoint(tmp_path / "ck", ["0", "1"])
    (ck / "model.safetensors").unlink()
    os.mkfifo(ck / "model.safetensors")
    with pytest.raises(NastyError):
        load_checkpoint(ck)


def _classes_npz(path: Path, classes: list[str], order: list[int]) -> str:
    """The same images and labels, with the class list (and the labels with it) permuted by ``order``."""
    a = good_arrays(classes=len(classes))
    inv = np.argsort(order)
    return write_npz(path, x_train=a["x_train"], y_train=inv[a["y_train"]], x_test=a["x_test"], y_test=inv[a["y_test"]],
                     classes=np.array([classes[i] for i in order]))


def test_class_order_mismatch_refused_by_eval_attack_and_audit(run_cli, tmp_path):
    names = ["cat", "dog", "eel", "fox"]
    ck = _checkpoint(tmp_path / "ck", names, dataset="x")
    same = _classes_npz(tmp_path / "same.npz", names, [0, 1, 2, 3])
    rev = _classes_npz(tmp_path / "rev.npz", names, [3, 2, 1, 0])
    rc, out, err = run_cli("eval", ck, "--dataset", same)
    assert rc == 0, err
    rc, out, err = run_cli("eval", ck, "--dataset", rev)
    one_line(rc, err, "orders its classes differently", "'cat'", "'fox'")
    rc, out, err = run_cli("attack", "--teacher", ck, "--dataset", rev, "--student", "mlp:hidden=4", "--epochs", "1",
                           "--out", tmp_path / "att")
    one_line(rc, err, "orders its classes differently")
    rc, out, err = run_cli("audit", ck, "--dataset", rev, "--attacks", "kd", "--seeds", "1", "--epochs", "1", "--out", tmp_path / "aud")
    one_line(rc, err, "orders its classes differently")
    other = _classes_npz(tmp_path / "other.npz", ["ant", "bee", "cow", "doe"], [0, 1, 2, 3])
    rc, out, err = run_cli("eval", ck, "--dataset", other)
    one_line(rc, err, "other classes")


def test_unnamed_classes_still_compatible(tmp_path):
    from nasty.checkpoint import check_compatible
    from nasty.data import load_dataset

    data = load_dataset(write_npz(tmp_path / "d.npz", **good_arrays()))  # classes 0..3, no names
    side = {"num_classes": 4, "classes": ["cat", "dog", "eel", "fox"], "input_shape": [1, 4, 4]}
    check_compatible(side, data)
    with pytest.raises(NastyError, match="differently"):
        check_compatible({**side, "classes": ["3", "2", "1", "0"]}, data)


def test_tllm_delta_nan_refused(run_cli, tmp_path):
    rc, out, err = run_cli("attack", "--method", "tllm", "--delta", "nan", "--out", tmp_path / "o")
    one_line(rc, err, "--delta")
    rc, out, err = run_cli("attack", "--method", "tllm", "--param", "delta=1e999", "--out", tmp_path / "o")
    one_line(rc, err, "finite")
    assert not (tmp_path / "o").exists()



def test_deep_toml_is_bad_input(run_cli, tmp_path):
    cfg = tmp_path / "deep.toml"
    cfg.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    rc, out, err = run_cli("train-teacher", "--config", cfg, "--out", tmp_path / "run")
    one_line(rc, err, "invalid TOML")


def test_gzip_idx_bomb_stops_at_the_budget(tmp_path, monkeypatch):
    import gzip
    import struct

    from nasty.data import load_dataset

    root = tmp_path / "mnist"
    root.mkdir()
    for stem, shape in (("train-images-idx3-ubyte", (20, 28, 28)), ("t10k-images-idx3-ubyte", (4, 28, 28)),
                        ("train-labels-idx1-ubyte", (20,)), ("t10k-labels-idx1-ubyte", (4,))):
        with gzip.open(root / f"{stem}.gz", "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, len(shape)) + struct.pack(">" + "I" * len(shape), *shape))
            f.write(bytes(int(np.prod(shape)) + (8 << 20) * ("train-images" in stem)))  # 8 MiB of trailing zeros
    monkeypatch.setenv("NASTY_MAX_DATA_BYTES", str(1 << 20))
    with pytest.raises(NastyError, match="compression bomb"):
        load_dataset("mnist", str(root))


def test_config_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "c.toml")
    r = subprocess.run([sys.executable, "-m", "nasty", "train-teacher", "--config", str(tmp_path / "c.toml")],
                       capture_output=True, text=True, timeout=60)
    one_line(r.returncode, r.stderr, "not a regular file")


def test_data_budget_never_exceeds_half_the_memory():
    from nasty.data import _data_budget

    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert _data_budget(1 << 50) <= max(ram // 2, 64 << 20)  # a sparse 1 PiB file is not a licence to allocate
    assert _data_budget(1000) == 64 << 20


def test_hidden_and_empty_folders_are_not_classes(tmp_path):
    from nasty.data import load_dataset

    root = make_folder(tmp_path / "ds")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "test" / ".ipynb_checkpoints").mkdir()
    (root / "test" / "unused").mkdir()
    assert load_dataset(f"imagefolder:{root}").classes == ["a", "b"]
