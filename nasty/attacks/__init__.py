"""Attack registry and ``run_attack``: the ways a thief learns from a (defended) teacher.

One module per attack; each registers a subclass of :class:`nasty.attacks.base.Attack`.
"""

from __future__ import annotations

import difflib
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import NastyError

_ATTACKS: dict[str, type] = {}


def register_attack(cls):
    if cls.name in _ATTACKS:
        raise ValueError(f"attack {cls.name} registered twice")
    _ATTACKS[cls.name] = cls
    return cls


def list_attacks() -> dict[str, str]:
    return {k: v.summary for k, v in sorted(_ATTACKS.items())}


def get_attack(name: str) -> type:
    if name not in _ATTACKS:
        close = difflib.get_close_matches(name, list(_ATTACKS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise NastyError(f"unknown attack {name!r}{hint} (known: {', '.join(sorted(_ATTACKS))})")
    return _ATTACKS[name]


def run_attack(
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
) -> tuple[nn.Module, dict]:
    """Train a student with ``method`` against ``teachers`` and score it on ``data``'s test split.

    Returns the student and a result dict (the public JSON of ``nasty attack``): ``method``,
    ``accuracy``, ``per_class_accuracy``, ``teacher_agreement``, ``resources`` and more.
    """
    from ..metrics import evaluate, predict_logits
    from .base import AttackContext, Oracle, parse_access

    cls = get_attack(method)
    attack = cls(**(params or {}))
    access, _ = parse_access(query)
    notes = []
    if cls.needs_teacher:
        if not teachers:
            raise NastyError(f"attack {method} needs a teacher checkpoint (--teacher)")
        if access not in cls.accepts:
            raise NastyError(f"attack {method} needs teacher access {' or '.join(cls.accepts)}; --query {query} does not give it")
        if access == "label" and method == "kd":
            notes.append("label-only access: KD reduces to cross-entropy on the teacher's argmax labels")
    if cls.needs_labels and not labels:
        raise NastyError(f"attack {method} needs the ground-truth labels of the attacker's data")
    oracles = [Oracle(t, query, output_defense) for t in teachers] if cls.needs_teacher else []
    ctx = AttackContext(data=data, teachers=oracles, student=student, train=train, params=attack.p,
                        run_dir=out_dir, log=log, labels_available=labels, cache_teacher=cache_teacher, x_train=x_queries)
    t0 = time.perf_counter()
    model, extra = attack.train(ctx)
    seconds = time.perf_counter() - t0
    teacher_pred = predict_logits(teachers[0], data.x_test).argmax(1) if teachers else None
    result = {
        "method": method,
        "student": student,
        "params": attack.p,
        **evaluate(model, data.x_test, data.y_test, data.num_classes, teacher_pred),
        "resources": {
            "access": query if cls.needs_teacher else "none",
            "data": data_source or data.name,
            "labels": bool(labels and cls.uses_labels),
            "train_images": int(len(x_queries) if x_queries is not None else len(data.y_train)),
            "queries": int(sum(o.queries for o in oracles)),
            "teachers": len(oracles),
            "output_defense": getattr(output_defense, "describe", lambda: None)() if output_defense else None,
        },
        "seed": train.seed,
        "train_seconds": seconds,
        "notes": notes,
        **extra,
    }
    return model, result


from . import kd, scratch  # noqa: E402,F401  (registration)
