"""Resume after a kill: the training state written after every epoch lets an interrupted run continue
to bit-identical weights (CPU, --deterministic); a state that does not belong to the run is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nasty.checkpoint import WEIGHTS, load_checkpoint
from nasty.config import defaults
from nasty.defenses import get_defense
from nasty.errors import NastyError
from nasty.models import create_model
from nasty.frozen import Frozen
from nasty.resume import state_path
from nasty.train import Objective, TrainConfig, ce_objective, fit

TEACHER = ["train-teacher", "--dataset", "digits", "--model", "cnn:width=0.25", "--epochs", "6", "--batch-size", "48",
           "--deterministic"]


def state_epoch(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["nasty"])["epoch"]


def run_nasty(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "nasty", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / WEIGHTS))


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """SIGKILL `nasty train-teacher` after its first epoch state exists, resume, compare with an
    uninterrupted run: every tensor equal bit for bit, the same metrics per epoch."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    victim = run_nasty([*TEACHER, "--out", cut])
    reference = run_nasty([*TEACHER, "--out", ref])
    spath = state_path(cut, "teacher")
    deadline = time.time() + 120
    while not spath.is_file() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # somewhere inside the next epoch
    assert victim.poll() is None, "the run finished before it could be killed; make it longer"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    done = state_epoch(spath)
    assert 1 <= done < 6
    assert not (cut / WEIGHTS).exists()  # the run really was cut short
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    resumed = run_nasty([*TEACHER, "--out", cut, "--resume"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resuming after epoch {done}/6" in err
    a, b = weights(ref), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (ref / WEIGHTS).read_bytes() == (cut / WEIGHTS).read_bytes()
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in p.read_text().splitlines()]  # noqa: E731
    assert strip(ref / "metrics.jsonl") == strip(cut / "metrics.jsonl")
    assert json.loads((ref / "result.json").read_text())["accuracy"] == json.loads((cut / "result.json").read_text())["accuracy"]


# ---- in-process: the defended teacher (a Frozen adversary with an output cache), Adam + one-cycle


@pytest.fixture(scope="module")
def adversary(digits):
    torch.manual_seed(0)
    m = create_model("mlp:hidden=16", 10, 1, (8, 8))
    fit(m, ce_objective(), digits, TrainConfig(epochs=2, batch_size=64, seed=3), log=None)
    return m.eval()


class Interrupt(Exception):
    pass


def defended_run(digits, adversary, run_dir, *, stop_at=None, resume=False, optimizer="adam", schedule="onecycle"):
    dcfg = {**defaults()["defense"], "omega": 0.05}
    frozen = Frozen(adversary, len(digits.y_train))
    objective = get_defense("nasty")(dcfg, digits).objective([frozen])

    def obj(model, batch, epoch):
        if epoch == stop_at:
            raise Interrupt
        return objective(model, batch, epoch)

    torch.manual_seed(0)
    model = create_model("mlp:hidden=32", 10, 1, (8, 8))
    cfg = TrainConfig(epochs=4, batch_size=128, seed=5, deterministic=True, optimizer=optimizer, schedule=schedule)
    res = fit(model, Objective(obj, frozen=objective.frozen), digits, cfg, run_dir=run_dir, desc="defended", save_state=True,
              resume=resume, log=None)
    return model, res, frozen


@pytest.mark.parametrize("optimizer,schedule", [("adam", "onecycle"), ("sgd", "multistep")])
def test_fit_resume_with_frozen_adversary_is_bit_identical(digits, adversary, tmp_path, optimizer, schedule):
    ref, _, _ = defended_run(digits, adversary, tmp_path / "ref", optimizer=optimizer, schedule=schedule)
    with pytest.raises(Interrupt):
        defended_run(digits, adversary, tmp_path / "cut", stop_at=2, optimizer=optimizer, schedule=schedule)
    assert state_epoch(state_path(tmp_path / "cut", "defended")) == 2
    model, res, frozen = defended_run(digits, adversary, tmp_path / "cut", resume=True, optimizer=optimizer, schedule=schedule)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))
    assert len(res.history) == 4 and [r["epoch"] for r in res.history] == [1, 2, 3, 4]
    # the adversary's outputs came from the saved cache: no sample was recomputed after resuming
    assert frozen.samples_run == len(digits.y_train)


class AdaptiveWeight:
    """A toy stateful objective part (like a defense adapting omega each epoch): the objective's ``state``."""

    def __init__(self):
        self.w, self.seen_epoch = 1.0, -1

    def __call__(self, epoch: int) -> float:
        if epoch != self.seen_epoch:
            self.seen_epoch, self.w = epoch, self.w * 0.5
        return self.w

    def resume_state(self):
        return {}, {"w": self.w, "seen_epoch": self.seen_epoch}

    def load_resume_state(self, tensors, meta):
        self.w, self.seen_epoch = meta["w"], meta["seen_epoch"]


def test_fit_resume_restores_objective_state(digits, tmp_path):
    def run(folder, stop_at=None, resume=False):
        weight = AdaptiveWeight()
        ce = ce_objective()

        def obj(model, batch, epoch):
            if epoch == stop_at:
                raise Interrupt
            loss, _ = ce(model, batch, epoch)
            return loss * weight(epoch), {"w": weight.w}

        torch.manual_seed(0)
        model = create_model("mlp:hidden=8", 10, 1, (8, 8))
        fit(model, Objective(obj, state=weight), digits, TrainConfig(epochs=3, seed=2), run_dir=folder, save_state=True,
            resume=resume, log=None)
        return model, weight

    ref, w_ref = run(tmp_path / "ref")
    with pytest.raises(Interrupt):
        run(tmp_path / "cut", stop_at=2)
    model, w = run(tmp_path / "cut", resume=True)
    assert w.w == w_ref.w == 0.125
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))


def test_resume_refuses_another_adversary(digits, adversary, tmp_path):
    with pytest.raises(Interrupt):
        defended_run(digits, adversary, tmp_path / "cut", stop_at=1)
    other = create_model("mlp:hidden=16", 10, 1, (8, 8)).eval()
    with pytest.raises(NastyError, match="frozen networks"):
        defended_run(digits, other, tmp_path / "cut", resume=True)


def test_resume_refuses_other_options_and_data(digits, tmp_path):
    model = create_model("mlp:hidden=8", 10, 1, (8, 8))
    fit(model, ce_objective(), digits, TrainConfig(epochs=1, batch_size=64), run_dir=tmp_path, save_state=True, log=None)
    with pytest.raises(NastyError, match="lr was 0.05, now 0.1"):
        fit(model, ce_objective(), digits, TrainConfig(epochs=1, batch_size=64, lr=0.1), run_dir=tmp_path, resume=True, log=None)
    with pytest.raises(NastyError, match="training data differ"):
        fit(model, ce_objective(), digits, TrainConfig(epochs=1, batch_size=64), run_dir=tmp_path, resume=True, log=None,
            y_train=digits.y_train.flip(0))
    with pytest.raises(NastyError, match="model was"):
        fit(create_model("mlp:hidden=9", 10, 1, (8, 8)), ce_objective(), digits, TrainConfig(epochs=1, batch_size=64),
            run_dir=tmp_path, resume=True, log=None)


def test_completed_state_skips_training(digits, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=64, seed=1)
    torch.manual_seed(0)
    a = create_model("mlp:hidden=8", 10, 1, (8, 8))
    ra = fit(a, ce_objective(), digits, cfg, run_dir=tmp_path, save_state=True, log=None)
    calls = []

    def counting(model, batch, epoch):
        calls.append(1)
        return ce_objective()(model, batch, epoch)

    b = create_model("mlp:hidden=8", 10, 1, (8, 8))
    rb = fit(b, counting, digits, cfg, run_dir=tmp_path, resume=True, log=None)
    assert calls == [] and rb.best_epoch == ra.best_epoch and rb.best_val_accuracy == ra.best_val_accuracy
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_default_fit_writes_no_state(digits, tmp_path):
    """Behaviour of plain fit() is unchanged: no state file unless asked (the CLI asks)."""
    fit(create_model("mlp:hidden=8", 10, 1, (8, 8)), ce_objective(), digits, TrainConfig(epochs=1), run_dir=tmp_path, log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_state_file_is_safetensors_and_json(digits, tmp_path):
    fit(create_model("mlp:hidden=8", 10, 1, (8, 8)), ce_objective(), digits, TrainConfig(epochs=2, optimizer="adam"),
        run_dir=tmp_path, save_state=True, log=None)
    spath = state_path(tmp_path, "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", spath.name]  # no temporary files left
    with safe_open(str(spath), framework="pt") as f:
        meta = json.loads(f.metadata()["nasty"])
        keys = set(f.keys())
    assert meta["format"] == "nasty-train-state" and meta["epoch"] == 2 and meta["complete"]
    assert {"rng/torch", "rng/batches", "model/head.weight", "best/head.weight", "optim/0/exp_avg"} <= keys
    assert set(meta) >= {"train_config", "optimizer", "scheduler", "rng", "history", "frozen", "data"}


# ---- through the CLI


def test_cli_resume_checks(run_cli, tmp_path):
    out = tmp_path / "run"
    base = ["train-teacher", "--dataset", "digits", "--model", "mlp:hidden=8", "--epochs", "1", "--out", out]
    rc, _, err = run_cli(*base)
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["command"] == "train-teacher"
    for args, needle in (
        ([*base, "--resume", "--lr", "0.1"], "option train.lr was 0.05, now 0.1"),
        ([*base, "--resume", "--force"], "pass one of them"),
        ([*base[:-2], "--resume"], "--resume needs --out"),
        ([*base], "--force"),
        (["attack", "--teacher", out, "--epochs", "1", "--out", out, "--resume"], "holds a run of `train-teacher`"),
    ):
        rc, _, err = run_cli(*args)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, (args, err)
    # resuming a finished run redoes nothing and reproduces the same checkpoint
    before = (out / WEIGHTS).read_bytes()
    rc, _, err = run_cli(*base, "--resume")
    assert rc == 0 and "resuming after epoch 1/1" in err
    assert (out / WEIGHTS).read_bytes() == before
    # a damaged state: one line, exit 2
    spath = state_path(out, "teacher")
    spath.write_bytes(spath.read_bytes()[:100])
    rc, _, err = run_cli(*base, "--resume")
    assert rc == 2 and "unreadable training state" in err and len(err.strip().splitlines()) == 1
    load_checkpoint(out)  # the finished checkpoint itself is untouched


def test_cli_resume_defended_and_attack(run_cli, tmp_path):
    """--resume on train-defended (adversary + defended phase) and attack, after an interrupted defended phase."""
    out = tmp_path / "d"
    base = ["train-defended", "--dataset", "digits", "--model", "mlp:hidden=8", "--epochs", "2", "--no-probe", "--deterministic", "--lock", "none",
            "--out", out]
    rc, _, err = run_cli(*base)
    assert rc == 0, err
    full = (out / "defended" / WEIGHTS).read_bytes()
    # simulate a kill after the defended phase's first epoch: roll its state back by one epoch
    cut = tmp_path / "cut"
    rc, _, err = run_cli(*base[:-1], cut)
    (cut / "defended" / WEIGHTS).unlink()
    spath = state_path(cut / "defended", "defended:nasty")
    first = tmp_path / "epoch1.safetensors"
    _rerun_one_epoch(run_cli, base, tmp_path / "one", first)
    spath.write_bytes(first.read_bytes())
    rc, _, err = run_cli(*base[:-1], cut, "--resume")
    assert rc == 0, err
    assert "[normal:mlp:hidden=8] resuming after epoch 2/2" in err and "[defended:nasty] resuming after epoch 1/2" in err
    assert (cut / "defended" / WEIGHTS).read_bytes() == full

    att = ["attack", "--teacher", out / "defended", "--dataset", "digits", "--student", "mlp:hidden=8", "--epochs", "2",
           "--deterministic", "--out", tmp_path / "a"]
    rc, _, err = run_cli(*att)
    assert rc == 0, err
    rc, _, err = run_cli(*att, "--resume")
    assert rc == 0 and "resuming after epoch 2/2" in err


def _rerun_one_epoch(run_cli, base, folder, dest):
    """The defended phase's state after epoch 1 of 2: run the same command and stop it after that epoch."""
    import nasty.train as tr

    real = tr.save_fit_state

    def stop_after_first(path, **kw):
        real(path, **kw)
        if kw["desc"] == "defended:nasty" and kw["state"].epoch == 1:
            dest.write_bytes(Path(path).read_bytes())
            raise KeyboardInterrupt

    tr.save_fit_state = stop_after_first
    try:
        rc, _, err = run_cli(*base[:-1], folder)
    finally:
        tr.save_fit_state = real
    assert rc == 130 and dest.is_file(), err
