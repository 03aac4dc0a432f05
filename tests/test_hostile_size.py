"""Issue 22, class 3: nothing is materialised before its size is known and within budget.

`nasty convert` compares every tensor with the model before copying it, and reads nothing that unpacks
beyond what the model can need (nasty/checkpoint.py: ``read_legacy_state_dict``, ``load_legacy_state``);
a count option has a bound that follows from what it means (audit seeds); a model spec is checked on
the meta device only, within a parameter budget (nasty/config.py ``check_model_spec``)."""

from __future__ import annotations

import resource
import time
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from nasty.audit.settings import AUDIT_PARAMS, MAX_SEEDS
from nasty.checkpoint import read_legacy_state_dict
from nasty.config import MAX_PARAMETERS, check_model_spec
from nasty.errors import NastyError
from nasty.models import create_model

SPEC = "mlp:hidden=16"
MEMORY_BUDGET = 200 << 20  # bytes
TIME_BUDGET = 60.0  # seconds, generous: the machine is shared


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def within_budget(fn, budget: int = MEMORY_BUDGET):
    """Run ``fn``; its peak memory (above the process's peak so far) and its time stay within budget."""
    before, t0 = peak_rss(), time.monotonic()
    result = fn()
    grown, took = peak_rss() - before, time.monotonic() - t0
    assert grown < budget, f"peak memory grew by {grown >> 20} MiB"
    assert took < TIME_BUDGET, f"took {took:.0f} s"
    return result


def one_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def _model_state() -> dict[str, torch.Tensor]:
    return create_model(SPEC, 10, 1, (8, 8)).state_dict()


# ---- (a) a view claims a shape its storage does not hold: refused before it is copied

HUGE = st.integers(min_value=10**4, max_value=10**6)


@st.composite
def hostile_views(draw):
    """The model's state dict with one tensor replaced by a stride-0 or expanded view of a shape the model
    does not have (up to 1e12 elements claimed, a few bytes stored)."""
    state = _model_state()
    key = draw(st.sampled_from(sorted(state)))
    kind = draw(st.sampled_from(["stride0", "expand_row", "extra_dim", "right_numel_wrong_shape"]))
    base = state[key]
    if kind == "stride0":
        v = torch.zeros(1).expand(draw(HUGE), draw(HUGE))
    elif kind == "expand_row":
        v = base.reshape(1, -1).expand(draw(HUGE), base.numel())
    elif kind == "extra_dim":
        v = base.unsqueeze(0).expand(draw(HUGE), *base.shape)
    else:
        v = torch.zeros(1).expand(base.numel() * draw(HUGE))
    return {**state, key: v}, key


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=hostile_views())
def test_convert_refuses_views_of_a_shape_the_model_lacks(run_cli, tmp_path_factory, case):
    """Seen failing (1.6 GB and more, MemoryError / exit 3) with load_legacy_state's shape check moved back
    after .contiguous()."""
    state, key = case
    folder = tmp_path_factory.mktemp("view")
    f = folder / "view.pt"
    torch.save(state, f)
    assert f.stat().st_size < 64 << 10  # the file is small: what it claims is not
    rc, out, err = within_budget(lambda: run_cli("convert", f, "--model", SPEC, "--dataset", "digits", "--out", folder / "conv"))
    one_line(rc, err, key)
    assert not (folder / "conv").exists()


def test_a_stride0_view_of_the_right_shape_is_loaded(run_cli, tmp_path):
    """The other side: a view that has the model's shape is fine (it is copied at the model's own size)."""
    state = {k: torch.zeros(1, dtype=v.dtype).expand(v.shape) for k, v in _model_state().items()}
    torch.save(state, tmp_path / "v.pt")
    rc, out, err = run_cli("convert", tmp_path / "v.pt", "--model", SPEC, "--dataset", "digits", "--out", tmp_path / "conv")
    assert rc == 0, err


# ---- (b) a compressed storage that inflates beyond the budget: refused from the zip directory


@pytest.mark.parametrize("n", [10**8, 4 * 10**8])  # 400 MB, 1.6 GB of zeros (a few MB deflated)
def test_convert_refuses_what_inflates_beyond_the_budget(run_cli, tmp_path, n):
    """Seen failing (each inflated in full before torch refused it)
    with read_legacy_state_dict's archive check removed."""
    src = tmp_path / "big.pt"
    _zero_storage_zip(src, n)
    assert src.stat().st_size < 8 << 20
    rc, out, err = within_budget(lambda: run_cli("convert", src, "--model", SPEC, "--dataset", "digits", "--out", tmp_path / "conv"))
    one_line(rc, err, "unpacks to", "refused")


def _zero_storage_zip(dst, n: int) -> None:
    """A torch.save file of the model's state dict plus one float32 storage of ``n`` zeros, deflated,
    written in chunks (never ``n`` floats in memory)."""
    small = dst.with_suffix(".small.pt")
    state = _model_state()
    state["extra"] = torch.zeros(1)
    torch.save(state, small)
    with zipfile.ZipFile(small) as zi:
        names = zi.namelist()
        extra = [nm for nm in names if nm.split("/")[-2:-1] == ["data"] and zi.getinfo(nm).file_size == 4]
        assert len(extra) == 1
        extra = extra[0]
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zo:
            for nm in names:
                if nm == extra:
                    with zo.open(nm, "w", force_zip64=True) as w:
                        chunk = bytes(1 << 20)
                        left = 4 * n
                        while left:
                            w.write(chunk[:min(left, len(chunk))])
                            left -= min(left, len(chunk))
                else:
                    zo.writestr(nm, zi.read(nm))


def test_reader_budget_is_the_callers(tmp_path):
    torch.save(_model_state(), tmp_path / "s.pt")
    assert read_legacy_state_dict(tmp_path / "s.pt", budget=1 << 20)
    with pytest.raises(NastyError, match="unpacks to"):
        read_legacy_state_dict(tmp_path / "s.pt", budget=100)


# ---- (c) count options: bounded by what they mean


@given(st.integers(min_value=MAX_SEEDS + 1, max_value=10**12))
def test_audit_seeds_have_a_sane_cap(n):
    """Seen failing (100000000 accepted) with the Param's hi removed."""
    with pytest.raises(NastyError, match="at most 1000"):
        AUDIT_PARAMS["seeds"].validate("--seeds", n)
    assert AUDIT_PARAMS["seeds"].validate("--seeds", MAX_SEEDS) == MAX_SEEDS


def test_audit_seeds_refused_on_the_command_line(run_cli, tmp_path):
    rc, out, err = within_budget(lambda: run_cli("audit", tmp_path / "missing", "--seeds", "100000000", "--out", tmp_path / "a"))
    one_line(rc, err, "--seeds", "at most 1000")


# ---- (d) a model spec is checked on the meta device, within a parameter budget


def test_big_torchvision_spec_is_checked_on_meta():
    """Seen failing (85 s, 4.85 GB) with external._weights_on_meta replaced by a CPU build."""
    pytest.importorskip("torchvision")
    check_model_spec("torchvision:regnet_y_400mf", "--model", 10, 3, (32, 32))  # warm-up: imports and lazy registries count once
    # the bound (nothing above 1 GB): alone this check grows the peak by ~10 MB, inside the full suite by up to
    # ~400 MB (allocator state left by earlier tests); the CPU build it guards against took 4.85 GB
    within_budget(lambda: check_model_spec("torchvision:regnet_y_128gf", "--model", 10, 3, (32, 32)), budget=1 << 30)


@pytest.mark.parametrize("spec", ["mlp:hidden=1000000", "mlp:hidden=700000"])
def test_models_above_the_parameter_budget_are_refused(spec):
    """Seen failing (accepted) with the budget check in config.check_model_spec removed."""
    with pytest.raises(NastyError, match="parameters, more than") as e:
        within_budget(lambda: check_model_spec(spec, "--model", 10, 3, (32, 32)))
    assert "\n" not in str(e.value) and f"{MAX_PARAMETERS:.0e}" in str(e.value)
