"""Running an audit: every chosen attack x student x seed against the teacher (and a reference),
baselines trained once and shared, teacher outputs computed once, runs persisted as they finish.

Layout of ``--out``::

    audit-config.json                 what the runs depend on (checked when resuming)
    runs/baselines/<method>/<student>/seed-<k>/result.json, test_pred.npy
    runs/<target>/<attack>/<student>/seed-<k>/result.json, test_pred.npy, metrics.jsonl
    audit.json, audit.md, audit.html  the report (``nasty.audit.schema`` documents audit.json)

``result.json`` is written last and atomically, so a folder holding it is a complete run; an
interrupted audit re-run with the same ``--out`` reuses those and trains only what is missing.
Per-sample test predictions are ``.npy`` arrays (``numpy.load(allow_pickle=False)``), never pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import AuditIncomplete, NastyError, TrainingDiverged
from . import stats
from .schema import SCHEMA, SCHEMA_VERSION

CONFIG_FILE = "audit-config.json"
# identifies how runs are keyed and stored (not the report's schema version: a new report format
# must not retrain a single run)
RUN_FORMAT = "nasty-audit/1"


def slug(spec: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9.]+", "-", spec).strip("-") or "x"


@dataclass
class AuditSettings:
    """What the user asked for (the CLI builds this)."""

    teacher: str
    cfg: dict  # resolved nasty config (its [data] and [train] sections are used)
    attacks: list[str] = field(default_factory=lambda: ["all"])
    students: list[str] = field(default_factory=lambda: ["mlp"])
    seeds: int = stats.DEFAULT_SEEDS
    reference: str | None = None
    query: str = "logits"
    margin: float = 0.0
    fidelity: float = 0.9
    fail_on: int | None = None
    n_boot: int | None = None  # unused since schema 2 (the intervals are analytic); kept so old callers still work
    correction: str = "holm"  # multiple-comparison control across the classes and students of one attack
    power: float = 0.8  # the power at which the detectable gain of a class that is not transferred is reported
    safe_below: float | None = None  # a class is "safe at this power" when its detectable gain is below this (points)
    params: dict[str, dict] = field(default_factory=dict)  # attack -> parameter overrides
    surrogate: str | None = None  # label-free attacks query the teacher on this dataset's images
    queries: int | None = None  # query budget of the label-free attacks (a fixed seeded subset of their images)
    output_defense: str | None = None  # the audited teacher answers through this output defense (not the reference)
    fuse: bool = True  # train single-pass attacks of one seed together, in one pass over the data
    first_seed: int = 0  # training seeds first_seed .. first_seed + seeds - 1
    baselines_from: list[str] = field(default_factory=list)  # other audit folders of the same task whose baseline runs are reused
    reuse_label_only: bool = True  # TLLM's preliminary label-only student is the audit's label-only baseline (same run)

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))


# ----------------------------------------------------------------------------------------------
# resolving and validating the request


def resolve_attacks(names: list[str]) -> tuple[list[str], list[str]]:
    """Expand ``all``; validate names; baselines (attacks without a teacher) are dropped with a note."""
    from ..attacks import ATTACKS, get_attack

    if not names:
        raise NastyError("--attacks is empty; give names (see `nasty attacks`) or 'all'")
    out: list[str] = []
    notes: list[str] = []
    for name in names:
        if name == "all":
            picked = [k for k, c in sorted(ATTACKS.items()) if c.needs_teacher]
        else:
            picked = [get_attack(name).name]
        for k in picked:
            if not get_attack(k).needs_teacher:
                notes.append(f"{k} is a baseline, trained for every audit; not listed as an attack")
                continue
            if k not in out:
                out.append(k)
    if not out:
        raise NastyError("no attack left to audit (the baselines scratch and label-smoothing always run)")
    return out, notes


def attack_params(name: str, overrides: dict[str, dict]) -> dict:
    """Defaults of the attack class with the user's overrides, validated by the class."""
    from ..attacks import get_attack

    cls = get_attack(name)
    return dict(cls(**overrides.get(name, {})).p)


def access_problem(name: str, query: str, *, surrogate: bool = False, n_teachers: int = 1) -> str | None:
    """Why the attack cannot run under this threat model (``None`` when it can)."""
    from .. import attacks

    cls = attacks.get_attack(name)
    try:
        attacks.check_requirements(cls, query=query, labels=cls.uses_labels, n_teachers=n_teachers,
                                   unlabelled_queries=surrogate and not cls.uses_labels)
    except NastyError as e:
        return str(e).splitlines()[0]
    return None


def _normalization_of_audit(folder: Path) -> list | None:
    """The input normalisation (its teacher's) under which an audit folder's students were trained."""
    from ..checkpoint import read_sidecar

    try:
        teacher = json.loads((folder / CONFIG_FILE).read_text())["teacher"]
        norm = read_sidecar(teacher)[1]["normalization"]
        return [list(norm["mean"]), list(norm["std"])]
    except (OSError, ValueError, KeyError, TypeError, NastyError):
        return None


def _data_fingerprint(cfg: dict) -> dict:
    return {k: v for k, v in cfg["data"].items() if k not in ("data_root", "download")}


def data_sha256(data) -> str:
    """SHA-256 of the dataset's contents as the audit sees them (every split's images and labels, the
    class names): a file replaced at the same path gives another fingerprint."""
    h = hashlib.sha256()
    h.update(json.dumps([data.name, list(data.classes)]).encode())
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        t = getattr(data, name)
        arr = np.ascontiguousarray(t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t))
        h.update(f"{name}:{arr.dtype}:{arr.shape}".encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# persistence


def _save_npy(path: Path, arr: np.ndarray) -> None:
    from ..checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


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
    if (run_dir / "val_pred.npy").is_file():
        try:
            res["_val_pred"] = np.load(run_dir / "val_pred.npy", allow_pickle=False)
        except (OSError, ValueError):
            pass
    return res


def check_resume(out: Path, config: dict, force: bool) -> None:
    """Refuse to mix runs of a different configuration into ``out`` (unless ``force``: start afresh)."""
    from ..checkpoint import atomic_write_json

    if out.exists() and not out.is_dir():
        raise NastyError(f"--out {out} exists and is not a directory")
    f = out / CONFIG_FILE
    if out.is_dir() and any(out.iterdir()):
        if force:
            shutil.rmtree(out)
        elif not f.is_file():
            raise NastyError(f"--out {out} is not empty and holds no audit ({CONFIG_FILE} missing); choose another --out or pass --force")
        else:
            try:
                old = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                raise NastyError(f"{f} is unreadable ({e}); pass --force to start the audit afresh") from None
            diff = _config_diff(old, config)
            if diff:
                raise NastyError(f"{out} holds an audit with a different configuration ({diff}); "
                                 "use another --out, or pass --force to discard it and start afresh")
            config = {**config, "params": {**old.get("params", {}), **config["params"]}}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NastyError(f"cannot create output directory {out}: {e.strerror}") from None
    atomic_write_json(f, config)


def _config_diff(old: dict, new: dict) -> str | None:
    for k in ("format", "teacher_sha256", "reference_sha256", "data", "data_sha256", "train", "query", "surrogate",
              "output_defense"):
        a, b = old.get(k), new.get(k)
        if k == "data_sha256" and a is None:  # written before audits fingerprinted their data: trust the path
            continue
        if k == "data_sha256" and a != b:
            return (f"the dataset's contents changed (SHA-256 of its arrays was {str(a)[:12]}..., now {str(b)[:12]}...): "
                    "the file at the same path was replaced")
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                sub = next(x for x in [*a, *b] if a.get(x) != b.get(x))
                return f"{k}.{sub}: was {a.get(sub)!r}, now {b.get(sub)!r}"
            return f"{k}: was {str(a)[:70]!r}, now {str(b)[:70]!r}"
    for name, p in new["params"].items():
        if name in old.get("params", {}) and old["params"][name] != p:
            return f"parameters of {name}: were {old['params'][name]}, now {p}"
    return None


# ----------------------------------------------------------------------------------------------
# the audit


@dataclass
class Job:
    group: str  # "baselines", "teacher" or "reference"
    method: str
    student: str
    seed: int

    def dir(self, out: Path) -> Path:
        return out / "runs" / self.group / self.method / slug(self.student) / f"seed-{self.seed}"

    def label(self) -> str:
        return f"{self.method}" + ("" if self.group == "baselines" else f" vs {self.group}") + f" / {self.student} / seed {self.seed}"


def _load_teacher(path: str, data=None):
    from ..checkpoint import check_compatible, load_checkpoint, read_sidecar, sha256_file

    weights, side = read_sidecar(path)
    model, side = load_checkpoint(path)
    if data is not None:
        check_compatible(side, data, f"checkpoint {path}")
    return model, side, sha256_file(weights)


def run_audit(s: AuditSettings, out: str | Path, *, force: bool = False, log: Callable[[str], None] = print,
              verbose: bool = False) -> dict:
    """Run (or resume) the audit into ``out``; write audit.json/.md/.html; return the audit object.

    Raises :class:`AuditIncomplete` (exit code 3) after writing the reports when a run failed.
    """
    from ..attacks import can_share_pass, get_attack, prepare_attack, run_attacks_together
    from ..attacks.base import parse_access
    from ..checkpoint import atomic_write_json, read_sidecar, versions
    from ..config import train_config
    from ..metrics import predict_logits
    from ..models import create_model
    from ..runs import data_from_config
    from ..train import seed_everything
    from .cache import TeacherOutputCache
    from .render import write_reports

    out = Path(out)
    parse_access(s.query)
    if s.seeds < 1:
        raise NastyError(f"--seeds must be at least 1, got {s.seeds}")
    if s.first_seed < 0:
        raise NastyError(f"--first-seed must be >= 0, got {s.first_seed}")
    if isinstance(s.baselines_from, (str, Path)):
        s.baselines_from = [str(s.baselines_from)]
    for src in s.baselines_from:
        if not (Path(src) / "runs" / "baselines").is_dir():
            raise NastyError(f"--baselines-from {src}: no audit baselines there (runs/baselines missing)")
    if not s.students:
        raise NastyError("--students is empty")
    if s.fail_on is not None and s.fail_on < 0:
        raise NastyError(f"--fail-on must be >= 0, got {s.fail_on}")
    stats.check_settings(margin=s.margin, fidelity=s.fidelity, power=s.power, safe_below=s.safe_below, correction=s.correction)
    attacks, notes = resolve_attacks(s.attacks)
    unknown = set(s.params) - set(attacks) - set(stats.BASELINES)
    if unknown:
        raise NastyError(f"--param given for {sorted(unknown)[0]}, which is not among the audited attacks ({', '.join(attacks)})")
    params = {a: attack_params(a, s.params) for a in [*stats.BASELINES, *attacks]}

    _, side = read_sidecar(s.teacher)
    for src in s.baselines_from:
        theirs = _normalization_of_audit(Path(src))
        if theirs != [list(side["normalization"]["mean"]), list(side["normalization"]["std"])]:
            raise NastyError(f"--baselines-from {src}: its students saw inputs normalised differently (its teacher's "
                             f"normalization: {theirs or 'unknown'}); its baselines do not apply here")
    norm = (side["normalization"]["mean"], side["normalization"]["std"])
    data = data_from_config(s.cfg, normalization=norm)
    teacher, side, teacher_sha = _load_teacher(s.teacher, data)
    targets = {"teacher": teacher}
    ref_sha = None
    if s.reference:
        ref, rside, ref_sha = _load_teacher(s.reference, data)
        if any(abs(a - b) > 1e-6 for a, b in zip(rside["normalization"]["mean"] + rside["normalization"]["std"], norm[0] + norm[1])):
            raise NastyError(f"reference {s.reference} was trained with a different input normalization than the teacher; "
                             "audit them separately")
        targets["reference"] = ref
    for st in s.students:
        create_model(st, data.num_classes, data.in_channels, data.image_size)
    tcfg = train_config(s.cfg)
    post = None
    if s.output_defense:
        from ..defenses.output import parse_output_defense

        if s.query.split(":")[0] == "weights":
            raise NastyError("--output-defense filters what the teacher answers; a white-box thief (--query weights) "
                             "bypasses it. Audit an output defense with --query probs, topk:K or label")
        post = parse_output_defense(s.output_defense)
    defenses = {"teacher": describe_defense(side, post)}
    if s.reference:
        defenses["reference"] = describe_defense(rside, None)

    config = {
        "format": RUN_FORMAT,
        "teacher": str(s.teacher), "teacher_sha256": teacher_sha,
        "reference": s.reference, "reference_sha256": ref_sha,
        "data": _data_fingerprint(s.cfg), "data_sha256": data_sha256(data), "train": {k: v for k, v in tcfg.to_dict().items() if k != "seed"},
        "query": s.query, "surrogate": s.surrogate, "queries": s.queries, "params": params,
        "output_defense": post.describe() if post is not None else None,
    }
    check_resume(out, config, force)
    for src in s.baselines_from:
        try:
            theirs = json.loads((Path(src) / CONFIG_FILE).read_text()).get("data_sha256")
        except (OSError, ValueError, AttributeError):
            theirs = None
        if theirs is not None and theirs != config["data_sha256"]:
            raise NastyError(f"--baselines-from {src}: its students were trained on other data (dataset SHA-256 "
                             f"{theirs[:12]}..., here {config['data_sha256'][:12]}...); its baselines do not apply here")

    cache = TeacherOutputCache()
    forwarded = {g: 0 for g in targets}  # every sample a teacher processes, inside the cache or not

    def counter(g: str):
        def hook(module, inputs):
            forwarded[g] += len(inputs[0])
        return hook

    hooks = [m.register_forward_pre_hook(counter(g)) for g, m in targets.items()]
    labels_of = {a: bool(get_attack(a).uses_labels) for a in attacks}
    skipped: dict[tuple[str, str], str] = {}  # the whole attack cannot run under this threat model
    skipped_students: dict[tuple[str, str], dict[str, str]] = {}  # ... or not with some students
    failed: dict[tuple[str, str], list[str]] = {}
    x_sur = x_sur_val = None
    if s.surrogate:
        from ..attacks.base import load_surrogate

        sur = load_surrogate(s.surrogate, s.cfg["data"]["data_root"], data, val_fraction=s.cfg["data"]["val_fraction"],
                             split_seed=s.cfg["data"]["split_seed"], download=s.cfg["data"]["download"])
        x_sur, x_sur_val = sur.x_train, sur.x_val
    for a in attacks:
        why = access_problem(a, s.query, surrogate=bool(s.surrogate))
        if why:
            for g in targets:
                skipped[(g, a)] = why
            log(f"[audit] skipping {a}: {why}")
    jobs = [Job("baselines", b, st, k) for b in stats.BASELINES for st in s.students for k in s.seed_list]
    jobs += [Job(g, a, st, k) for g in targets for a in attacks for st in s.students for k in s.seed_list]
    runs: dict[tuple[str, str, str, int], dict] = {}
    quiet = (lambda m: None) if not verbose else log
    t_start = time.perf_counter()
    counts = {"trained": 0, "reused": 0, "label_only_reused": 0}

    def run_key(job: Job) -> str:
        lab = labels_of.get(job.method, True)
        return _hash([config["format"], config["teacher_sha256"] if job.group != "baselines" else None,
                      config["reference_sha256"] if job.group == "reference" else None, config["data"], config["train"],
                      config["query"] if job.group != "baselines" else None, params[job.method], job.student, job.seed,
                      lab, s.surrogate if not lab else None, *([s.queries] if s.queries and not lab else []),
                      *([config["output_defense"]] if job.group == "teacher" and config["output_defense"] else [])])

    def prepare(job: Job):
        """The prepared run, or None when the attack refuses this student (noted)."""
        tc = train_config(s.cfg, seed=job.seed)
        teachers = [] if job.group == "baselines" else [targets[job.group]]
        label_free = not labels_of.get(job.method, True)
        queries = {"x_queries": x_sur, "x_val_queries": x_sur_val, "data_source": f"{s.surrogate} (surrogate, unlabelled)"} \
            if label_free and x_sur is not None else {}
        if label_free and s.queries:
            queries["query_budget"] = s.queries
        try:
            return prepare_attack(job.method, data=data, teachers=teachers, student=job.student, train=tc,
                                  params=params[job.method], query=s.query, labels=labels_of.get(job.method, True),
                                  out_dir=job.dir(out), log=quiet, teacher_cache=cache,
                                  output_defense=post if job.group == "teacher" else None, **queries)
        except NastyError as e:
            refused(job, e)
            return None

    def refused(job: Job, e: NastyError) -> None:
        if job.group == "baselines":
            raise e
        why = str(e).splitlines()[0]
        skipped_students.setdefault((job.group, job.method), {})[job.student] = why
        log(f"[audit] skipping {job.method} vs {job.group} with student {job.student}: {why}")

    def failure(job: Job, e: BaseException) -> None:
        gk = (job.group, job.method)
        if isinstance(e, TrainingDiverged):
            if job.group == "baselines":
                raise AuditIncomplete(f"baseline {job.label()} diverged: {e}") from None
            failed.setdefault(gk, []).append(f"seed {job.seed}, {job.student}: {str(e).splitlines()[0]}")
            log(f"[audit] {job.label()} FAILED: {e}")
        elif isinstance(e, NastyError):
            refused(job, e)
        else:  # a bug in one attack must not lose the others' results
            if os.environ.get("NASTY_DEBUG") or job.group == "baselines":
                raise e
            failed.setdefault(gk, []).append(f"seed {job.seed}, {job.student}: internal error {type(e).__name__}: {e}")
            log(f"[audit] {job.label()} FAILED: internal error {type(e).__name__}: {e}")

    def persist(job: Job, key: str, model, res: dict) -> None:
        d = job.dir(out)
        pred = predict_logits(model, data.x_test).argmax(1).numpy().astype(np.int16)
        res.pop("confusion_matrix", None)
        res["audit_run_key"] = key
        res["group"] = job.group
        val_pred = None
        if job.group == "baselines" and job.method == "scratch":  # TLLM's preliminary label-only run reads these
            val_pred = predict_logits(model, data.x_val).argmax(1).numpy().astype(np.int16)
            _save_npy(d / "val_pred.npy", val_pred)
        _save_npy(d / "test_pred.npy", pred)
        atomic_write_json(d / "result.json", res)
        res["_pred"] = pred
        if val_pred is not None:
            res["_val_pred"] = val_pred
        runs[(job.group, job.method, job.student, job.seed)] = res
        counts["trained"] += 1
        together = f" (trained in one pass with {res['trained_with'] - 1} others)" if res.get("trained_with", 1) > 1 else ""
        log(f"[audit] {job.label()}: test accuracy {res['accuracy']:.2f}%{together}")

    def run_alone(job: Job, key: str) -> None:
        prep = prepare(job)
        if prep is None:
            return
        base = runs.get(("baselines", "scratch", job.student, job.seed))
        if job.method == "tllm" and s.reuse_label_only and base is not None and "_val_pred" in base:
            prep.ctx.info["label_only_val_pred"] = base["_val_pred"]  # the same run: not trained twice
        seed_everything(job.seed, tcfg.deterministic)  # the student's initialisation depends on the seed only
        try:
            t0 = time.perf_counter()
            model, extra = prep.attack.train(prep.ctx)
            model, res = prep.finish(model, extra, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001  (sorted out by failure)
            failure(job, e)
            return
        if (res.get("identification") or {}).get("label_only_run"):
            counts["label_only_reused"] += 1
        persist(job, key, model, res)

    pending: list[tuple[Job, str]] = []
    # a reference with the teacher's very weights (and no output defense in front of the teacher) gets the same runs
    twin_reference = bool(s.reference) and ref_sha == teacher_sha and post is None
    twins: list[tuple[Job, str]] = []
    for job in jobs:
        if (job.group, job.method) in skipped:
            continue
        key = run_key(job)
        res = load_run(job.dir(out), key)
        for other in s.baselines_from if res is None and job.group == "baselines" else []:
            src = job.dir(Path(other))
            if load_run(src, key) is not None:  # the same baseline (same data, schedule, seed): copy it in
                shutil.copytree(src, job.dir(out), dirs_exist_ok=True)
                res = load_run(job.dir(out), key)
                break
        if res is not None:
            runs[(job.group, job.method, job.student, job.seed)] = res
            counts["reused"] += 1
        elif job.group == "reference" and twin_reference:
            twins.append((job, key))  # the same checkpoint as the teacher, attacked the same way: copied afterwards
        else:
            pending.append((job, key))
    # single-pass attacks of one seed share a pass over the data (nasty.train.fit_group); the rest run alone
    for seed in s.seed_list:
        batch = [(j, k) for j, k in pending if j.seed == seed and s.fuse and can_share_pass(j.method)
                 and j.student not in skipped_students.get((j.group, j.method), {})]
        groups: dict[int, list] = {}
        for job, key in batch:
            prep = prepare(job)
            if prep is not None:
                groups.setdefault(id(prep.ctx.train_split()[0]), []).append((job, key, prep))
        for members in groups.values():
            if len(members) == 1:
                job, key, _ = members[0]
                run_alone(job, key)
                continue
            try:
                outs = run_attacks_together([p for _, _, p in members], log=quiet)
            except Exception as e:  # noqa: BLE001  (one attack's bug: retry them one by one, so it costs only itself)
                log(f"[audit] a shared pass of {len(members)} runs failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                    "running them one at a time")
                for job, key, _ in members:
                    run_alone(job, key)
                continue
            for (job, key, _), o in zip(members, outs):
                if isinstance(o, Exception):
                    failure(job, o)
                else:
                    persist(job, key, *o)
        for job, key in pending:
            if job.seed == seed and not (s.fuse and can_share_pass(job.method)):
                if job.student not in skipped_students.get((job.group, job.method), {}):
                    run_alone(job, key)
    for job, key in twins:
        src = runs.get(("teacher", job.method, job.student, job.seed))
        for kind in (skipped_students, failed):
            if ("teacher", job.method) in kind:
                kind[("reference", job.method)] = kind[("teacher", job.method)]
        if src is None:
            continue
        shutil.copytree(Job("teacher", job.method, job.student, job.seed).dir(out), job.dir(out), dirs_exist_ok=True)
        res = {k: v for k, v in src.items() if not k.startswith("_")}
        res.update(audit_run_key=key, group="reference", copied_from="teacher (the same checkpoint)")
        atomic_write_json(job.dir(out) / "result.json", res)
        runs[(job.group, job.method, job.student, job.seed)] = {**src, **res}
        counts["reused"] += 1
    trained, reused = counts["trained"], counts["reused"]
    seconds = time.perf_counter() - t_start

    deployed = dict(targets)
    if post is not None:  # the teacher's answers as deployed: argmax of the defended probabilities
        from ..defenses.output import DefendedModel

        deployed["teacher"] = DefendedModel(targets["teacher"], post)
    teacher_pred = {g: cache.test_pred(m, data.x_test).numpy() for g, m in deployed.items()}
    for h in hooks:
        h.remove()
    for gk, per in skipped_students.items():
        if len(per) == len(s.students):
            reasons = set(per.values())
            skipped[gk] = reasons.pop() if len(reasons) == 1 else "; ".join(f"{st}: {r}" for st, r in per.items())
    audit = analyse(s, data, attacks, runs, teacher_pred, skipped, failed, notes, config, skipped_students)
    for g, d in defenses.items():
        audit["targets"][g]["defense"] = d
    audit["runtime"] = {"seconds": seconds, "runs_trained": trained, "runs_reused": reused,
                        "teacher_samples_run": sum(forwarded.values()), "teacher_samples_cached": cache.samples_run,
                        "teacher_cache_hits": cache.hits,
                        "label_only_runs_reused": counts["label_only_reused"]}
    audit["versions"] = versions()
    atomic_write_json(out / "audit.json", audit)
    write_reports(audit, out)
    if audit["status"] != "complete" and not audit["gate"]["failed"]:
        raise AuditIncomplete(f"audit incomplete: {'; '.join(audit['problems'])} (reports written to {out}; re-run to resume)")
    return audit


def analyse(s: AuditSettings, data, attacks: list[str], runs: dict, teacher_pred: dict[str, np.ndarray],
            skipped: dict, failed: dict, notes: list[str], config: dict, skipped_students: dict | None = None) -> dict:
    """Turn the runs into the audit object (see :mod:`nasty.audit.schema`)."""
    from ..attacks import get_attack

    y = data.y_test.numpy()
    C = data.num_classes
    seeds = s.seed_list

    def pred_matrix(group: str, method: str, student: str) -> np.ndarray | None:
        rows = [runs.get((group, method, student, k)) for k in seeds]
        if any(r is None for r in rows):
            return None
        return np.stack([r["_pred"] for r in rows])

    def summary(group: str, method: str, student: str, tpred: np.ndarray | None) -> dict:
        rows = [runs[(group, method, student, k)] for k in seeds]
        accs = [float(r["accuracy"]) for r in rows]
        out = {"accuracy": float(np.mean(accs)), "accuracy_sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
               "accuracy_per_seed": accs,
               "per_class_accuracy": _per_class(np.stack([stats.correctness(r["_pred"], y) for r in rows]).mean(0), y, C),
               "train_seconds": float(sum(r.get("train_seconds", 0.0) for r in rows))}
        if tpred is not None:
            out["teacher_agreement"] = float(np.mean([100.0 * np.mean(r["_pred"] == tpred) for r in rows]))
        return out

    baselines: dict[str, dict] = {b: {} for b in stats.BASELINES}
    base_corr: dict[str, dict[str, np.ndarray]] = {}
    for st in s.students:
        base_corr[st] = {}
        for b in stats.BASELINES:
            m = pred_matrix("baselines", b, st)
            if m is None:
                raise AuditIncomplete(f"baseline {b} for {st} is missing")
            base_corr[st][b] = stats.correctness(m, y)
            baselines[b][st] = summary("baselines", b, st, None)

    targets: dict[str, dict] = {}
    problems: list[str] = []
    for g, tp in teacher_pred.items():
        t_corr = stats.correctness(tp, y)
        per_class_t = _per_class(t_corr, y, C)
        entry = {"checkpoint": s.teacher if g == "teacher" else s.reference,
                 "accuracy": float(100.0 * t_corr.mean()), "per_class_accuracy": per_class_t, "attacks": {}}
        for a in attacks:
            cls = get_attack(a)
            rule = "gain" if cls.uses_labels else "fidelity"
            att = {"method": a, "summary": cls.summary, "rule": rule,
                   "threshold": (f"gain > {s.margin:g} points over both baselines" if rule == "gain"
                                 else f"fidelity: accuracy / teacher's > {s.fidelity:g}")
                   + f", one-sided, {CORRECTION_TEXT[s.correction]}-adjusted p < {stats.ALPHA:g}",
                   "assumes": assumptions(a, s.query, data, s.surrogate), "params": config["params"][a],
                   "status": "ok", "reason": None, "transferred_classes": [], "transferred_count": 0, "num_classes": C,
                   "students": {}}
            if (g, a) in skipped:
                att.update(status="skipped", reason=skipped[(g, a)])
            elif (g, a) in failed:
                att.update(status="failed", reason="; ".join(failed[(g, a)]))
                problems.append(f"{a} vs {g} failed ({failed[(g, a)][0]})")
            else:
                union: set[int] = set()
                not_run = (skipped_students or {}).get((g, a), {})
                if not_run:
                    att["skipped_students"] = dict(not_run)
                for st in s.students:
                    if st in not_run:
                        continue
                    m = pred_matrix(g, a, st)
                    if m is None:
                        att.update(status="failed", reason=f"runs missing for {st}")
                        problems.append(f"{a} vs {g}: runs missing for {st}")
                        break
                    rows = stats.class_decisions(y, stats.correctness(m, y), base_corr[st], t_corr, num_classes=C, rule=rule,
                                                 margin=s.margin, fidelity=s.fidelity, correction=s.correction, power=s.power,
                                                 safe_below=s.safe_below, decide=False)
                    row = {**summary(g, a, st, tp), "classes": rows}
                    extra = _extra(runs, g, a, st, seeds)
                    if extra:
                        row["extra"] = extra
                    att["students"][st] = row
                if att["status"] == "ok":
                    # one family: every class of every student of this attack (against this target)
                    att["correction"] = s.correction
                    att["family_size"] = stats.decide_family([r["classes"] for r in att["students"].values()], rule=rule,
                                                             correction=s.correction, margin=s.margin, fidelity=s.fidelity,
                                                             power=s.power, safe_below=s.safe_below)
                    for r in att["students"].values():
                        r["transferred_classes"] = [x["class"] for x in r["classes"] if x["transferred"]]
                        r["transferred_count"] = len(r["transferred_classes"])
                        union.update(r["transferred_classes"])
                    att["transferred_classes"] = sorted(union)
                    att["transferred_count"] = len(union)
                    found = [set(v) for st_row in att["students"].values() for v in st_row.get("extra", {}).get("undistillable_classes", [])]
                    if found:
                        att["undistillable_classes"] = sorted(set.union(*found))
            entry["attacks"][a] = att
        targets[g] = entry

    defense_effect = None
    if "reference" in targets:
        defense_effect = {}
        for a in attacks:
            t, r = targets["teacher"]["attacks"][a], targets["reference"]["attacks"][a]
            if t["status"] == r["status"] == "ok":
                tt, rr = set(t["transferred_classes"]), set(r["transferred_classes"])
                defense_effect[a] = {"protected_classes": sorted(rr - tt), "still_transferred": sorted(rr & tt),
                                     "newly_transferred": sorted(tt - rr)}
    failing = [a for a, v in targets["teacher"]["attacks"].items() if v["status"] == "ok" and s.fail_on is not None
               and v["transferred_count"] > s.fail_on]
    counts = np.bincount(y, minlength=C)
    rel = stats.reliability(len(seeds))
    if rel == "unreliable":
        notes = [*notes, "One seed: every interval is UNRELIABLE. It captures the test-set noise only, not the training "
                 "noise between seeds, and in simulation a false 'transferred' is several times more frequent than nominal. "
                 f"Use --seeds {stats.DEFAULT_SEEDS} or more."]
    elif rel == "approximate":
        notes = [*notes, f"{len(seeds)} seeds: intervals and detectable gains are approximate (the seed-to-seed variance "
                 f"rests on {len(seeds) - 1} degree{'s' if len(seeds) > 2 else ''} of freedom, so they are wide); "
                 f"{stats.DEFAULT_SEEDS} or more seeds are recommended."]
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "complete" if not problems else "incomplete",
        "problems": problems,
        "notes": notes,
        "config": {**{k: v for k, v in config.items() if k != "params"}, "attacks": attacks, "students": list(s.students),
                   "seeds": seeds, "margin": s.margin, "fidelity": s.fidelity, "fail_on": s.fail_on,
                   "statistics": {"method": "t over seeds with the crossed seeds x test-samples variance (Satterthwaite df)",
                                  "level": stats.LEVEL, "alpha": stats.ALPHA, "correction": s.correction,
                                  "correction_name": CORRECTION_TEXT[s.correction], "power": s.power,
                                  "safe_below": s.safe_below, "intervals": stats.reliability(len(seeds)),
                                  "recommended_seeds": stats.DEFAULT_SEEDS}},
        "method": method_text(s),
        "dataset": {"name": data.name, "classes": list(data.classes), "test_size": int(len(y)),
                    "test_per_class": [int(v) for v in counts], "train_images": int(len(data.y_train))},
        "baselines": baselines,
        "targets": targets,
        "defense_effect": defense_effect,
        "gate": {"fail_on": s.fail_on, "failed": bool(failing), "failing_attacks": failing},
    }


def _per_class(correct: np.ndarray, y: np.ndarray, num_classes: int) -> list[float | None]:
    return [float(100.0 * correct[y == c].mean()) if (y == c).any() else None for c in range(num_classes)]


def _extra(runs: dict, g: str, a: str, st: str, seeds: list[int]) -> dict:
    """Attack-specific outputs worth reporting (e.g. TLLM's identified classes), per seed."""
    out: dict[str, list] = {}
    for k in seeds:
        r = runs[(g, a, st, k)]
        for key in ("undistillable_classes",):
            if key in r:
                out.setdefault(key, []).append(r[key])
    return out


def describe_defense(side: dict, post) -> dict:
    """What protects a target: the training-time defense recorded in its checkpoint, and the output
    defense its answers pass through (``None`` where there is none)."""
    d = side.get("defense") if isinstance(side.get("defense"), dict) else None
    training = None
    if d:
        keys = ("tau", "omega", "protect_classes", "protect_by", "anchor", "combine", "max_accuracy_drop", "kl_cap")
        training = {"name": d.get("name"), **{k: d[k] for k in keys if d.get(k) not in (None, [], "") and not (k == "anchor" and not d[k])}}
        if training["name"] not in ("class-selective", "budget"):
            training.pop("protect_by", None)
        if training["name"] != "multi-adversary":
            training.pop("combine", None)
        training["adversaries"] = len(side.get("adversaries") or d.get("adversary") or [])
        info = side.get("defense_info") or {}
        if isinstance(info, dict) and "omega" in info:
            training["omega_selected"] = info["omega"]
        model = side.get("model") if isinstance(side.get("model"), dict) else {}
        kw = model.get("kwargs") if isinstance(model.get("kwargs"), dict) else {}
        if model.get("name") == "locked":
            training["lock"] = f"{kw.get('form', '?')}, {kw.get('lock', '?')}"
            training["white_box"] = ("the artifact contains the normal model: white-box (--query weights) results are "
                                     "attacks on the normal model, not a test of the defense")
    return {"training": training, "output": post.describe() if post is not None else None}


def defense_text(defense: dict | None) -> str:
    """One line naming a target's defenses and their parameters."""
    if not defense or (not defense.get("training") and not defense.get("output")):
        return "none (a normally trained model answering with its own outputs)"
    parts = []
    t = defense.get("training")
    if t:
        params = ", ".join(f"{k} {','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in t.items() if k not in ("name", "white_box"))
        parts.append(f"training-time: {t['name']} ({params})")
        if t.get("white_box"):
            parts.append(f"note: {t['white_box']}")
    if defense.get("output"):
        parts.append(f"output: {defense['output']}")
    return "; ".join(parts)


def assumptions(method: str, query: str, data, surrogate: str | None = None) -> str:
    """Plain-language statement of what the attack assumes of the thief in this audit."""
    from ..attacks import get_attack

    cls = get_attack(method)
    access = query.split(":")[0]
    what = {"weights": "the teacher's weights (white-box)", "logits": "the teacher's logits", "probs": "the teacher's full probability vector",
            "topk": f"the teacher's top-{query.partition(':')[2] or 'K'} probabilities", "label": "only the teacher's predicted label"}[access]
    if cls.needs_teacher and tuple(cls.accepts) == ("weights",):
        what = "the teacher's weights (white-box)"
    if not cls.needs_teacher:
        what = "no access to the teacher"
    if cls.uses_labels:
        images = f"and the ground-truth labels of {len(data.y_train)} training images of the teacher's distribution"
    elif surrogate:
        images = f"on unlabelled images of another dataset ({surrogate}), no labels"
    else:
        images = f"on {len(data.y_train)} unlabelled training images of the teacher's distribution, no labels"
    return f"The thief holds {what} {images}. {cls.summary[0].upper() + cls.summary[1:]}."


CORRECTION_TEXT = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "un"}


def method_text(s: AuditSettings) -> dict:
    """The statistical method in words, as recorded in audit.json (see :mod:`nasty.audit.stats` for the formulas)."""
    corr = {"holm": "Holm's step-down procedure over every (student, class) test of one attack: the chance that an attack "
                    "shows any false 'transferred' class is at most alpha (family-wise error rate).",
            "bh": "Benjamini-Hochberg over every (student, class) test of one attack: the expected share of false "
                  "'transferred' classes among those reported is at most alpha (false discovery rate).",
            "none": "none: each class is tested at alpha on its own; with 10 classes x 2 students an attack that transfers "
                    "nothing shows a false 'transferred' class far more often than alpha."}[s.correction]
    return {
        "gain": "gain g_c = acc(attack, c) - acc(better baseline, c), percentage points on test class c, averaged over seeds; "
                "the better baseline is the label-only (scratch) or label-smoothing student with the higher accuracy on c.",
        "fidelity": "for attacks that never read the labels: r_c = acc(attack, c) / acc(teacher, c).",
        "interval": "95% t-interval with the seed as the unit of replication: for D = attack - baseline (per seed and test "
                    "image), Var(mean D) = V_S + V_I with V_S = max(MS_S, MS_E)/(S n) (seed-to-seed variance of the per-seed "
                    "gains) and V_I = max(MS_I - MS_E, 0)/(S n) (test-image variance shared by all seeds), two-way ANOVA mean "
                    "squares over S seeds x n test images; Satterthwaite df = V^2 / (V_S^2/(S-1) + V_I^2/(n-1)). The gain's "
                    "interval is the smaller of the bounds against the two baselines. With one seed only test-set noise is "
                    "captured (unreliable).",
        "test": f"one-sided p-value of 'gain > {s.margin:g} points' (fidelity rule: 'r_c > {s.fidelity:g}', tested as "
                f"mean(attack - {s.fidelity:g} x teacher) > 0); against two baselines the larger of the two p-values "
                "(intersection-union test).",
        "correction": corr,
        "decision": f"transferred when the adjusted p-value is below {stats.ALPHA:g} (with no correction: exactly when the "
                    "lower end of the 95% interval is above the margin). An attack's transferred classes are the union "
                    "over its students (the thief keeps the best student per class).",
        "power": f"for a class that is not transferred, 'detectable' is the smallest gain over the better baseline (fidelity "
                 f"rule: the smallest fidelity) that this audit would call transferred with probability {s.power:g}, given "
                 "the class's standard error and df, when it is the only transferable class of the attack (noncentral t)."
                 + (f" 'Safe at this power' means detectable < {s.safe_below:g} points." if s.safe_below is not None else
                    " Not transferred means not shown to transfer: a class is only as safe as its detectable gain is small."),
    }
