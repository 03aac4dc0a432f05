"""``nasty attack``: one attack against one or more teacher checkpoints.

:func:`plan_attack` does everything that can fail on bad input (the method's parameters, the threat
model, the teachers, the data, the surrogate images) before a run folder exists; :func:`run_attack_plan`
trains the student into the run folder and writes ``result.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..attacks import check_requirements, get_attack, run_attack
from ..attacks.base import load_surrogate
from ..attacks.run import thief_view
from ..checkpoint import atomic_write_json
from ..config import train_config
from ..defenses.output import check_chain_for, parse_output_defense
from ..errors import NastyError
from ..resume import Checkpointing
from ..runs import data_from_config, save_model
from .common import open_teacher, teacher_normalization, thief_data


@dataclass
class AttackPlan:
    """A validated ``nasty attack``: what runs, against what, on which data."""

    cfg: dict
    method: str
    params: dict[str, Any]
    query: str
    labels: bool
    data: Any
    teachers: list[nn.Module]
    output_defense: Any = None
    x_queries: torch.Tensor | None = None
    x_val_queries: torch.Tensor | None = None
    data_source: str | None = None
    notes: list[str] | None = None


def plan_attack(cfg: dict, *, output_defense: str | None = None, labels: bool | None = None, query_given: bool = True,
                log: Callable[[str], None] = print) -> AttackPlan:
    """Check the attack of ``cfg["attack"]`` and load what it needs. ``labels``: whether the attacker holds
    labels (default: yes, no with a surrogate); ``query_given``: whether the user chose the access (a
    white-box attack then keeps the default ``logits`` from being used)."""
    a = cfg["attack"]
    post = parse_output_defense(output_defense) if output_defense else None
    cls = get_attack(a["method"])
    params = dict(a["options"])
    for k in ("temperature", "alpha"):
        if k in cls.params and k not in params:
            params[k] = a[k]
    cls(**params)  # validate the method's parameters before loading anything
    query = a["query"]
    if cls.accepts == ("weights",) and query == "logits" and not query_given:
        query = "weights"  # a checkpoint on disk is white-box access; say so in the result
        log(f"{a['method']} is a white-box attack: using --query weights")
    if a["surrogate"] and labels:
        raise NastyError("--surrogate images carry no labels of the teacher's task; drop --labels")
    labels = not a["surrogate"] if labels is None else labels
    check_requirements(cls, query=query, labels=labels, n_teachers=len(a["teacher"]), augment=a["augment"],
                       unlabelled_queries=bool(a["surrogate"]))
    norm = teacher_normalization(a["teacher"][0]) if a["teacher"] else None
    notes = []
    if a["labelled"] is not None:
        if a["surrogate"]:
            raise NastyError("--labelled splits the thief's own images into labelled ones and queries; it cannot be combined with --surrogate")
        if labels is False:
            raise NastyError("--labelled gives the thief labels on some of its images; it cannot be combined with --no-labels")
        data, note = thief_data(cfg, a["teacher"], norm)
        notes.append(note)
        thief_view(data, a["labelled"], a["queries"], "labels")  # the regime's bounds, checked before anything trains
    else:
        data = data_from_config(cfg, normalization=norm)
    teachers = [open_teacher(path, data)[0] for path in a["teacher"]]
    for t in teachers:
        check_chain_for(t, post)  # after a locked teacher: only defenses that keep its decision
    plan = AttackPlan(cfg, a["method"], params, query, labels, data, teachers, post, notes=notes)
    if a["surrogate"]:
        sur = load_surrogate(a["surrogate"], cfg["data"]["data_root"], data, val_fraction=cfg["data"]["val_fraction"],
                             split_seed=cfg["data"]["split_seed"], download=cfg["data"]["download"])
        plan.x_queries, plan.x_val_queries = sur.x_train, sur.x_val
        plan.data_source = f"{a['surrogate']} (surrogate, unlabelled)"
    return plan


def run_attack_plan(plan: AttackPlan, out: Path, log: Callable[[str], None], ck: Checkpointing = Checkpointing()) -> dict:
    """Train the planned attack's student into ``out`` (checkpoint, ``config.json``, ``result.json``)."""
    cfg, a = plan.cfg, plan.cfg["attack"]
    atomic_write_json(out / "config.json", cfg)
    student, result = run_attack(plan.method, data=plan.data, teachers=plan.teachers, student=a["student"], train=train_config(cfg),
                                 params=plan.params, query=plan.query, out_dir=out, log=log, output_defense=plan.output_defense,
                                 labels=plan.labels, x_queries=plan.x_queries, x_val_queries=plan.x_val_queries,
                                 data_source=plan.data_source, augment=a["augment"], query_budget=a["queries"], checkpointing=ck,
                                 labelled=a["labelled"])
    result["teacher"] = list(a["teacher"])
    result["notes"] = list(plan.notes or []) + result["notes"]
    save_model(out, student, plan.data, cfg, {"test": {k: result[k] for k in ("accuracy", "per_class_accuracy")}})
    atomic_write_json(out / "result.json", result)
    return result
