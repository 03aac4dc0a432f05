"""What an audit is asked for: :class:`AuditSettings` and the declaration of its knobs
(:data:`AUDIT_PARAMS`). A module of its own so that the planner (:mod:`nasty.audit.plan`) and the
analysis (:mod:`nasty.audit.analyse`) both import it without importing each other."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ..params import Param
from . import stats


# A count is bounded by what it can mean, not only by the integer limit: each seed is a training per
# attack and student, so more than this is never a request an audit can honour.
MAX_SEEDS = 1000

AUDIT_PARAMS: dict[str, Param] = {  # the request's knobs; ranges of the statistical ones live in stats.check_settings
    "attacks": Param("list[str]", ["all"], "Comma-separated attacks (see `nasty attacks`) or 'all'."),
    "students": Param("list[str]", ["mlp"], "Comma-separated student architectures."),
    "seeds": Param("int", stats.DEFAULT_SEEDS, "Training seeds per attack and student (0..N-1); fewer than 5 gives approximate "
                   "intervals, 1 unreliable ones.", lo=1, hi=MAX_SEEDS),
    "reference": Param("str?", None, "An undefended teacher of the same task, attacked the same way."),
    "query": Param("str", "logits", "What the teacher exposes: logits, probs, topk:K, label, weights."),
    "surrogate": Param("str?", None, "Label-free attacks (copycat, knockoff) query the teacher on this dataset's images."),
    "queries": Param("int?", None, "Query budget of the label-free attacks (a fixed seeded subset of their images); with "
                     "--labelled, the images every thief holds.", lambda v: v >= 1, "at least 1"),
    "labelled": Param("int?", None, "The thief's regime: LABELLED of the --queries images carry labels, the rest are unlabelled "
                      "queries (every attack and baseline; validation from the labelled ones; images the teacher never saw when "
                      "its checkpoint says it trained on a subset). Attacks tune their settings (alpha, T, ...) and their epoch; "
                      "the hard-label floor its label smoothing.",
                      lambda v: v >= 1, "at least 1"),
    "output_defense": Param("str?", None, "The teacher answers through this output defense, e.g. topk:2 or reverse-sigmoid "
                            "(not the reference)."),
    "first_seed": Param("int", 0, "Training seeds are FIRST..FIRST+SEEDS-1.", lambda v: v >= 0, ">= 0"),
    "baselines_from": Param("list[str]", [], "Reuse the baseline runs of another audit of the same task (checked run by run; "
                            "repeatable).", repeat=True),
    "fuse": Param("bool", True, "Train the single-pass attacks of one seed together, in one pass over the data."),
    "margin": Param("float", 0.0, "Gain rule: tested gain > MARGIN points over both baselines, in [-100, 100)."),
    "fidelity": Param("float", 0.9, "Fidelity rule (label-free attacks): fraction of the teacher's class accuracy."),
    "fail_on": Param("int?", None, "Exit 1 when an attack transfers more than N classes.", lambda v: v >= 0, ">= 0"),
    "correction": Param("str", "holm", "Multiple-comparison control over every test the gate reads: all attacks, classes and "
                        "students of a target, and the pooled tests (Holm: family-wise; bh: false discovery rate).",
                        choices=stats.CORRECTIONS),
    "power": Param("float", 0.8, "Power at which the detectable gain of an untransferred class is reported."),
    "safe_below": Param("float?", None, "A class not transferred is 'safe at this power' only when its detectable gain is "
                        "below this (points)."),
    "resolution": Param("float", 3.0, "Smallest pooled leak (points of overall gain) the audit must be able to find at "
                        "--power; above it the report says the audit cannot show protection at this size.",
                        lambda v: 0 < v <= 100, "a number of points in (0, 100]"),
}


def _default(key: str) -> Any:
    return field(default_factory=lambda: copy.deepcopy(AUDIT_PARAMS[key].default))


@dataclass
class AuditSettings:
    """What the user asked for (the CLI builds this; defaults and checks from :data:`AUDIT_PARAMS`)."""

    teacher: str
    cfg: dict  # resolved nasty config (its [data] and [train] sections are used)
    attacks: list[str] = _default("attacks")
    students: list[str] = _default("students")
    seeds: int = _default("seeds")
    reference: str | None = _default("reference")
    query: str = _default("query")
    margin: float = _default("margin")
    fidelity: float = _default("fidelity")
    fail_on: int | None = _default("fail_on")
    n_boot: int | None = None  # unused since schema 2 (the intervals are analytic); kept so old callers still work
    correction: str = _default("correction")
    power: float = _default("power")
    safe_below: float | None = _default("safe_below")
    resolution: float = _default("resolution")
    params: dict[str, dict] = field(default_factory=dict)  # attack -> parameter overrides
    surrogate: str | None = _default("surrogate")
    queries: int | None = _default("queries")
    labelled: int | None = _default("labelled")
    output_defense: str | None = _default("output_defense")
    fuse: bool = _default("fuse")
    first_seed: int = _default("first_seed")
    baselines_from: list[str] = _default("baselines_from")
    reuse_label_only: bool = True  # TLLM's preliminary label-only student is the audit's label-only baseline (same run)

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))
