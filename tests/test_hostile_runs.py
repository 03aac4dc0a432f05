"""Issue 11, classes 1 and 6: --force never destroys an input, the current folder or a folder that
is not a nasty run; leftovers of a killed first write do not block a re-run or a resume; a lock on
--out keeps two concurrent runs from both succeeding."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FAST = ["--model", "mlp:hidden=4", "--epochs", "1", "--batch-size", "256"]


def refused(rc: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def teacher(folder: Path) -> Path:
    """A digits-shaped checkpoint in a folder that looks like a run (run.json, model.json)."""
    from nasty.checkpoint import save_checkpoint
    from nasty.models import create_model

    m = create_model("mlp:hidden=4", 10, 1, (8, 8))
    save_checkpoint(folder, m, classes=[str(i) for i in range(10)], input_shape=(1, 8, 8), mean=[0.3], std=[0.4], dataset="digits")
    (folder / "run.json").write_text(json.dumps({"command": "train-teacher", "config": {}}))
    return folder


def image_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (4, 4), dtype=np.uint8), "L").save(root / split / c / f"{i}.png")
    (root / "result.json").write_text("{}")  # even a folder that looks like a run is never replaced when it is an input
    return root


def test_attack_out_is_its_teacher(run_cli, tmp_path):
    t = teacher(tmp_path / "t")
    rc, out, err = run_cli("attack", "--teacher", t, "--out", t, "--force", *FAST)
    refused(rc, err, "--force refused", "input of this command")
    assert (t / "model.safetensors").is_file() and (t / "model.json").is_file()


def test_attack_out_holds_its_teacher(run_cli, tmp_path):
    t = teacher(tmp_path / "runs" / "t")
    (tmp_path / "runs" / "result.json").write_text("{}")
    rc, out, err = run_cli("attack", "--teacher", t / "model.safetensors", "--out", tmp_path / "runs", "--force", *FAST)
    refused(rc, err, "holds")
    assert (t / "model.safetensors").is_file()


def test_teacher_named_in_config_file_is_an_input_too(run_cli, tmp_path):
    t = teacher(tmp_path / "t")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[attack]\nteacher = ["{t}"]\n')
    rc, out, err = run_cli("attack", "--config", cfg, "--out", t, "--force", *FAST)
    refused(rc, err, "input of this command")
    assert (t / "model.safetensors").is_file()


def test_train_teacher_out_is_its_dataset(run_cli, tmp_path):
    d = image_folder(tmp_path / "D")
    rc, out, err = run_cli("train-teacher", "--dataset", f"imagefolder:{d}", "--out", d, "--force", *FAST)
    refused(rc, err, "input of this command")
    assert (d / "train" / "a" / "0.png").is_file()


def test_audit_out_is_its_teacher(run_cli, tmp_path):
    t = teacher(tmp_path / "t")
    rc, out, err = run_cli("audit", t, "--out", t, "--force")
    refused(rc, err, "input of this command")
    assert (t / "model.safetensors").is_file()


@pytest.mark.parametrize("where", ["cwd", "parent"])
def test_force_never_clears_the_current_folder_or_a_parent(run_cli, tmp_path, monkeypatch, where):
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    (work / "precious.txt").write_text("keep me")
    (work / "run.json").write_text("{}")  # even if it looks like a run
    monkeypatch.chdir(work)
    out = "." if where == "cwd" else ".."
    rc, o, err = run_cli("train-teacher", "--out", out, "--force", *FAST)
    refused(rc, err, "current directory")
    assert (work / "precious.txt").read_text() == "keep me"


def test_force_refuses_a_folder_that_is_not_a_run(run_cli, tmp_path):
    f = tmp_path / "photos"
    f.mkdir()
    (f / "holiday.jpg").write_bytes(b"x")
    rc, o, err = run_cli("train-teacher", "--out", f, "--force", *FAST)
    refused(rc, err, "does not look like a nasty run")
    assert (f / "holiday.jpg").is_file()


def test_force_refuses_a_symlinked_out(run_cli, tmp_path):
    real = teacher(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    rc, o, err = run_cli("train-teacher", "--out", tmp_path / "link", "--force", *FAST)
    refused(rc, err, "symbolic link")
    assert (real / "model.json").is_file()


def test_force_replaces_an_old_run(run_cli, tmp_path):
    out = tmp_path / "run"
    assert run_cli("train-teacher", "--out", out, *FAST)[0] == 0
    (out / "old-marker").write_text("")
    rc, o, err = run_cli("train-teacher", "--out", out, "--force", *FAST)
    assert rc == 0, err
    assert not (out / "old-marker").exists() and (out / "result.json").is_file()


def test_a_run_refused_before_any_work_leaves_nothing_that_blocks_the_retry(run_cli, tmp_path):
    """A refusal found after the run folder was prepared (here: --keep without a lock, checked with the
    defense) removes what the command wrote there: a folder it made, the run.json and lock in an empty
    folder it was given; the corrected retry then runs without --force. Seen failing (the retry refused:
    'not empty') without safe_io.track_fresh."""
    bad = ["train-defended", "--dataset", "digits", "--epochs", "1", "--no-probe", "--keep", "confidence", "--lock", "none"]
    made, given = tmp_path / "made", tmp_path / "given"
    given.mkdir()
    for out in (made, given):
        rc, _, err = run_cli(*bad, "--out", out)
        assert rc == 2 and "--lock none" in err, err
    assert not made.exists() and given.is_dir() and not any(given.iterdir())
    rc, _, err = run_cli("train-teacher", "--out", made, *FAST)
    assert rc == 0, err


def test_a_failed_run_keeps_its_work_and_what_it_did_not_write(tmp_path):
    """Only a folder holding nothing but the named files is emptied: anything else (a training state,
    a link) keeps the whole folder as it was."""
    from nasty import safe_io

    for extra in ("train_state-teacher.safetensors", "link"):
        out = tmp_path / extra
        out.mkdir()
        safe_io.track_fresh(out, True, {"run.json", ".nasty.lock"})
        (out / "run.json").write_text("{}")
        if extra == "link":
            os.symlink(tmp_path / "elsewhere", out / "link")
        else:
            (out / extra).write_bytes(b"state")
        safe_io.settle(False)
        assert sorted(p.name for p in out.iterdir()) == sorted(["run.json", extra])


# ---------------------------------------------------------------------------------------------- class 6


def test_leftover_tmp_of_a_killed_first_write_does_not_block(run_cli, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".nasty-tmp-k2j3h4.tmp").write_bytes(b'{"command": "tr')  # killed while writing run.json
    rc, o, err = run_cli("train-teacher", "--out", out, *FAST)
    assert rc == 0, err
    assert not list(out.glob(".*.tmp"))


def test_leftover_tmp_does_not_block_resume(run_cli, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".nasty-tmp-k2j3h4.tmp").write_bytes(b"{")
    rc, o, err = run_cli("train-teacher", "--out", out, "--resume", *FAST)
    assert rc == 0, err
    assert not list(out.glob(".*.tmp"))


def test_resume_removes_stale_temporaries_and_keeps_complete_files(run_cli, tmp_path):
    out = tmp_path / "run"
    assert run_cli("train-teacher", "--out", out, *FAST)[0] == 0
    stale = out / ".nasty-tmp-abc.tmp"
    stale.write_bytes(b"partial")
    rc, o, err = run_cli("train-teacher", "--out", out, "--resume", *FAST)
    assert rc == 0, err
    assert not stale.exists() and (out / "result.json").is_file()


def _hold_lock(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".nasty.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


@pytest.mark.parametrize("mode", ["plain", "resume", "force"])
def test_locked_out_is_refused(run_cli, tmp_path, mode):
    out = tmp_path / "run"
    if mode == "force":
        assert run_cli("train-teacher", "--out", out, *FAST)[0] == 0
    fd = _hold_lock(out)  # another process would hold it; a second open file description conflicts the same way
    try:
        extra = {"plain": [], "resume": ["--resume"], "force": ["--force"]}[mode]
        rc, o, err = run_cli("train-teacher", "--out", out, *extra, *FAST)
        refused(rc, err, "in use by another nasty run")
    finally:
        os.close(fd)
    assert run_cli("train-teacher", "--out", out, "--force", *FAST)[0] == 0  # the lock is released after each command


def test_two_runs_started_together_do_not_both_succeed(tmp_path):
    """A sanity check of the lock under a real race (the timing-independent check is test_locked_out_is_refused)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nasty", "train-teacher", "--out", str(out), "--model", "mlp:hidden=4", "--epochs", "1", "--batch-size", "256"]
    procs = [subprocess.Popen(cmd + ["--seed", str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for s in (0, 1)]
    res = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in res)
    assert codes == [0, 2], res
    loser = next(err for rc, err in res if rc == 2)
    assert "another nasty run" in loser or "not empty" in loser
    winner_seed = next(s for s, (rc, _) in zip((0, 1), res) if rc == 0)
    assert json.loads((out / "run.json").read_text())["config"]["train"]["seed"] == winner_seed


def test_audit_folder_in_use_is_refused(run_cli, tmp_path):
    t = teacher(tmp_path / "t")
    out = tmp_path / "aud"
    fd = os.open(tmp_path / ".aud.nasty.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        rc, o, err = run_cli("audit", t, "--out", out, "--attacks", "kd", "--seeds", "1", "--epochs", "1")
        refused(rc, err, "in use by another nasty run")
    finally:
        os.close(fd)


@pytest.mark.parametrize("option", ["--adversary", "--init-from"])
def test_train_defended_out_is_its_adversary(run_cli, tmp_path, option):
    t = teacher(tmp_path / "t")
    extra = ["--adversary", t] if option == "--init-from" else []
    rc, out, err = run_cli("train-defended", option, t, *extra, "--out", t, "--force", "--no-probe", *FAST)
    refused(rc, err, "input of this command")
    assert (t / "model.safetensors").is_file()


def test_convert_out_holds_its_source(run_cli, tmp_path):
    import torch

    from nasty.models import create_model

    folder = tmp_path / "legacy"
    folder.mkdir()
    torch.save(create_model("mlp:hidden=4", 10, 1, (8, 8)).state_dict(), folder / "w.pt")
    (folder / "result.json").write_text("{}")
    rc, out, err = run_cli("convert", folder / "w.pt", "--model", "mlp:hidden=4", "--out", folder, "--force")
    refused(rc, err, "input of this command")
    assert (folder / "w.pt").is_file()
