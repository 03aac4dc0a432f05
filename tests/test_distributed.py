"""torchrun DDP on CPU (gloo): two processes with the same global batch match one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from nasty import distributed


@pytest.mark.parametrize("world,n,expected", [
    (2, 64, [(0, 32, 1.0), (32, 64, 1.0)]),
    (2, 29, [(0, 15, 30 / 29), (15, 29, 28 / 29)]),
    (3, 2, [(0, 1, 1.5), (1, 2, 1.5), None]),  # rank 2 gets no sample: a weight-0 duplicate
])
def test_shard(monkeypatch, world, n, expected):
    got = []
    for r in range(world):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", str(r))
        s = distributed.shard(n)
        got.append(None if s.empty else (s.sl.start, s.sl.stop, s.weight))
        if s.empty:
            assert s.weight == 0 and s.sl == slice(0, 1)
    assert [g if g is None else (g[0], g[1], pytest.approx(g[2])) for g in got] == expected
    # DDP averages the ranks' gradients: each sample's coefficient weight / (world * shard size) is 1/n,
    # so the result is the gradient of the global-batch mean
    for start, stop, weight in filter(None, expected):
        assert weight / (world * (stop - start)) == pytest.approx(1 / n)


def test_no_torchrun_is_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.enabled() and distributed.is_main() and not distributed.init()
    assert distributed.shard(10).sl == slice(0, 10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOL = 1e-4  # max |w_ddp - w_single| after 3 epochs: float summation order only (MLP, no BatchNorm)


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_gloo_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NASTY_DDP_BACKEND": "gloo"}
    env.pop("WORLD_SIZE", None)
    args = ["train-teacher", "--dataset", "digits", "--model", "mlp:hidden=32", "--epochs", "3", "--batch-size", "64",
            "--deterministic", "--json"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                "--master_addr=127.0.0.1"]
    ddp = subprocess.Popen([*torchrun, "-m", "nasty", *args, "--out", str(tmp_path / "ddp")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    one = subprocess.run([sys.executable, "-m", "nasty", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    out, err = ddp.communicate(timeout=300)
    assert one.returncode == 0, one.stderr
    assert ddp.returncode == 0, err
    assert len(out.strip().splitlines()) == 1  # rank 0 alone prints the result
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "ddp" / "model.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"\nDDP vs single process: max |weight difference| = {diff:.2e}")
    assert diff < TOL, diff
    hist = lambda p: [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    h1, h2 = hist(tmp_path / "one"), hist(tmp_path / "ddp")
    assert [r["val_accuracy"] for r in h1] == [r["val_accuracy"] for r in h2]  # validation counts summed over ranks
    assert [r["loss"] for r in h1] == pytest.approx([r["loss"] for r in h2], rel=1e-5)
    assert json.loads(out)["accuracy"] == pytest.approx(json.loads(one.stdout)["accuracy"], abs=0.3)
