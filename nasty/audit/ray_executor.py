"""``nasty audit --executor ray``: the audit's units as Ray tasks, on this machine or on a cluster.

Every unit of :func:`nasty.audit.execute.pending_units` (per seed: one shared pass of the single-pass
attacks and the two baselines; then one unit per multi-stage run) becomes one Ray task. The task, in
its worker process:

- rebuilds the plan with :func:`nasty.audit.plan.plan_audit` from the same :class:`AuditSettings`
  (cached per worker process), checks that it sees the same teacher(s) and data as the driver and
  keys every run of its unit the same way;
- loads the finished baseline runs of its seed from the run folders (TLLM reuses the scratch baseline's
  validation predictions), trains its unit with a :class:`nasty.audit.execute.Runner`, which saves every
  finished run into its run folder as it ends, exactly as the local executor does;
- returns plain JSON-able facts only (students an attack refused, failures, counts, log lines), never a
  model or a tensor.

The runs travel through the run folders: the driver reads each finished run back with
:func:`nasty.audit.execute.load_run`. An interrupted Ray audit therefore resumes like a local one, and
on a cluster the audit folder must be on a filesystem every node sees. The units of a seed that do not
hold baselines wait for that seed's baseline unit (a Ray dependency), so the two waves (baselines first,
then the rest) overlap across seeds.

Ray is an optional extra (``pip install 'nasty[ray]'``); this module imports it only when used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ..errors import AuditIncomplete, NastyError, TrainingDiverged
from ..frozen import TeacherOutputCache
from .execute import Execution, Runner, load_run
from .plan import AuditPlan, AuditSettings, Job, plan_audit

INSTALL_HINT = "pip install 'nasty[ray]'"
CONNECT_TIMEOUT_S = 5.0  # an --address that does not answer within this is refused (Ray itself would retry for minutes)
ENV_PASSED = ("NASTY_DATA_ROOT", "NASTY_DEBUG", "NASTY_DDP_BACKEND")  # what a worker must see as the driver does


def import_ray():
    """The ``ray`` module, or a one-line :class:`NastyError` saying how to install it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats banner
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # no C++ warnings on stderr while Ray retries a connection
    try:
        import ray
    except ImportError:
        raise NastyError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse an ``--address`` that nothing answers at (TCP), in one line, before Ray tries for minutes."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NastyError(f"--address {address!r} is not HOST:PORT (e.g. head-node:6379), 'auto' or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise NastyError(f"--address {address}: no Ray cluster reachable there ({e.strerror or type(e).__name__}); "
                         "start one with `ray start --head` or drop --address to run on this machine") from None


class RayExecutor:
    """Trains the audit's units as Ray tasks; see the module's docstring.

    ``address``: an existing cluster (``ray.init(address=...)``); ``None`` starts a local Ray instance with
    ``num_cpus`` CPUs (default: every CPU of the machine). A Ray already initialised in this process (by
    the caller) is used as it is and left running; one started here is shut down when the run ends.
    """

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_task: int = 1, gpus_per_task: float = 0.0,
                 num_cpus: int | None = None):
        if isinstance(cpus_per_task, bool) or not isinstance(cpus_per_task, int) or cpus_per_task < 1:
            raise NastyError(f"--cpus-per-task must be an integer >= 1, got {cpus_per_task!r}")
        if not isinstance(gpus_per_task, (int, float)) or not math.isfinite(gpus_per_task) or gpus_per_task < 0:
            raise NastyError(f"--gpus-per-task must be a finite number >= 0, got {gpus_per_task!r}")
        self.ray = import_ray()
        if address is not None:
            check_address(address)
        self.address, self.cpus_per_task, self.gpus_per_task = address, cpus_per_task, float(gpus_per_task)
        self.num_cpus = num_cpus
        self._teacher = {"teacher_samples_run": 0, "teacher_samples_cached": 0, "teacher_cache_hits": 0}
        self._tasks = 0

    # ------------------------------------------------------------------ the driver

    def _connect(self) -> bool:
        """Start or join Ray; True when this call started it (and so must shut it down)."""
        ray = self.ray
        if ray.is_initialized():
            return False
        kw: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.ERROR, include_dashboard=False)
        if self.address is None:  # "local": a new instance here, even where RAY_ADDRESS names a cluster
            kw.update(address="local", num_cpus=self.num_cpus or os.cpu_count() or 1)
        else:
            kw["address"] = self.address
        try:
            with _stderr_to_devnull():  # Ray's C++ client warns on fd 2 while it retries; its daemons inherit the quiet fd
                ray.init(**kw)
        except Exception as e:  # noqa: BLE001  (ConnectionError, RuntimeError, ValueError: all one line)
            where = f"at {self.address}" if self.address else "on this machine"
            hint = "" if self.address is None or os.environ.get("RAY_AUTH_MODE") else \
                " (a cluster with token authentication needs RAY_AUTH_MODE=token and its token; see docs/distributed.md)"
            raise NastyError(f"could not start or join Ray {where}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}{hint}") from None
        return True

    def runtime_facts(self) -> dict:
        """Added to audit.json's ``runtime`` by :func:`nasty.audit.execute.execute`: the teacher samples the
        workers processed (each worker has its own output cache) and how the runs were executed."""
        return {**self._teacher, "executor": "ray", "ray_tasks": self._tasks, "cpus_per_task": self.cpus_per_task,
                "gpus_per_task": self.gpus_per_task}

    def run(self, runner: Runner, units: list[list[tuple[Job, str]]]) -> None:
        if not units:
            return  # everything is finished: no need to start Ray
        started = self._connect()
        try:
            self._run(runner, units)
        finally:
            if started:
                self.ray.shutdown()

    def _run(self, runner: Runner, units: list[list[tuple[Job, str]]]) -> None:
        ray = self.ray
        plan, out, ex, log = runner.plan, Path(runner.out).resolve(), runner.ex, runner.log
        ctx = {"cwd": os.getcwd(), "env": {k: os.environ[k] for k in ENV_PASSED if k in os.environ},
               "threads": self.cpus_per_task, "verbose": runner.quiet is runner.log,
               "expect": {k: plan.config[k] for k in ("teacher_sha256", "reference_sha256", "data_sha256")}}
        task = ray.remote(_run_unit_task).options(num_cpus=self.cpus_per_task, num_gpus=self.gpus_per_task,
                                                   name="nasty-audit-unit")
        settings_ref = ray.put(plan.s)
        # wave 1: the units that hold baselines; wave 2: the rest, each waiting for its seed's baselines
        holds_baseline = [any(j.group == "baselines" for j, _ in u) for u in units]
        refs: list = [None] * len(units)
        deps: dict[int, list] = {}
        for i, u in enumerate(units):
            if holds_baseline[i]:
                refs[i] = task.remote(settings_ref, str(out), u, ctx)
                deps.setdefault(u[0][0].seed, []).append(refs[i])
        for i, u in enumerate(units):
            if not holds_baseline[i]:
                refs[i] = task.remote(settings_ref, str(out), u, ctx, *deps.get(u[0][0].seed, []))
        self._tasks += len(units)
        log(f"[audit] {len(units)} units as Ray tasks ({self.cpus_per_task} CPU"
            f"{f', {self.gpus_per_task:g} GPU' if self.gpus_per_task else ''} each; "
            f"cluster: {int(ray.cluster_resources().get('CPU', 0))} CPUs)")
        results: list[dict | None] = [None] * len(units)
        index = {r: i for i, r in enumerate(refs)}
        waiting = list(refs)
        try:
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                i = index[done[0]]
                try:
                    res = ray.get(done[0])
                except ray.exceptions.RayError as e:  # the worker died (killed, out of memory) or could not run the task
                    cause = getattr(e, "cause", None) or e  # e.g. nasty not installed on that node
                    raise AuditIncomplete(f"a Ray task ({_describe(units[i])}) failed: {type(cause).__name__}: "
                                          f"{str(cause).splitlines()[0] if str(cause) else ''}; finished runs are saved, "
                                          "re-run to resume") from None
                results[i] = res
                for line in res.get("log", []):
                    log(line)
                if res.get("error"):
                    raise _rebuild_error(res["error"], res.get("host", "?"))
        finally:
            for r in waiting:  # an error stops the rest, as it stops the local executor
                try:
                    ray.cancel(r, force=True)
                except Exception:  # noqa: BLE001  (already finished or gone: nothing to stop)
                    pass
        for u, res in zip(units, results):  # merge in the units' order: the same order as the local executor
            self._merge(plan, out, ex, u, res)

    def _merge(self, plan: AuditPlan, out: Path, ex: Execution, unit: list[tuple[Job, str]], res: dict) -> None:
        if res.get("cancelled"):
            return
        for g, m, st, why in res["skipped_students"]:
            ex.skipped_students.setdefault((g, m), {})[st] = why
        for g, m, why in res["failed"]:
            ex.failed.setdefault((g, m), []).append(why)
        for k in ("trained", "label_only_reused"):
            ex.counts[k] += int(res["counts"].get(k, 0))
        for k in self._teacher:
            self._teacher[k] += int(res["teacher"].get(k, 0))
        trained = {tuple(t) for t in res["trained"]}
        for job, key in unit:
            run = load_run(job.dir(out), key)
            jk = (job.group, job.method, job.student, job.seed)
            if run is not None:
                ex.runs[jk] = run
            elif jk in trained:
                raise AuditIncomplete(f"{job.label()} was trained on Ray host {res.get('host', '?')} but its run is not "
                                      f"in {job.dir(out)}: the audit folder must be on a filesystem every node sees")


@contextlib.contextmanager
def _stderr_to_devnull():
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _describe(unit: list[tuple[Job, str]]) -> str:
    j = unit[0][0]
    return f"{len(unit)} runs of seed {j.seed} in one pass" if len(unit) > 1 else j.label()


def _rebuild_error(err: dict, host: str) -> Exception:
    """The worker's error, raised in the driver as the local executor would have raised it."""
    cls = {"NastyError": NastyError, "TrainingDiverged": TrainingDiverged, "AuditIncomplete": AuditIncomplete}.get(err["type"])
    if cls is not None:
        return cls(err["message"])
    return RuntimeError(f"{err['type']} in a Ray worker on {host}: {err['message']}" +
                        (f"\n{err['traceback']}" if err.get("traceback") else ""))


# ---------------------------------------------------------------------- the worker

_PLANS: dict[str, tuple[AuditPlan, TeacherOutputCache]] = {}


def _plan_for(s: AuditSettings) -> tuple[AuditPlan, TeacherOutputCache]:
    """The plan of these settings and a cache of its teachers' outputs, built once per worker process
    (data and teachers loaded once; the tasks of one worker share the cache as the local executor's units do)."""
    key = json.dumps([dataclasses.asdict(s), os.getcwd(), {k: os.environ.get(k) for k in ENV_PASSED}],
                     sort_keys=True, default=str)
    if key not in _PLANS:
        _PLANS.clear()  # one audit at a time per worker: do not keep an old audit's data in memory
        _PLANS[key] = (plan_audit(s, log=lambda m: None), TeacherOutputCache())
    return _PLANS[key]


def _run_unit_task(s: AuditSettings, out: str, unit: list[tuple[Job, str]], ctx: dict, *deps: dict) -> dict:
    """One unit in a Ray worker; returns JSON-able facts (the runs themselves are in their run folders)."""
    host = socket.gethostname()
    lines: list[str] = []
    if any(d.get("error") for d in deps):  # its seed's baselines failed: the driver is stopping the audit
        return {"cancelled": True, "log": [], "host": host}
    import torch

    for k, v in ctx["env"].items():
        os.environ[k] = v
    if os.path.isdir(ctx["cwd"]):  # relative paths (teacher, data) as the driver sees them
        os.chdir(ctx["cwd"])
    torch.set_num_threads(ctx["threads"])
    outp = Path(out)
    t0 = time.perf_counter()
    hooks: list = []
    try:
        plan, cache = _plan_for(s)
        cached0, hits0 = cache.samples_run, cache.hits
        for k, v in ctx["expect"].items():
            if plan.config[k] != v:
                raise NastyError(f"the Ray worker on {host} sees another {k.replace('_sha256', '')} than the driver "
                                 f"(SHA-256 {str(plan.config[k])[:12]}..., driver {str(v)[:12]}...): every node must see the same files")
        for job, key in unit:
            if plan.run_key(job) != key:
                raise NastyError(f"the Ray worker on {host} keys {job.label()} differently from the driver "
                                 "(another nasty version or other inputs on that node?)")
        ex = Execution()
        for seed in sorted({j.seed for j, _ in unit}):
            for job in plan.jobs:  # what the unit depends on: its seed's finished baselines (TLLM reads them)
                if job.group == "baselines" and job.seed == seed:
                    res = load_run(job.dir(outp), plan.run_key(job))
                    if res is not None:
                        ex.runs[(job.group, job.method, job.student, job.seed)] = res
        before = set(ex.runs)
        forwarded = [0]
        hooks = [m.register_forward_pre_hook(lambda mod, inp: forwarded.__setitem__(0, forwarded[0] + len(inp[0])))
                 for m in plan.targets.values()]
        runner = Runner(plan, outp, ex, lines.append, ctx["verbose"])
        runner.cache = cache
        runner.run_unit(unit)
    except Exception as e:  # noqa: BLE001  (sent back as facts; the driver raises it as the local executor would)
        err = {"type": type(e).__name__, "message": str(e)}
        if not isinstance(e, NastyError):
            err["traceback"] = traceback.format_exc() if os.environ.get("NASTY_DEBUG") else ""
        return {"error": err, "log": lines, "host": host}
    finally:
        for h in hooks:
            h.remove()
    return {
        "trained": [list(k) for k in ex.runs if k not in before],
        "skipped_students": [[g, m, st, why] for (g, m), per in ex.skipped_students.items() for st, why in per.items()],
        "failed": [[g, m, why] for (g, m), whys in ex.failed.items() for why in whys],
        "counts": {k: int(v) for k, v in ex.counts.items()},
        "teacher": {"teacher_samples_run": forwarded[0], "teacher_samples_cached": cache.samples_run - cached0,
                    "teacher_cache_hits": cache.hits - hits0},
        "log": lines, "host": host, "pid": os.getpid(), "seconds": time.perf_counter() - t0,
    }
