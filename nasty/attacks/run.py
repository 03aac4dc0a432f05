"""Running an attack: check the threat model, build the attacker's view of the data, train, score.

:func:`run_attack` trains one student; :func:`run_attacks_together` trains several single-pass
attacks in one pass over the data (an audit's seeds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..data import stratified_indices
from ..errors import NastyError
from ..metrics import evaluate, predict_logits
from ..resume import Checkpointing
from ..train import Member, fit_group, seed_everything
from .augment import parse_augment
from .base import ATTACKS, EXPLODE, Attack, AttackContext, Oracle, get_attack, parse_access


def run_attack(method: str, **kwargs: Any) -> tuple[nn.Module, dict]:
    """Train a student with ``method`` against ``teachers`` and score it on ``data``'s test split
    (keyword arguments: those of :func:`prepare_attack`).

    ``teacher_cache`` (a :class:`nasty.frozen.TeacherOutputCache`) shares the teacher's outputs
    across calls, so an audit runs the teacher once. Returns the student and a result dict (the
    public JSON of ``nasty attack``): ``method``, ``accuracy``, ``per_class_accuracy``,
    ``teacher_agreement``, ``resources`` and more.

    The attacker's data: ``data``'s training split with labels (default); the same images without
    labels (``labels=False``: labels are hidden from the attack, ``-1``); or ``x_queries``, unlabelled
    images of another distribution (surrogate data; ``x_val_queries`` or a carved 10% of them select
    the epoch). Without labels, model selection uses the teacher's labels on held-out queries (counted
    as queries). ``query_budget`` keeps that many training images (a seeded subset, the same for every
    training seed). ``augment`` is ``none``, ``mixup[:ALPHA]`` or ``cutmix[:ALPHA]`` for the attacks
    that support it.
    """
    prep = prepare_attack(method, **kwargs)

    train = prep.ctx.train
    seed_everything(train.seed, train.deterministic)  # the student's initial weights depend on the seed
    t0 = time.perf_counter()
    model, extra = prep.attack.train(prep.ctx)
    return prep.finish(model, extra, time.perf_counter() - t0)


@dataclass
class PreparedAttack:
    """One attack run, set up (threat model checked, attacker's view of the data built) but not trained:
    :func:`run_attack` trains it alone, :func:`run_attacks_together` trains several in one pass."""

    method: str
    attack: Any
    ctx: Any  # AttackContext
    data: Any  # the full bundle (its test split scores the student)
    teachers: list[nn.Module]
    notes: list[str]
    selection: str
    labels_used: bool
    query: str
    data_source: str | None
    query_budget: int | None
    augment: str
    output_defense: Any
    regime: dict | None = None  # the thief's regime (--labelled): how many labelled images, queries, validation images
    variants: dict = field(default_factory=dict)  # a tuned floor's candidates, each a floor of its own: name -> test predictions

    def finish(self, model: nn.Module, extra: dict, seconds: float, *, trained_with: int = 1) -> tuple[nn.Module, dict]:
        """Score the trained student on the test split; the result dict of :func:`run_attack`."""
        data, ctx, teachers = self.data, self.ctx, self.teachers
        cache = ctx.teacher_cache
        if not teachers:
            teacher_pred = None
        elif cache is not None:
            teacher_pred = cache.test_pred(teachers[0], data.x_test)
        else:
            teacher_pred = predict_logits(teachers[0], data.x_test).argmax(1)
        cls = type(self.attack)
        variants = extra.pop("_variants", None) or {}  # models: kept out of the result (JSON), their predictions here
        self.variants = {name: predict_logits(m, data.x_test).argmax(1) for name, m in variants.items()}
        result = {
            "method": self.method,
            "student": ctx.student,
            "params": self.attack.p,
            **evaluate(model, data.x_test, data.y_test, data.num_classes, teacher_pred),
            "resources": {
                "access": self.query if cls.needs_teacher else "none",
                "data": self.data_source or data.name,
                "labels": self.labels_used,
                "train_images": int(len(ctx.data.y_train)),
                "queries": int(sum(o.queries for o in ctx.teachers)),
                "query_budget": self.query_budget,
                "model_selection": self.selection,
                "augment": self.augment or "none",
                "teachers": len(ctx.teachers),
                "output_defense": getattr(self.output_defense, "describe", lambda: None)() if self.output_defense else None,
                **({"regime": self.regime} if self.regime else {}),
            },
            "seed": ctx.train.seed,
            "train_seconds": seconds,
            "notes": self.notes + ctx.notes,
            **extra,
            **({"floor_variants": {n: 100.0 * float((p == data.y_test).float().mean()) for n, p in self.variants.items()}}
               if self.variants else {}),
        }
        if trained_with > 1:
            result["trained_with"] = trained_with  # students trained in the same pass; train_seconds is this run's share
        return model, result


def prepare_attack(
    method: str,
    *,
    data,
    teachers: list[nn.Module],
    student: str,
    train,
    params: dict[str, Any] | None = None,
    query: str = "logits",
    labels: bool = True,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    output_defense: Callable[[torch.Tensor], torch.Tensor] | None = None,
    x_queries: torch.Tensor | None = None,
    data_source: str | None = None,
    cache_teacher: bool = True,
    teacher_cache: Any = None,
    augment: str = "none",
    x_val_queries: torch.Tensor | None = None,
    query_budget: int | None = None,
    checkpointing: Checkpointing | None = None,
    labelled: int | None = None,
) -> PreparedAttack:
    """Everything :func:`run_attack` does before training: check the threat model, wrap the teachers
    in query oracles, build the attacker's view of the data (see :func:`run_attack`)."""
    cls = get_attack(method)
    attack = cls(**(params or {}))
    notes = check_requirements(cls, query=query, labels=labels, n_teachers=len(teachers), augment=augment,
                               unlabelled_queries=x_queries is not None)
    oracles = [Oracle(t, query, output_defense) for t in teachers] if cls.needs_teacher else []
    labels_used = bool(labels and cls.uses_labels and x_queries is None)
    if labelled is not None:
        if x_queries is not None:
            raise NastyError("--labelled splits the thief's own images into labelled ones and queries; it cannot be combined with --surrogate")
        kind = "labels" if not cls.needs_teacher or cls.labels_view else "mixed" if cls.uses_labels else "queries"
        view, selection = thief_view(data, labelled, query_budget, kind)
    else:
        view, selection = _attacker_view(data, oracles, labels_used, x_queries, x_val_queries, query_budget)
    ctx = AttackContext(data=view, teachers=oracles, student=student, train=train, params=attack.p,
                        run_dir=out_dir, log=log, labels_available=labels_used, cache_teacher=cache_teacher,
                        teacher_cache=teacher_cache, augment=augment or "none", checkpointing=checkpointing or Checkpointing(),
                        late_ties=labelled is not None)
    prep = PreparedAttack(method, attack, ctx, data, list(teachers), notes, selection, labels_used, query, data_source,
                          query_budget, augment or "none", output_defense)
    if labelled is not None:
        y = view.y_train
        prep.regime = {"labelled": int(labelled), "queries": int(query_budget or len(data.y_train)),
                       "labelled_train": int((y >= 0).sum()), "unlabelled_queries": int((y < 0).sum()), "validation": int(len(view.y_val))}
    return prep


def can_share_pass(method: str, params: dict | None = None) -> bool:
    """Whether the attack is a single run of the training loop (so it can share a pass with others); a
    tuned attack trains its own grid in one pass."""
    return get_attack(method).train is Attack.train and not (params or {}).get("tune")


def run_attacks_together(runs: list[PreparedAttack], *, log: Callable[[str], None] | None = None
                         ) -> list[tuple[nn.Module, dict] | Exception]:
    """Train several prepared single-pass attacks (:func:`can_share_pass`) on the same images with the
    same schedule and seed in one pass over the data (:func:`nasty.train.fit_group`). Each student
    gets exactly what it would get alone: the same initial weights, batches and objective. Returns,
    per run, ``(student, result)`` or the :class:`TrainingDiverged` that stopped it."""
    if not runs:
        return []
    first = runs[0].ctx
    x = first.train_split()[0]
    members = []
    for r in runs:
        c = r.ctx
        if not can_share_pass(r.method, r.attack.p):
            raise NastyError(f"attack {r.method} trains in several stages; it cannot share a pass")
        if c.train != first.train or c.train_split()[0] is not x or c.data.augment != first.data.augment:
            raise NastyError("runs trained together need the same images, augmentation, schedule and seed")
        seed_everything(c.train.seed, c.train.deterministic)  # as run_attack: the initial weights depend on the seed only
        student = r.attack.build_student(c)
        members.append(Member(student, r.attack.objective(c, student), desc=f"{r.method}:{c.student}", run_dir=c.run_dir,
                              y_train=c.train_split()[1], data=c.data, log=c.log, explode=EXPLODE,
                              late_ties=c.late_ties))
    t0 = time.perf_counter()
    fits = fit_group(members, first.data, first.train, x_train=x, errors="collect", **({"log": log} if log else {}))
    share = (time.perf_counter() - t0) / len(runs)
    out: list[tuple[nn.Module, dict] | Exception] = []
    for r, m, f in zip(runs, members, fits):
        if isinstance(f, Exception):
            out.append(f)
            continue
        out.append(r.finish(m.model, {"best_epoch": f.best_epoch, "val_accuracy": f.best_val_accuracy}, share,
                            trained_with=len(runs)))
    return out


def check_requirements(cls: type, *, query: str, labels: bool = True, n_teachers: int = 1, augment: str | None = "none",
                       unlabelled_queries: bool = False) -> list[str]:
    """Refuse (``NastyError``) an attack whose needs the threat model does not meet; return caveats."""
    access, _ = parse_access(query)
    method = cls.name
    notes: list[str] = []
    if cls.needs_teacher:
        if n_teachers < 1:
            raise NastyError(f"attack {method} needs a teacher checkpoint (--teacher)")
        if access not in cls.accepts:
            raise NastyError(f"attack {method} needs teacher access {' or '.join(cls.accepts)}; --query {query} does not give it")
        if n_teachers < cls.min_teachers:
            raise NastyError(f"attack {method} needs at least {cls.min_teachers} teachers (repeat --teacher); got {n_teachers}")
        if cls.max_teachers is not None and n_teachers > cls.max_teachers:
            raise NastyError(f"attack {method} uses {cls.max_teachers} teacher; got {n_teachers} (use --method ensemble for several)")
        if access == "label" and method == "kd":
            notes.append("label-only access: the KD term is alpha * T^2 * cross-entropy of the student's tempered softmax "
                         "(at temperature T) on the teacher's argmax labels, plus (1 - alpha) * cross-entropy on the labels")
    if cls.needs_labels and unlabelled_queries:
        raise NastyError(f"attack {method} needs labelled data of the teacher's task; surrogate queries carry no labels")
    if cls.needs_labels and not labels:
        raise NastyError(f"attack {method} needs the ground-truth labels of the attacker's data")
    kind, _ = parse_augment(augment)
    if kind != "none" and not cls.supports_augment:
        ok = ", ".join(sorted(k for k, c in ATTACKS.items() if c.supports_augment))
        raise NastyError(f"attack {method} does not support --augment {augment} (soft-label attacks that do: {ok})")
    return notes


def _attacker_view(data, oracles: list, labels_used: bool, x_queries: torch.Tensor | None, x_val_queries: torch.Tensor | None,
                   budget: int | None):
    """The data an attack may see: training images (labels hidden when not used), and the split that
    selects the epoch (the teacher's labels on held-out queries when the attacker has no labels)."""
    import dataclasses

    import numpy as np

    seed = int(data.info.get("split_seed", 0)) if isinstance(data.info, dict) else 0
    rng = np.random.default_rng(seed + 104729)
    x_train, y_train, x_val, y_val = data.x_train, data.y_train, data.x_val, data.y_val
    if x_queries is not None:
        x_train = x_queries
        if x_val_queries is None:  # hold out 10% of the queries to select the epoch
            order = torch.from_numpy(rng.permutation(len(x_queries)))
            n_val = max(1, int(round(0.1 * len(x_queries))))
            x_val, x_train = x_queries[order[:n_val]], x_queries[order[n_val:]]
        else:
            x_val = x_val_queries
        y_train = torch.full((len(x_train),), -1, dtype=torch.long)
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise NastyError(f"query budget must be a positive integer, got {budget!r}")
        if budget > len(x_train):
            raise NastyError(f"query budget {budget} exceeds the {len(x_train)} training images available")
        if budget < len(x_train):
            if labels_used:  # an attacker with labels keeps every class
                keep = torch.from_numpy(stratified_indices(y_train.numpy(), budget, seed + 104729))
            else:
                keep = torch.from_numpy(np.sort(rng.permutation(len(x_train))[:budget]))
            x_train, y_train = x_train[keep], y_train[keep]
    selection = "labelled validation split"
    if not labels_used:
        y_train = torch.full((len(x_train),), -1, dtype=torch.long)
        if oracles:
            votes = sum(torch.softmax(predict_logits(o, x_val), 1) for o in oracles)
            y_val = votes.argmax(1)
            selection = f"teacher agreement on {len(x_val)} held-out queries"
    if x_train is data.x_train and y_train is data.y_train and x_val is data.x_val and y_val is data.y_val:
        return data, selection
    return dataclasses.replace(data, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val), selection


THIEF_VAL_FRACTION = 0.2  # of the thief's labelled images: its validation split (at least one image per class)
_VIEWS: dict[tuple, tuple[Any, Any, str]] = {}  # the same regime of the same bundle -> the same tensors (shared passes, caches)


def thief_view(data, labelled: int, queries: int | None, kind: str):
    """The thief's regime: ``queries`` images of ``data``'s training split (default: all), of which
    ``labelled`` carry their labels and the rest are unlabelled queries. Its validation split is carved
    from the labelled images only (:data:`THIEF_VAL_FRACTION`, stratified). ``kind``: what the attack may
    train on: ``labels`` (the labelled images alone: the label-only floor), ``mixed`` (labelled images
    and unlabelled queries, ``y = -1`` on the queries) or ``queries`` (all of them, labels hidden: a
    label-free attack). Deterministic in the split seed; the same for every training seed and method."""
    import dataclasses

    import numpy as np

    pool = len(data.y_train)
    m = pool if queries is None else queries
    if isinstance(labelled, bool) or not isinstance(labelled, int) or labelled < 1:
        raise NastyError(f"--labelled must be a positive integer, got {labelled!r}")
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= pool:
        raise NastyError(f"--queries {m} exceeds the {pool} training images the thief can draw from" if isinstance(m, int) and m > pool
                         else f"--queries must be a positive integer, got {m!r}")
    if labelled >= m:
        raise NastyError(f"--labelled {labelled} must be smaller than --queries {m} (the rest are the unlabelled queries; "
                         "for a thief whose every image is labelled, drop --labelled)")
    c = data.num_classes
    if labelled < 2 * c:
        raise NastyError(f"--labelled {labelled} is too few for {c} classes: the thief needs at least {2 * c} labelled images "
                         "(a training and a validation image per class)")
    key = (id(data), labelled, m, kind)
    hit = _VIEWS.get(key)
    if hit is not None and hit[0] is data:
        return hit[1], hit[2]
    lab_train, que, val = thief_indices(data, labelled, m)
    if kind == "labels":
        idx = lab_train
    else:
        idx = np.sort(np.concatenate([lab_train, que]))
    y = data.y_train[torch.from_numpy(idx)].clone()
    if kind == "mixed":
        y[torch.from_numpy(~np.isin(idx, lab_train))] = -1
    elif kind == "queries":
        y[:] = -1
    v = torch.from_numpy(val)
    xkey = (id(data), labelled, m, kind == "labels")  # mixed and label-free views share one image tensor (one shared pass)
    xhit = _VIEWS.get(xkey)
    x = xhit[1] if xhit is not None and xhit[0] is data else data.x_train[torch.from_numpy(idx)]
    _VIEWS[xkey] = (data, x, "")
    view = dataclasses.replace(data, x_train=x, y_train=y, x_val=data.x_train[v], y_val=data.y_train[v])
    selection = f"the thief's {len(val)} labelled validation images"
    if len(_VIEWS) > 64:
        _VIEWS.clear()
    _VIEWS[key] = (data, view, selection)
    return view, selection


def thief_indices(data, labelled: int, m: int):
    """Indices into ``data``'s training split of the thief's labelled training images, its unlabelled
    queries and its (labelled) validation images; the rest of the split is never the thief's."""
    import numpy as np

    seed = int(data.info.get("split_seed", 0)) if isinstance(data.info, dict) else 0
    y_all = data.y_train.numpy()
    lab = stratified_indices(y_all, labelled, seed + 7919)
    rest = np.setdiff1d(np.arange(len(y_all)), lab)
    que = np.sort(np.random.default_rng(seed + 104729).permutation(rest)[: m - labelled])
    n_val = max(data.num_classes, int(round(THIEF_VAL_FRACTION * labelled)))
    val = lab[stratified_indices(y_all[lab], n_val, seed)]
    return np.setdiff1d(lab, val), que, val
