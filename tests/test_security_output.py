"""Output safety: no run is overwritten without --force, and a failed write (disk full, permissions)
leaves the previous checkpoint and training state intact and loadable."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import nasty.checkpoint as ck
import nasty.resume
from nasty.checkpoint import SIDECAR, WEIGHTS, WriteFailed, load_checkpoint, save_checkpoint
from nasty.models import create_model
from nasty.resume import state_path
from nasty.train import TrainConfig, ce_objective, fit


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def save(folder: Path, model, digits) -> Path:
    return save_checkpoint(folder, model, classes=digits.classes, input_shape=(1, 8, 8), mean=digits.mean, std=digits.std,
                           dataset="digits")


@pytest.fixture
def saved(tmp_path, digits):
    torch.manual_seed(0)
    save(tmp_path, create_model("mlp:hidden=8", 10, 1, (8, 8)), digits)
    return tmp_path


def failing(real, *, on_call: int, err=errno.ENOSPC):
    calls = []

    def fn(*a, **kw):
        calls.append(a)
        if len(calls) == on_call:
            raise OSError(err, os.strerror(err))
        return real(*a, **kw)

    return fn


@pytest.mark.parametrize("where", ["replace-weights", "replace-sidecar", "fsync", "mkstemp"])
def test_failed_save_keeps_previous_checkpoint(saved, digits, monkeypatch, where):
    before = snapshot(saved)
    new = create_model("mlp:hidden=8", 10, 1, (8, 8))  # other weights
    if where == "replace-weights":
        monkeypatch.setattr(ck.os, "replace", failing(os.replace, on_call=1))
    elif where == "replace-sidecar":  # the weights are already replaced: they must be rolled back
        monkeypatch.setattr(ck.os, "replace", failing(os.replace, on_call=2))
    elif where == "fsync":  # disk full while writing the temporary file
        monkeypatch.setattr(ck.os, "fsync", failing(os.fsync, on_call=1))
    else:
        monkeypatch.setattr(ck.tempfile, "mkstemp", failing(ck.tempfile.mkstemp, on_call=1, err=errno.EACCES))
    with pytest.raises(WriteFailed) as exc:
        save(saved, new, digits)
    monkeypatch.undo()
    # no permission on the output folder is the user's input (exit 2); a full disk or I/O error is not (exit 3)
    assert "\n" not in str(exc.value) and exc.value.exit_code == (2 if where == "mkstemp" else 3) and "unchanged" in str(exc.value)
    assert snapshot(saved) == before  # byte for byte, and no temporary or backup file left behind
    load_checkpoint(saved)


def test_save_replaces_both_files(saved, digits):
    before = snapshot(saved)
    save(saved, create_model("mlp:hidden=8", 10, 1, (8, 8)), digits)
    after = snapshot(saved)
    assert sorted(after) == sorted([WEIGHTS, SIDECAR]) and after[WEIGHTS] != before[WEIGHTS]
    mode = (saved / WEIGHTS).stat().st_mode & 0o777
    assert mode == ck._FILE_MODE  # readable by others as the umask allows, not mkstemp's 0600


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_folder(saved, digits):
    before = snapshot(saved)
    saved.chmod(0o555)
    try:
        with pytest.raises(WriteFailed, match="Permission denied"):
            save(saved, create_model("mlp:hidden=8", 10, 1, (8, 8)), digits)
    finally:
        saved.chmod(0o755)
    assert snapshot(saved) == before


def test_failed_state_write_keeps_previous_state(digits, tmp_path, monkeypatch):
    """Disk full while writing epoch 2's training state: the run stops with one line, epoch 1's
    state is intact and a resume continues from it."""
    real = ck.save_state_file
    calls = []

    def second_fails(path, tensors, meta):
        calls.append(1)
        if len(calls) == 2:
            monkeypatch.setattr(ck.os, "replace", failing(os.replace, on_call=1))
        try:
            real(path, tensors, meta)
        finally:
            monkeypatch.setattr(ck.os, "replace", os.replace)

    monkeypatch.setattr(nasty.resume, "save_state_file", second_fails)  # where fit's state writer looks it up
    model = create_model("mlp:hidden=8", 10, 1, (8, 8))
    with pytest.raises(WriteFailed, match="No space left on device"):
        fit(model, ce_objective(), digits, TrainConfig(epochs=3), run_dir=tmp_path, save_state=True, log=None)
    monkeypatch.undo()
    spath = state_path(tmp_path, "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", spath.name]
    res = fit(create_model("mlp:hidden=8", 10, 1, (8, 8)), ce_objective(), digits, TrainConfig(epochs=3), run_dir=tmp_path,
              resume=True, save_state=True, log=None)
    assert [r["epoch"] for r in res.history] == [1, 2, 3]


def test_cli_write_error_is_one_line(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(ck.os, "replace", failing(os.replace, on_call=1))
    rc, _, err = run_cli("train-teacher", "--dataset", "digits", "--model", "mlp:hidden=8", "--epochs", "1", "--out", tmp_path / "r")
    assert rc == 3 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: cannot write") and "No space left on device" in err


@pytest.mark.parametrize("command", ["train-teacher", "train-defended", "attack", "convert"])
def test_no_overwrite_without_force(run_cli, tmp_path, saved, command):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "result.json").write_text("{}")
    before = snapshot(out)
    pt = tmp_path / "legacy.pt"
    torch.save(load_checkpoint(saved)[0].state_dict(), pt)
    args = {
        "train-teacher": ["--dataset", "digits", "--epochs", "1"],
        "train-defended": ["--dataset", "digits", "--epochs", "1", "--no-probe", "--adversary", saved],
        "attack": ["--dataset", "digits", "--epochs", "1", "--teacher", saved],
        "convert": [pt, "--model", "mlp:hidden=8"],
    }[command]
    rc, _, err = run_cli(command, *args, "--out", out)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--force" in err
    assert snapshot(out) == before
