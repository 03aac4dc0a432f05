"""`nasty audit --executor ray`: the same audit.json numbers as the local executor, resume through the run
folders, plain facts from the workers, and one-line refusals (no Ray, unreachable cluster, Ray options
without --executor ray). Ray starts once in this module (inside the CLI, which shuts it down again)."""

import builtins
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import save_trained_teacher

TINY = ["--attacks", "kd,tllm", "--seeds", "2", "--epochs", "2", "--students", "mlp:hidden=16", "--batch-size", "128"]
VOLATILE = {"runtime", "created", "versions"}  # wall times, the date, library versions


@pytest.fixture(scope="module")
def teacher_ckpt(digits, tmp_path_factory):
    """A small digits teacher saved as a checkpoint."""
    return save_trained_teacher(digits, tmp_path_factory.mktemp("teacher"), "mlp:hidden=64", 4)


def _numbers(audit: dict):
    """The audit without what may differ between executors: timings (every ``*seconds`` field), date, versions."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not k.endswith("seconds")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip({k: v for k, v in audit.items() if k not in VOLATILE})


def _ray_children() -> list[str]:
    """Names of the processes this test process started that are still alive (Ray's gcs_server, raylet, workers)."""
    me, names = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            if fields[1].split()[1] == me and fields[1].split()[0] != "Z":
                names.append(fields[0].split("(", 1)[1])
        except (OSError, IndexError):
            continue
    return names


def test_ray_audit_equals_local_and_resumes(run_cli, teacher_ckpt, tmp_path):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    local, remote = tmp_path / "local", tmp_path / "ray"
    rc, _, err = run_cli("audit", teacher_ckpt, *TINY, "--out", local)
    assert rc == 0, err
    rc, _, err = run_cli("audit", teacher_ckpt, *TINY, "--out", remote, "--executor", "ray")
    assert rc == 0, err
    a, b = (json.loads((d / "audit.json").read_text()) for d in (local, remote))
    assert a["runtime"]["runs_trained"] == b["runtime"]["runs_trained"] == 8  # 2 seeds x (2 baselines + kd + tllm)
    assert b["runtime"]["executor"] == "ray" and b["runtime"]["ray_tasks"] == 4  # per seed: one shared pass, tllm alone
    assert b["runtime"]["label_only_runs_reused"] == a["runtime"]["label_only_runs_reused"] == 2  # tllm read the baseline from disk
    assert b["status"] == "complete"
    assert _numbers(a) == _numbers(b)  # decisions, per-class accuracies, gains, intervals: identical
    assert b["targets"]["teacher"]["attacks"]["kd"]["students"]  # (and not trivially: the per-student numbers are there)
    for d in (remote / "runs").glob("*/*/*/seed-*"):  # every run persisted by a worker, with its key
        assert (d / "result.json").is_file() and (d / "test_pred.npy").is_file()
    # Ray was started by the command and shut down by it: nothing left behind
    assert not ray.is_initialized()
    assert not [n for n in _ray_children() if n.startswith(("raylet", "gcs_server", "ray::"))], _ray_children()
    # resume: the same command on the same folder trains nothing (and needs no Ray)
    rc, _, err = run_cli("audit", teacher_ckpt, *TINY, "--out", remote, "--executor", "ray")
    assert rc == 0, err
    c = json.loads((remote / "audit.json").read_text())
    assert c["runtime"]["runs_trained"] == 0 and c["runtime"]["runs_reused"] == 8
    assert _numbers(c) == _numbers(b)


def test_worker_returns_plain_facts(teacher_ckpt, tmp_path):
    """The task body, called in this process: it trains its unit into the run folders and returns JSON-able facts."""
    from nasty.audit.execute import Execution, load_run, pending_units
    from nasty.audit.plan import AuditSettings, open_folder, plan_audit
    from nasty.audit.ray_executor import _run_unit_task
    from nasty.config import load_config

    cfg = load_config(None, {"data": {"dataset": "digits"}, "train": {"epochs": 1, "batch_size": 128}})
    s = AuditSettings(teacher=str(teacher_ckpt), cfg=cfg, attacks=["kd", "tllm"], students=["mlp:hidden=16"], seeds=1)
    plan = plan_audit(s, log=lambda m: None)
    open_folder(plan, tmp_path, False)
    units, _ = pending_units(plan, tmp_path, Execution())
    assert [len(u) for u in units] == [3, 1]  # scratch + label-smoothing + kd in one pass; tllm alone
    ctx = {"cwd": os.getcwd(), "env": {}, "threads": 1, "verbose": False,
           "expect": {k: plan.config[k] for k in ("teacher_sha256", "reference_sha256", "data_sha256")}}
    facts = [_run_unit_task(s, str(tmp_path), u, ctx) for u in units]
    json.dumps(facts)  # plain facts only: no model, no tensor, no array
    assert [f["counts"]["trained"] for f in facts] == [3, 1]
    assert facts[1]["counts"]["label_only_reused"] == 1  # tllm found the scratch baseline on disk
    for u in units:
        for job, key in u:
            assert load_run(job.dir(tmp_path), key) is not None
    ctx["expect"] = {**ctx["expect"], "data_sha256": "0" * 64}  # a node that sees other data is refused
    f = _run_unit_task(s, str(tmp_path), units[1], ctx)
    assert f["error"]["type"] == "NastyError" and "sees another data" in f["error"]["message"]


def test_without_ray_one_line(run_cli, teacher_ckpt, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *a, **k)

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    rc, out, err = run_cli("audit", teacher_ckpt, *TINY, "--out", tmp_path / "a", "--executor", "ray")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "pip install 'nasty[ray]'" in err, err
    assert not (tmp_path / "a").exists()  # refused before anything was loaded or trained


@pytest.mark.parametrize("extra, message", [
    (["--address", "127.0.0.1:1", "--executor", "ray"], "no Ray cluster reachable"),  # nothing listens on port 1
    (["--address", "nonsense", "--executor", "ray"], "is not HOST:PORT"),
    (["--address", "127.0.0.1:6379"], "--address applies to --executor ray only"),
    (["--cpus-per-task", "2"], "--cpus-per-task applies to --executor ray only"),
    (["--gpus-per-task", "0.5", "--executor", "local"], "--gpus-per-task applies to --executor ray only"),
    (["--gpus-per-task", "nan", "--executor", "ray"], "not a finite number"),
    (["--gpus-per-task", "inf", "--executor", "ray"], "not a finite number"),
    (["--gpus-per-task", "-1", "--executor", "ray"], "--gpus-per-task"),
    (["--cpus-per-task", "0", "--executor", "ray"], "--cpus-per-task"),
    (["--executor", "spark"], "--executor"),
])
def test_bad_ray_options_one_line(run_cli, teacher_ckpt, tmp_path, extra, message):
    if "--address" in extra and "ray" in extra:
        pytest.importorskip("ray")  # the address is checked after the check that Ray is installed
    rc, out, err = run_cli("audit", teacher_ckpt, *TINY, "--out", tmp_path / "a", *extra)
    assert rc == 2 and out == "", err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "a").exists()


def test_worker_error_is_one_line(run_cli, teacher_ckpt, tmp_path):
    """An attack registered in the driver's process only is unknown to the workers: the worker's error comes
    back as the same one-line error (exit 2), the remaining tasks are cancelled and Ray is shut down."""
    ray = pytest.importorskip("ray")
    from nasty.attacks import ATTACKS, register_attack
    from nasty.attacks.kd import KD

    class DriverOnly(KD):
        name = "test-driver-only"
        summary = "KD, registered in the test process only"

    register_attack(DriverOnly)
    try:
        rc, out, err = run_cli("audit", teacher_ckpt, *TINY[2:], "--attacks", "kd,test-driver-only", "--out", tmp_path / "a",
                               "--executor", "ray")
    finally:
        ATTACKS.pop(DriverOnly.name, None)
    lines = [ln for ln in err.splitlines() if not ln.startswith("[audit]")]
    assert rc == 2 and out == "" and len(lines) == 1 and "test-driver-only" in lines[0], err
    assert not ray.is_initialized()
