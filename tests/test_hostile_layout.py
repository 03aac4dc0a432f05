"""Issue 11, class 7: channels-last training only where it is known not to corrupt memory.

The op: a strided 1x1 convolution with fewer input channels (per group) than the channel block of
oneDNN's ``jit_1x1`` backward-weights kernel (16 with AVX-512, 8 with AVX2), e.g. the shortcut of
resnet20:width=0.25 (4 -> 8 channels, stride 2). Its reduce-to-unit-stride workspace is written
past its end in channels-last layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nasty.models import create_model, list_models
from nasty.train import channels_last_hazard, use_channels_last

X = torch.zeros(2, 1, 8, 8)


@pytest.mark.parametrize("spec,hazard", [
    ("resnet20:width=0.25", True), ("resnet20:width=0.5", True), ("resnet20", False),
    ("resnet18:width=0.125", True), ("resnet18:width=0.25", False), ("cnn:width=0.25", False), ("mlp:hidden=8", False),
])
def test_hazard_found_by_architecture(spec, hazard):
    m = create_model(spec, 10, 1, (8, 8))
    assert (channels_last_hazard(m) is not None) == hazard
    assert use_channels_last(X, [m]) == (not hazard)


def test_one_hazardous_member_keeps_the_whole_group_in_nchw():
    safe, bad = create_model("cnn:width=0.25", 10, 1, (8, 8)), create_model("resnet20:width=0.25", 10, 1, (8, 8))
    assert use_channels_last(X, [safe]) and not use_channels_last(X, [safe, bad])


def test_environment_switch_still_turns_it_off(monkeypatch):
    monkeypatch.setenv("NASTY_CHANNELS_LAST", "0")
    assert not use_channels_last(X, [create_model("cnn:width=0.25", 10, 1, (8, 8))])


REPRO = textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    conv = torch.nn.Conv2d(4, 8, 1, stride=2, bias=False).to(memory_format=torch.channels_last)
    ref = torch.nn.Conv2d(4, 8, 1, stride=2, bias=False)
    ref.load_state_dict(conv.state_dict())
    for n in (128, 128, 101, 37, 128):
        x = torch.randn(n, 4, 8, 8)
        conv.zero_grad(); ref.zero_grad()
        conv(x.contiguous(memory_format=torch.channels_last)).sum().backward()
        ref(x).sum().backward()
        assert torch.allclose(conv.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4), "gradients differ"
""")


def test_plain_torch_reproduction():
    """The op on its own, in plain torch, in a subprocess (glibc's heap checks on). Where this torch
    build is fixed (or the overrun misses the heap's bookkeeping), it is skipped; where it fails,
    nasty must keep such models out of channels-last."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_CHECK_": "3"}
    r = subprocess.run([sys.executable, "-c", REPRO], capture_output=True, text=True, env=env, timeout=120)
    if r.returncode == 0:
        pytest.skip("this torch/oneDNN build did not corrupt memory on the strided 1x1 channels-last backward")
    assert channels_last_hazard(torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1, stride=2))) is not None


def _specs() -> list[str]:
    """Every registered architecture at two small widths (or its own small option, or as it is)."""
    out = []
    for name in list_models():
        for opts in (("width=0.125", "width=0.25"), ("hidden=8",), ("",)):
            specs = [f"{name}:{o}" if o else name for o in opts]
            try:
                for spec in specs:
                    create_model(spec, 10, 1, (8, 8))
            except Exception:
                continue
            out += specs
            break
    return out


SWEEP = textwrap.dedent("""
    import json, math, sys, torch
    from nasty.models import create_model
    from nasty.train import use_channels_last
    torch.manual_seed(0)
    res = {}

    def grads(spec, shape, x, y, layout, dtype=torch.float32):
        torch.manual_seed(1)
        m = create_model(spec, 10, shape[0], shape[1:]).train().to(dtype)
        xb = x.to(dtype)
        if layout == "auto" and use_channels_last(x, [m]):
            m = m.to(memory_format=torch.channels_last)
            xb = xb.contiguous(memory_format=torch.channels_last)
        for _ in range(2):  # the second pass reuses the buffers (and any workspace) of the first
            m.zero_grad()
            torch.nn.functional.cross_entropy(m(xb), y).backward()
        return [p.grad.double() if p.grad is not None else torch.zeros(p.shape, dtype=torch.float64) for p in m.parameters()]

    def rel(a, b):
        return math.sqrt(sum(((u - v) ** 2).sum().item() for u, v in zip(a, b)) / max(sum((v ** 2).sum().item() for v in b), 1e-30))

    for spec in json.loads(sys.argv[1]):
        for shape in ((1, 8, 8), (3, 16, 16)):
            x = torch.randn(24, *shape)
            y = torch.arange(24) % 10
            res[f"{spec} {shape}"] = rel(grads(spec, shape, x, y, "auto"), grads(spec, shape, x, y, "nchw"))
    print(json.dumps(res))
""")


@pytest.mark.parametrize("threads", [1, 2])
def test_every_registered_model_trains_safely_in_both_layouts(threads):
    """Every registered architecture at several widths, in NCHW and in the layout nasty picks, in a
    subprocess with glibc's heap checks, at 1 and 2 threads: no crash, and gradients within
    float-rounding distance of the NCHW ones (not corruption)."""
    specs = _specs()
    assert any(s.startswith("resnet20") for s in specs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MALLOC_CHECK_": "3", "OMP_WAIT_POLICY": "PASSIVE"}  # no spinning on a busy machine
    r = subprocess.run([sys.executable, "-c", SWEEP, json.dumps(specs)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # Corruption gives O(1) errors or NaN. Channels-last kernels reduce in another order, and the
    # BatchNorm-bias gradients of the small mobilenetv2/shufflenetv2 cancel almost to zero, which
    # amplifies that: up to ~4e-2 relative at width 0.25 (NCHW: ~1e-5 at one thread, ~1e-2 at two).
    bad = {k: v for k, v in res.items() if not v < 0.1}
    assert not bad, bad
