"""Audit stage 1, the plan: validate the request, load the teacher(s) and the data, list the runs.

Nothing here trains or writes (except :func:`open_folder`, which claims the audit folder). A plan is
rebuilt from the same :class:`AuditSettings` anywhere (another process, another machine): its run keys
are a function of the settings, the checkpoints' and the data's contents only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from .. import attacks, safe_io
from ..attacks import ATTACKS, get_attack
from ..attacks.base import load_surrogate, parse_access
from ..checkpoint import atomic_write_json, check_compatible, load_checkpoint, read_sidecar, sha256_file
from ..config import train_config
from ..defenses.output import check_chain_for, parse_output_defense
from ..errors import NastyError
from ..models import create_model
from ..pipelines.common import normalization
from ..registry import slug
from ..attacks.run import thief_view
from ..pipelines.common import thief_data
from ..runs import data_from_config
from . import stats
from .analyse import describe_defense
from .settings import AUDIT_PARAMS, AuditSettings  # noqa: F401  (re-exported: nasty.audit.plan.AuditSettings)

CONFIG_FILE = "audit-config.json"
# identifies how runs are keyed and stored (not the report's schema version: a new report format
# must not retrain a single run)
RUN_FORMAT = "nasty-audit/1"


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


@dataclass
class AuditPlan:
    """A validated audit: its data, targets, attacks, the runs to train and the key of each."""

    s: AuditSettings
    data: Any
    attacks: list[str]
    notes: list[str]
    params: dict[str, dict]
    targets: dict[str, nn.Module]  # "teacher" (and "reference")
    teacher_sha: str
    ref_sha: str | None
    post: Any  # the output defense in front of the teacher, or None
    defenses: dict[str, dict]
    config: dict  # what the audit folder's runs depend on (audit-config.json)
    labels_of: dict[str, bool]
    skipped: dict[tuple[str, str], str]  # (group, attack) -> why the whole attack cannot run under this threat model
    jobs: list[Job]
    x_sur: Any = None
    x_sur_val: Any = None
    tcfg: Any = None

    @property
    def twin_reference(self) -> bool:
        """A reference with the teacher's very weights (and no output defense in front of the teacher) gets the same runs."""
        return bool(self.s.reference) and self.ref_sha == self.teacher_sha and self.post is None

    def run_key(self, job: Job) -> str:
        """What a finished run must have been trained with to be reused (its ``audit_run_key``)."""
        c, s = self.config, self.s
        lab = self.labels_of.get(job.method, True)
        return _hash([c["format"], c["teacher_sha256"] if job.group != "baselines" else None,
                      c["reference_sha256"] if job.group == "reference" else None, c["data"], c["train"],
                      c["query"] if job.group != "baselines" else None, self.params[job.method], job.student, job.seed,
                      lab, s.surrogate if not lab else None, *([s.queries] if s.queries and not lab else []),
                      *([("thief", s.labelled, s.queries)] if s.labelled is not None else []),
                      *([c["output_defense"]] if job.group == "teacher" and c["output_defense"] else []),
                      *(["floor-variants"] if get_attack(job.method).floor else [])])  # runs of before the floor family retrain


def plan_audit(s: AuditSettings, log=print) -> AuditPlan:
    """Validate the request and load everything it names; one-line :class:`NastyError` on bad input."""
    _check_settings(s)
    attacks_, notes = resolve_attacks(s.attacks)
    unknown = set(s.params) - set(attacks_) - set(stats.BASELINES)
    if unknown:
        raise NastyError(f"--param given for {sorted(unknown)[0]}, which is not among the audited attacks ({', '.join(attacks_)})")
    params = {a: attack_params(a, s.params, tune=s.labelled is not None) for a in [*stats.BASELINES, *attacks_]}
    norm = normalization(read_sidecar(s.teacher)[1])
    for src in s.baselines_from:
        theirs = _normalization_of_audit(Path(src))
        if theirs != [list(norm[0]), list(norm[1])]:
            raise NastyError(f"--baselines-from {src}: its students saw inputs normalised differently (its teacher's "
                             f"normalization: {theirs or 'unknown'}); its baselines do not apply here")
    if s.labelled is not None:
        if s.surrogate:
            raise NastyError("--labelled splits the thief's own images into labelled ones and queries; it cannot be combined with --surrogate")
        data, note = thief_data(s.cfg, [s.teacher], norm)
        thief_view(data, s.labelled, s.queries, "labels")  # the regime's bounds, before anything trains
        s.reuse_label_only = False  # TLLM's label-only run sees the thief's mixed batches, the baseline its labelled images only
        regime_notes = [note]
    else:
        data, regime_notes = data_from_config(s.cfg, normalization=norm), []
    teacher, side, teacher_sha = _load_teacher(s.teacher, data)
    targets, sides, ref_sha = {"teacher": teacher}, {"teacher": side}, None
    if s.reference:
        ref, rside, ref_sha = _load_teacher(s.reference, data)
        if any(abs(a - b) > 1e-6 for a, b in zip(sum(normalization(rside), []), norm[0] + norm[1])):
            raise NastyError(f"reference {s.reference} was trained with a different input normalization than the teacher; "
                             "audit them separately")
        targets["reference"], sides["reference"] = ref, rside
    for st in s.students:
        create_model(st, data.num_classes, data.in_channels, data.image_size)
    tcfg = train_config(s.cfg)
    post = None
    if s.output_defense:
        if s.query.split(":")[0] == "weights":
            raise NastyError("--output-defense filters what the teacher answers; a white-box thief (--query weights) "
                             "bypasses it. Audit an output defense with --query probs, topk:K or label")
        post = parse_output_defense(s.output_defense)
        check_chain_for(teacher, post)  # after a locked teacher: only defenses that keep its decision
    defenses = {g: describe_defense(sides[g], post if g == "teacher" else None) for g in targets}
    config = {
        "format": RUN_FORMAT,
        "teacher": str(s.teacher), "teacher_sha256": teacher_sha,
        "reference": s.reference, "reference_sha256": ref_sha,
        "data": _data_fingerprint(s.cfg), "data_sha256": data_sha256(data), "train": {k: v for k, v in tcfg.to_dict().items() if k != "seed"},
        "query": s.query, "surrogate": s.surrogate, "queries": s.queries, "params": params,
        **({"labelled": s.labelled} if s.labelled is not None else {}),
        "output_defense": post.describe() if post is not None else None,
    }
    for src in s.baselines_from:
        try:
            theirs = json.loads((Path(src) / CONFIG_FILE).read_text()).get("data_sha256")
        except (OSError, ValueError, AttributeError):
            theirs = None
        if theirs is not None and theirs != config["data_sha256"]:
            raise NastyError(f"--baselines-from {src}: its students were trained on other data (dataset SHA-256 "
                             f"{theirs[:12]}..., here {config['data_sha256'][:12]}...); its baselines do not apply here")
    if s.labelled is not None and "hard-label" not in attacks_:
        attacks_.append("hard-label")  # the floor every attack of the thief's regime is judged against
        params["hard-label"] = attack_params("hard-label", s.params, tune=True)
        regime_notes.append("hard-label is audited as the decision floors of the thief's regime: one at each label smoothing of its grid "
                            "(0, 0.1, 0.3); an attack transfers only where it beats every floor")
    notes = notes + regime_notes
    plan = AuditPlan(s, data, attacks_, notes, params, targets, teacher_sha, ref_sha, post, defenses, config,
                     {a: bool(get_attack(a).uses_labels) for a in attacks_}, {}, [], tcfg=tcfg)
    if s.surrogate:
        sur = load_surrogate(s.surrogate, s.cfg["data"]["data_root"], data, val_fraction=s.cfg["data"]["val_fraction"],
                             split_seed=s.cfg["data"]["split_seed"], download=s.cfg["data"]["download"])
        plan.x_sur, plan.x_sur_val = sur.x_train, sur.x_val
    for a in attacks_:
        why = access_problem(a, s.query, surrogate=bool(s.surrogate))
        if why:
            for g in targets:
                plan.skipped[(g, a)] = why
            log(f"[audit] skipping {a}: {why}")
    plan.jobs = [Job("baselines", b, st, k) for b in stats.BASELINES for st in s.students for k in s.seed_list]
    plan.jobs += [Job(g, a, st, k) for g in targets for a in attacks_ for st in s.students for k in s.seed_list]
    return plan


def _check_settings(s: AuditSettings) -> None:
    if isinstance(s.baselines_from, (str, Path)):
        s.baselines_from = [str(s.baselines_from)]
    for key, p in AUDIT_PARAMS.items():
        setattr(s, key, p.validate(p.flag_name(key), getattr(s, key)))
    parse_access(s.query)
    for src in s.baselines_from:
        if not (Path(src) / "runs" / "baselines").is_dir():
            raise NastyError(f"--baselines-from {src}: no audit baselines there (runs/baselines missing)")
    if not s.students:
        raise NastyError("--students is empty")
    stats.check_settings(margin=s.margin, fidelity=s.fidelity, power=s.power, safe_below=s.safe_below, correction=s.correction)


def open_folder(plan: AuditPlan, out: Path, force: bool) -> None:
    """Claim ``out`` for this audit: refuse one holding another configuration's runs (``force``: start afresh)."""
    check_resume(out, plan.config, force)


def resolve_attacks(names: list[str]) -> tuple[list[str], list[str]]:
    """Expand ``all``; validate names; baselines (attacks without a teacher) are dropped with a note."""
    if not names:
        raise NastyError("--attacks is empty; give names (see `nasty attacks`) or 'all'")
    out: list[str] = []
    notes: list[str] = []
    for name in names:
        if name == "all":
            picked = [k for k, c in sorted(ATTACKS.items()) if c.needs_teacher and not c.floor]  # floors join the regime that needs them
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


def attack_params(name: str, overrides: dict[str, dict], tune: bool = False) -> dict:
    """Defaults of the attack class with the user's overrides, validated by the class; ``tune``: a
    self-tuning thief where the attack can tune (the thief's regime), unless the user says otherwise, and a
    floor with its ``floor_params`` under the user's overrides."""
    cls = get_attack(name)
    given = {**(cls.floor_params if tune and cls.floor else {}), **overrides.get(name, {})}
    if tune and "tune" in cls.params:
        given.setdefault("tune", True)
    return dict(cls(**given).p)


def access_problem(name: str, query: str, *, surrogate: bool = False, n_teachers: int = 1) -> str | None:
    """Why the attack cannot run under this threat model (``None`` when it can)."""
    cls = attacks.get_attack(name)
    try:
        attacks.check_requirements(cls, query=query, labels=cls.uses_labels, n_teachers=n_teachers,
                                   unlabelled_queries=surrogate and not cls.uses_labels)
    except NastyError as e:
        return str(e).splitlines()[0]
    return None


def _normalization_of_audit(folder: Path) -> list | None:
    """The input normalisation (its teacher's) under which an audit folder's students were trained."""
    try:
        teacher = json.loads((folder / CONFIG_FILE).read_text())["teacher"]
        return list(normalization(read_sidecar(teacher)[1]))
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


def check_resume(out: Path, config: dict, force: bool) -> None:
    """Refuse to mix runs of a different configuration into ``out`` (unless ``force``: start afresh)."""
    if out.exists() and not out.is_dir():
        raise NastyError(f"--out {out} exists and is not a directory")
    f = out / CONFIG_FILE
    if out.is_dir() and any(out.iterdir()):
        if force:
            safe_io.set_aside(out)  # deleted once the audit succeeds, put back if it fails
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
              "output_defense", "labelled"):
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


def _load_teacher(path: str, data=None):

    weights, side = read_sidecar(path)
    model, side = load_checkpoint(path)
    if data is not None:
        check_compatible(side, data, f"checkpoint {path}")
    return model, side, sha256_file(weights)
