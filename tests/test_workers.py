"""Probe students trained in worker processes (nasty/workers.py) and reused between the strength's choice
and the probe (nasty/pipelines/leakage.py StudentRuns)."""

from __future__ import annotations

import time

import pytest
import torch

from nasty import workers
from nasty.pipelines import leakage


def _train_task(seed: int, sleep: float = 0.0):
    def task():
        time.sleep(sleep)
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
        for _ in range(20):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        return {"seed": seed, "threads": torch.get_num_threads()}, {"w": net[0].weight.detach(), "pred": net(x).argmax(1)}
    return task


def test_workers_give_what_one_process_gives_bit_for_bit_in_order():
    torch.set_num_threads(2)
    try:
        tasks = [_train_task(s, sleep=0.3 if s == 0 else 0.0) for s in range(3)]  # the first finishes last
        alone = workers.run_tasks(tasks, jobs=1)
        assert torch.get_num_threads() == 2  # restored after the tasks
        together = workers.run_tasks(tasks, jobs=3)
    finally:
        torch.set_num_threads(1)
    assert [h["seed"] for h, _ in together] == [0, 1, 2]
    assert all(h["threads"] == 1 for h, _ in alone + together)  # one thread either way: the numbers cannot depend on it
    for (_, a), (_, b) in zip(alone, together):
        assert torch.equal(a["w"], b["w"]) and torch.equal(a["pred"], b["pred"])


def test_a_failing_worker_is_raised_with_its_traceback():
    def boom():
        raise ValueError("the student broke")

    with pytest.raises(RuntimeError, match="the student broke"):
        workers.run_tasks([_train_task(0), boom], jobs=2)


def test_headers_and_tensors_round_trip_without_pickle():
    h, t = workers.decode(workers.encode({"a": [1, None]}, {"x": torch.arange(3)}))
    assert h == {"a": [1, None]} and torch.equal(t["x"], torch.arange(3))
    assert workers.decode(workers.encode({"failed": "diverged"}, {})) == ({"failed": "diverged"}, {})


def _cfg(jobs=1):
    from nasty.config import load_config

    cfg = load_config(None)
    cfg["probe"].update(labelled=20, queries=60, students=["mlp:hidden=16"], jobs=jobs)
    cfg["probe"]["train"] = {"epochs": 3}
    return cfg


def test_probe_reuses_the_students_of_the_strength_choice(digits, small_teacher, monkeypatch):
    """The second measurement of the same floors and attacks trains nothing and scores what the first trained
    on the images it was asked to keep; another teacher's attack (and only that) trains anew."""
    trained = []
    real = workers.run_tasks

    def counting(tasks, jobs=1):
        trained.append(len(tasks))
        return real(tasks, jobs)

    monkeypatch.setattr(leakage, "run_tasks", counting)
    cfg, runs = _cfg(), leakage.StudentRuns()
    holdout = (digits.x_val, digits.y_val)
    first = leakage.measure(cfg, digits, {"t": small_teacher}, {"t": ["kd"]}, score_on=holdout, seeds=[0], out=None,
                            log=lambda m: None, runs=runs, also={"test": digits.x_test})
    again = leakage.measure(cfg, digits, {"t": small_teacher}, {"t": ["kd"]}, seeds=[0], out=None, log=lambda m: None, runs=runs)
    assert trained == [6, 0]  # scratch, label-smoothing, hard-label at three smoothings, kd; then nothing
    fresh = leakage.measure(cfg, digits, {"t": small_teacher}, {"t": ["kd"]}, seeds=[0], out=None, log=lambda m: None)
    assert again["accuracy"] == fresh["accuracy"]  # reused = what training them again gives, on the test split
    assert again["accuracy"] != first["accuracy"]  # the first call scored on the held-out images, not the test split
    other = torch.nn.Sequential(small_teacher, torch.nn.Identity()).eval()
    leakage.measure(cfg, digits, {"u": other}, {"u": ["kd"]}, seeds=[0], out=None, log=lambda m: None, runs=runs)
    assert trained[-1] == 4  # hard-label x 3 (another teacher's decisions, by weights) and kd; the label floors are reused


def test_probe_numbers_do_not_depend_on_jobs(digits, small_teacher):
    one = leakage.measure(_cfg(1), digits, {"t": small_teacher}, {"t": ["kd"]}, seeds=[0, 1], out=None, log=lambda m: None)
    two = leakage.measure(_cfg(2), digits, {"t": small_teacher}, {"t": ["kd"]}, seeds=[0, 1], out=None, log=lambda m: None)
    assert one["accuracy"] == two["accuracy"] and len(one["accuracy"]) == 12
