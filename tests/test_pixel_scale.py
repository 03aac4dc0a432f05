"""Issue 22, class 4: data means what it says. One scale rule for pixels (``nasty.data.pixel_scale``):
integers are 8-bit levels 0..255, floats are in [0, 1], booleans 0/1; both splits on one scale."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nasty.data import load_dataset
from nasty.errors import NastyError

DTYPES = ["uint8", "uint16", "int16", "int64", "float32", "float64", "bool"]
SCALE = {"uint8": 255.0, "uint16": 255.0, "int16": 255.0, "int64": 255.0, "float32": 1.0, "float64": 1.0, "bool": 1.0}


def images(dtype: str, n: int, out_of_range: bool, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random((n, 1, 4, 4)) < 0.5
    if SCALE[dtype] == 255.0:
        x = rng.integers(0, 256, (n, 1, 4, 4)).astype(dtype)
        if out_of_range:
            x.flat[0] = 300 if dtype != "uint8" else 255  # uint8 cannot leave its range
            if dtype.startswith("int"):
                x.flat[1] = -1
        return x
    x = rng.random((n, 1, 4, 4)).astype(dtype)
    if out_of_range:
        x.flat[0] = 1.5
    return x


def _load(x_train: np.ndarray, x_test: np.ndarray):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "d.npz"
        np.savez(f, x_train=x_train, y_train=np.arange(len(x_train)) % 2, x_test=x_test, y_test=np.arange(len(x_test)) % 2)
        return load_dataset(f"npz:{f}")


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(DTYPES), st.sampled_from(DTYPES), st.booleans(), st.booleans(), st.integers(0, 100))
def test_one_scale_rule_for_both_splits(train_dtype, test_dtype, train_out, test_out, seed):
    """Was: uint8 training images and float test images in [0, 1] -- the test images divided by 255 too.
    Seen failing with the former rule (``255 if x_train is uint8 else 1``, no range check) put back."""
    x_tr, x_te = images(train_dtype, 40, train_out, seed), images(test_dtype, 12, test_out, seed + 1)
    bad_range = any(out and dt != "uint8" and dt != "bool" for dt, out in ((train_dtype, train_out), (test_dtype, test_out)))
    mixed = SCALE[train_dtype] != SCALE[test_dtype]
    if bad_range or mixed:
        with pytest.raises(NastyError) as e:
            _load(x_tr, x_te)
        msg = str(e.value)
        assert e.value.exit_code == 2 and "\n" not in msg
        assert ("one scale" in msg) if (mixed and not bad_range) else True
        return
    d = _load(x_tr, x_te)
    mean, std = np.array(d.mean).reshape(1, -1, 1, 1), np.array(d.std).reshape(1, -1, 1, 1)
    pixels = d.x_test.numpy() * std + mean
    np.testing.assert_allclose(pixels, x_te.astype(np.float64) / SCALE[test_dtype], atol=1e-5)
    assert 0 <= pixels.min() + 1e-5 and pixels.max() <= 1 + 1e-5


def test_the_reported_row():
    x_tr = images("uint8", 40, False, 0)
    x_te = (images("uint8", 12, False, 1) / 255.0).astype(np.float32)
    with pytest.raises(NastyError, match="train images are 8-bit integers .* but test images are floats .*one scale"):
        _load(x_tr, x_te)
