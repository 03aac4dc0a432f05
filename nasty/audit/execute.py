"""Audit stage 2, the execution: train the planned runs that are not finished yet, saving each as it ends.

A run's folder (``runs/GROUP/ATTACK/STUDENT/seed-K``) holds its ``result.json`` (with the run's key) and
its test predictions; a run whose folder holds its key is reused, never retrained, so an interrupted
audit resumes where it stopped. The runs are grouped into *units*: the single-pass attacks of one seed
train together in one pass over the data (:func:`nasty.attacks.run_attacks_together`), the rest alone.
An executor trains the units: :class:`LocalExecutor` here, in this process, one after the other.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import safe_io
from ..attacks import can_share_pass, prepare_attack, run_attacks_together
from ..checkpoint import atomic_write_bytes, atomic_write_json
from ..config import train_config
from ..defenses.output import DefendedModel
from ..errors import AuditIncomplete, NastyError, TrainingDiverged
from ..frozen import TeacherOutputCache
from ..metrics import predict_logits, quality_of_probabilities
from ..train import seed_everything
from .plan import AuditPlan, Job


@dataclass
class Execution:
    """What the execution stage hands to the analysis: every finished run and every problem."""

    runs: dict[tuple[str, str, str, int], dict] = field(default_factory=dict)
    skipped_students: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)  # attack refused a student
    failed: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"trained": 0, "reused": 0, "label_only_reused": 0})
    seconds: float = 0.0


def save_npy(path: Path, arr: np.ndarray) -> None:
    atomic_write_bytes(path, safe_io.npy_bytes(arr))


def load_run(run_dir: Path, key: str) -> dict | None:
    """The finished run in ``run_dir`` if its key matches, else ``None``."""
    f = run_dir / "result.json"
    if not f.is_file() or not (run_dir / "test_pred.npy").is_file():
        return None
    try:
        res = json.loads(f.read_text())
        pred = np.load(run_dir / "test_pred.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if not isinstance(res, dict) or res.get("audit_run_key") != key:
        return None
    res["_pred"] = pred
    if res.get("floor_variants"):  # a tuned floor: each candidate's test predictions, a floor of its own
        try:
            res["_variant_preds"] = {n: np.load(run_dir / f"test_pred-variant{i}.npy", allow_pickle=False)
                                     for i, n in enumerate(res["floor_variants"])}
        except (OSError, ValueError):
            return None
    if (run_dir / "val_pred.npy").is_file():
        try:
            res["_val_pred"] = np.load(run_dir / "val_pred.npy", allow_pickle=False)
        except (OSError, ValueError):
            pass
    return res


class Runner:
    """Trains runs of one plan into ``out`` and records them in an :class:`Execution`."""

    def __init__(self, plan: AuditPlan, out: Path, ex: Execution, log: Callable[[str], None], verbose: bool = False):
        self.plan, self.out, self.ex, self.log = plan, out, ex, log
        self.quiet = log if verbose else (lambda m: None)
        self.cache = TeacherOutputCache()

    def prepare(self, job: Job):
        """The prepared run, or None when the attack refuses this student (noted)."""
        p, s = self.plan, self.plan.s
        tc = train_config(s.cfg, seed=job.seed)
        teachers = [] if job.group == "baselines" else [p.targets[job.group]]
        label_free = not p.labels_of.get(job.method, True)
        queries: dict[str, Any] = {"x_queries": p.x_sur, "x_val_queries": p.x_sur_val, "data_source": f"{s.surrogate} (surrogate, unlabelled)"} \
            if label_free and p.x_sur is not None else {}
        if label_free and s.queries:
            queries["query_budget"] = s.queries
        if s.labelled is not None:  # the thief's regime: every run holds the same labelled images and queries
            queries = {"labelled": s.labelled, "query_budget": s.queries}
        try:
            return prepare_attack(job.method, data=p.data, teachers=teachers, student=job.student, train=tc,
                                  params=p.params[job.method], query=s.query, labels=p.labels_of.get(job.method, True),
                                  out_dir=job.dir(self.out), log=self.quiet, teacher_cache=self.cache,
                                  output_defense=p.post if job.group == "teacher" else None, **queries)
        except NastyError as e:
            self.refused(job, e)
            return None

    def refused(self, job: Job, e: NastyError) -> None:
        if job.group == "baselines":
            raise e
        why = str(e).splitlines()[0]
        self.ex.skipped_students.setdefault((job.group, job.method), {})[job.student] = why
        self.log(f"[audit] skipping {job.method} vs {job.group} with student {job.student}: {why}")

    def failure(self, job: Job, e: BaseException) -> None:
        gk = (job.group, job.method)
        if isinstance(e, TrainingDiverged):
            if job.group == "baselines":
                raise AuditIncomplete(f"baseline {job.label()} diverged: {e}") from None
            self.ex.failed.setdefault(gk, []).append(f"seed {job.seed}, {job.student}: {str(e).splitlines()[0]}")
            self.log(f"[audit] {job.label()} FAILED: {e}")
        elif isinstance(e, NastyError):
            self.refused(job, e)
        else:  # a bug in one attack must not lose the others' results
            if os.environ.get("NASTY_DEBUG") or job.group == "baselines":
                raise e
            self.ex.failed.setdefault(gk, []).append(f"seed {job.seed}, {job.student}: internal error {type(e).__name__}: {e}")
            self.log(f"[audit] {job.label()} FAILED: internal error {type(e).__name__}: {e}")

    def persist(self, job: Job, key: str, model, res: dict, variants: dict | None = None) -> None:
        d, data = job.dir(self.out), self.plan.data
        pred = predict_logits(model, data.x_test).argmax(1).numpy().astype(np.int16)
        variant_preds = {name: p.numpy().astype(np.int16) for name, p in (variants or {}).items()}
        for i, p in enumerate(variant_preds.values()):  # in the order of res["floor_variants"]
            save_npy(d / f"test_pred-variant{i}.npy", p)
        res.pop("confusion_matrix", None)
        res["audit_run_key"] = key
        res["group"] = job.group
        val_pred = None
        if job.group == "baselines" and job.method == "scratch":  # TLLM's preliminary label-only run reads these
            val_pred = predict_logits(model, data.x_val).argmax(1).numpy().astype(np.int16)
            save_npy(d / "val_pred.npy", val_pred)
        save_npy(d / "test_pred.npy", pred)
        atomic_write_json(d / "result.json", res)
        res["_pred"] = pred
        if variant_preds:
            res["_variant_preds"] = variant_preds
        if val_pred is not None:
            res["_val_pred"] = val_pred
        self.ex.runs[(job.group, job.method, job.student, job.seed)] = res
        self.ex.counts["trained"] += 1
        together = f" (trained in one pass with {res['trained_with'] - 1} others)" if res.get("trained_with", 1) > 1 else ""
        self.log(f"[audit] {job.label()}: test accuracy {res['accuracy']:.2f}%{together}")

    def run_alone(self, job: Job, key: str) -> None:
        prep = self.prepare(job)
        if prep is None:
            return
        base = self.ex.runs.get(("baselines", "scratch", job.student, job.seed))
        if job.method == "tllm" and self.plan.s.reuse_label_only and base is not None and "_val_pred" in base:
            prep.ctx.info["label_only_val_pred"] = base["_val_pred"]  # the same run: not trained twice
        seed_everything(job.seed, self.plan.tcfg.deterministic)  # the student's initialisation depends on the seed only
        try:
            t0 = time.perf_counter()
            model, extra = prep.attack.train(prep.ctx)
            model, res = prep.finish(model, extra, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001  (sorted out by failure)
            self.failure(job, e)
            return
        if (res.get("identification") or {}).get("label_only_run"):
            self.ex.counts["label_only_reused"] += 1
        self.persist(job, key, model, res, prep.variants)

    def run_unit(self, unit: list[tuple[Job, str]]) -> None:
        """Train one unit: single-pass runs of one seed in one shared pass (grouped by their training
        images), or one multi-stage run alone. A student an attack refused earlier is not tried again."""
        unit = [(j, k) for j, k in unit if j.student not in self.ex.skipped_students.get((j.group, j.method), {})]
        if not unit:
            return
        if len(unit) == 1 and not (self.plan.s.fuse and can_share_pass(unit[0][0].method, self.plan.params[unit[0][0].method])):
            self.run_alone(*unit[0])
            return
        groups: dict[int, list] = {}
        for job, key in unit:
            prep = self.prepare(job)
            if prep is not None:
                groups.setdefault(id(prep.ctx.train_split()[0]), []).append((job, key, prep))
        for members in groups.values():
            if len(members) == 1:
                self.run_alone(*members[0][:2])
                continue
            try:
                outs = run_attacks_together([p for _, _, p in members], log=self.quiet)
            except Exception as e:  # noqa: BLE001  (one attack's bug: retry them one by one, so it costs only itself)
                self.log(f"[audit] a shared pass of {len(members)} runs failed ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); running them one at a time")
                for job, key, _ in members:
                    self.run_alone(job, key)
                continue
            for (job, key, _), o in zip(members, outs):
                if isinstance(o, Exception):
                    self.failure(job, o)
                else:
                    self.persist(job, key, *o)


class LocalExecutor:
    """Trains the units one after the other in this process (sharing the teacher's cached outputs)."""

    name = "local"

    def run(self, runner: Runner, units: list[list[tuple[Job, str]]]) -> None:
        for unit in units:
            runner.run_unit(unit)


def pending_units(plan: AuditPlan, out: Path, ex: Execution) -> tuple[list[list[tuple[Job, str]]], list[tuple[Job, str]]]:
    """Reuse what is finished (here or in ``--baselines-from``); return the units still to train, in
    order (per seed: the shared pass, then the multi-stage runs), and the twin-reference runs."""
    s = plan.s
    pending: list[tuple[Job, str]] = []
    twins: list[tuple[Job, str]] = []
    for job in plan.jobs:
        if (job.group, job.method) in plan.skipped:
            continue
        key = plan.run_key(job)
        res = load_run(job.dir(out), key)
        for other in s.baselines_from if res is None and job.group == "baselines" else []:
            src = job.dir(Path(other))
            if load_run(src, key) is not None:  # the same baseline (same data, schedule, seed): copy it in
                safe_io.copy_tree(src, job.dir(out))
                res = load_run(job.dir(out), key)
                break
        if res is not None:
            ex.runs[(job.group, job.method, job.student, job.seed)] = res
            ex.counts["reused"] += 1
        elif job.group == "reference" and plan.twin_reference:
            twins.append((job, key))  # the same checkpoint as the teacher, attacked the same way: copied afterwards
        else:
            pending.append((job, key))
    units: list[list[tuple[Job, str]]] = []
    for seed in s.seed_list:
        shared = [(j, k) for j, k in pending if j.seed == seed and s.fuse and can_share_pass(j.method, plan.params[j.method])]
        if s.labelled is not None:  # the thief's regime: baselines see its labelled images, attacks all its images (two passes)
            units += [u for u in ([x for x in shared if x[0].group == "baselines"], [x for x in shared if x[0].group != "baselines"]) if u]
        elif shared:
            units.append(shared)
        units += [[(j, k)] for j, k in pending if j.seed == seed and not (s.fuse and can_share_pass(j.method, plan.params[j.method]))]
    return units, twins


def copy_twins(plan: AuditPlan, out: Path, ex: Execution, twins: list[tuple[Job, str]]) -> None:
    """A reference that is the teacher's very checkpoint gets the teacher's runs (copied, not retrained)."""
    for job, key in twins:
        src = ex.runs.get(("teacher", job.method, job.student, job.seed))
        for kind in (ex.skipped_students, ex.failed):
            if ("teacher", job.method) in kind:
                kind[("reference", job.method)] = kind[("teacher", job.method)]
        if src is None:
            continue
        safe_io.copy_tree(Job("teacher", job.method, job.student, job.seed).dir(out), job.dir(out))
        res = {k: v for k, v in src.items() if not k.startswith("_")}
        res.update(audit_run_key=key, group="reference", copied_from="teacher (the same checkpoint)")
        atomic_write_json(job.dir(out) / "result.json", res)
        ex.runs[(job.group, job.method, job.student, job.seed)] = {**src, **res}
        ex.counts["reused"] += 1


def execute(plan: AuditPlan, out: Path, log: Callable[[str], None], verbose: bool = False, executor: Any = None) -> tuple[Execution, dict]:
    """Train every pending run of ``plan`` into ``out``; return the execution and the runtime facts."""
    ex = Execution()
    runner = Runner(plan, out, ex, log, verbose)
    forwarded = {g: 0 for g in plan.targets}  # every sample a teacher processes, inside the cache or not

    def counter(g: str):
        def hook(module, inputs):
            forwarded[g] += len(inputs[0])
        return hook

    hooks = [m.register_forward_pre_hook(counter(g)) for g, m in plan.targets.items()]
    t_start = time.perf_counter()
    units, twins = pending_units(plan, out, ex)
    (executor or LocalExecutor()).run(runner, units)
    copy_twins(plan, out, ex, twins)
    ex.seconds = time.perf_counter() - t_start
    deployed = dict(plan.targets)
    if plan.post is not None:  # the teacher's answers as deployed: argmax of the defended probabilities
        deployed["teacher"] = DefendedModel(plan.targets["teacher"], plan.post)
    test_out = {g: runner.cache.test_logits(m, plan.data.x_test) for g, m in deployed.items()}
    teacher_pred = {g: z.argmax(1).numpy() for g, z in test_out.items()}
    quality = {g: quality_of_probabilities(torch.softmax(z.to(torch.float64), 1), plan.data.y_test) for g, z in test_out.items()}
    for h in hooks:
        h.remove()
    runtime = {"seconds": ex.seconds, "runs_trained": ex.counts["trained"], "runs_reused": ex.counts["reused"],
               "teacher_samples_run": sum(forwarded.values()), "teacher_samples_cached": runner.cache.samples_run,
               "teacher_cache_hits": runner.cache.hits, "label_only_runs_reused": ex.counts["label_only_reused"]}
    extra = getattr(executor, "runtime_facts", None)
    if callable(extra):  # an executor training in other processes adds their teacher counts and names itself
        for k, v in extra().items():
            runtime[k] = runtime[k] + v if isinstance(runtime.get(k), int) and isinstance(v, int) else v
    return ex, {"teacher_pred": teacher_pred, "quality": quality, "runtime": runtime}
