"""``audit.json``: the versioned, public result of ``nasty audit`` (the Markdown and HTML are rendered from it).

Schema ``nasty-audit``, version 3 (versions 2, with the correction per attack and no pooled test, and 1,
with bootstrap intervals and no p-values, are still read and rendered). Top-level fields:

- ``schema`` = ``"nasty-audit"``, ``schema_version`` = 2, ``created``, ``versions`` (package versions);
- ``status``: ``"complete"`` or ``"incomplete"`` (then ``problems`` lists why); ``notes``;
- ``config``: teacher and reference checkpoints with their SHA-256, data and training settings, ``query``,
  ``output_defense`` (the teacher's, or null),
  ``data_sha256`` (the dataset's contents), ``attacks``, ``students``, ``seeds``, ``margin``, ``fidelity``, ``fail_on``,
  ``statistics`` (v2: ``method``, ``level``, ``alpha``, ``correction`` = ``holm`` | ``bh`` | ``none``,
  ``correction_name``, ``power``, ``safe_below``, ``intervals`` = ``ok`` | ``approximate`` | ``unreliable``,
  ``recommended_seeds``; v3 adds ``family`` = ``"target"`` (one correction over every test of a target),
  ``pooled_share`` and ``resolution``; v1 had ``bootstrap`` instead);
- ``method``: the statistical method in words (``gain``, ``fidelity``, ``pooled`` (v3), ``interval``, ``test``,
  ``correction``, ``decision``, ``power``);
- ``dataset``: ``name``, ``classes``, ``test_size``, ``test_per_class``, ``train_images``, and (added within v3, in
  the thief's regime) ``thief``: ``images`` (what every thief holds), ``labelled`` (of them) and ``pool`` (the
  training images they are drawn from);
- ``baselines``: ``{"scratch"|"label-smoothing": {student: {accuracy, accuracy_sd, accuracy_per_seed,
  per_class_accuracy}}}``;
- ``targets``: ``{"teacher": T, "reference": T}`` (reference only with ``--reference``), where ``T`` has
  ``checkpoint``, ``accuracy``, ``per_class_accuracy`` (as deployed: behind the output defense, if any),
  ``defense`` (``training``: the training-time defense and its parameters from the checkpoint, or null;
  ``output``: the output defense the answers pass through, or null), ``quality`` (added within v3; older
  files lack it: what the served probabilities, as deployed, give a user on the test split: ``top1`` and ``top5``
  (percent, ties broken at random), ``ece`` (percent, 15 bins) and ``nll`` (nats, the true class's probability
  clipped at 1e-12); :func:`nasty.metrics.quality_of_probabilities`) and ``attacks``: ``{name: A}``;
- ``A`` (one attack, **the stable interface**): ``method`` (attack name), ``rule`` (``"gain"`` or
  ``"fidelity"``), ``threshold`` (text), ``status`` (``"ok"``, ``"skipped"``, ``"failed"``), ``reason``,
  ``transferred_classes`` (class indices, union over students), ``transferred_count``, ``num_classes``,
  ``assumes`` (text), ``params``, ``correction`` and ``family_size`` (v2: the tests the correction ran over; v3: every
  test of the target), ``pooled`` (v3, required when ``status`` is ``ok``: ``student``, ``rule``, ``gain``, ``ci_low``,
  ``ci_high``, ``p``, ``p_adjusted``, ``transferred``, ``detectable_gain`` (points; null under the fidelity rule, which
  gives ``fidelity``, ``fidelity_ci``, ``detectable_fidelity``), ``resolution`` and ``resolution_ok`` (the pooled
  detectable gain is at most ``resolution``; null under the fidelity rule)),
  ``undistillable_classes`` (TLLM only), ``skipped_students``
  (``{student: reason}`` for students the attack cannot use) and ``students``:
  ``{student: {accuracy, accuracy_sd, accuracy_per_seed, teacher_agreement, per_class_accuracy,
  transferred_classes, transferred_count, classes: [per-class rows], pooled: a row over all test images (v3)}}``;
- a per-class row: ``class``, ``n``, ``accuracy``, ``baseline`` (``scratch`` or ``label-smoothing``: the
  better one for that class), ``baseline_accuracy``, ``baseline_accuracies``, ``gain``, ``gain_ci`` ([lo, hi]),
  ``teacher_accuracy``, ``fidelity``, ``fidelity_ci``, ``transferred``; v2 adds ``p_value`` (one-sided, of
  "gain > margin" or "fidelity > threshold"), ``p_adjusted`` (after the attack's correction), ``se`` and ``df``
  (of the decisive comparison), ``tests`` (per baseline: ``gain``, ``se``, ``df``, ``p_value``), ``interval``
  (``ok``, ``approximate`` or ``unreliable``), ``detectable`` (classes not transferred: the smallest gain in
  points -- fidelity rule: the smallest fidelity -- found with the configured power; else null) and ``safe``
  (gain rule with ``--safe-below``: detectable below it; else null). Accuracies and gains are in percent
  (points); fidelity is a ratio;
- ``defense_effect`` (with a reference): per attack ``protected_classes`` (transferred from the reference,
  not from the teacher), ``still_transferred``, ``newly_transferred``;
- ``gate``: ``fail_on``, ``failed``, ``failing_attacks`` (v3: an attack fails with more than ``fail_on`` transferred
  classes, a pooled transfer counting as at least one);
- ``runtime``: ``seconds``, ``runs_trained``, ``runs_reused``, ``teacher_samples_run`` (every sample the
  teachers processed), ``teacher_samples_cached`` (of which through the shared cache), ``teacher_cache_hits``,
  ``label_only_runs_reused`` (TLLM preliminary label-only runs taken from the label-only baseline, v2).

Readers must check ``schema_version``; fields are only ever added within a version. Version 2 changed the
meaning of ``gain_ci`` (t-interval, see :mod:`nasty.audit.stats`) and of ``transferred`` (after the correction);
version 3 that of ``p_adjusted`` and ``transferred`` (one correction over every attack's tests, pooled tests included).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import NastyError

SCHEMA = "nasty-audit"
SCHEMA_VERSION = 3

_TOP = {"schema": str, "schema_version": int, "status": str, "config": dict, "dataset": dict, "baselines": dict,
        "targets": dict, "gate": dict, "method": dict}
_ATTACK = {"method": str, "rule": str, "status": str, "transferred_classes": list, "transferred_count": int, "students": dict}
_ROW = ("class", "accuracy", "baseline", "gain", "gain_ci", "teacher_accuracy", "fidelity", "fidelity_ci", "transferred")
_ROW_V2 = ("p_value", "p_adjusted", "detectable", "safe", "interval")
QUALITY = ("top1", "top5", "ece", "nll")  # targets.*.quality (optional within v3)
_POOLED = ("gain", "ci_low", "ci_high", "p", "p_adjusted", "transferred", "detectable_gain", "resolution_ok")


def validate(obj: object, where: str = "audit.json") -> dict:
    """Check the structure of an audit object; raise :class:`NastyError` naming the first problem."""
    if not isinstance(obj, dict):
        raise NastyError(f"{where}: not a JSON object")
    if obj.get("schema") != SCHEMA:
        raise NastyError(f"{where}: not a nasty audit (schema {obj.get('schema')!r}, expected {SCHEMA!r})")
    ver = obj.get("schema_version")
    if not isinstance(ver, int) or ver > SCHEMA_VERSION or ver < 1:
        raise NastyError(f"{where}: schema version {ver!r} is not supported (this nasty reads 1..{SCHEMA_VERSION})")
    for k, t in _TOP.items():
        if not isinstance(obj.get(k), t):
            raise NastyError(f"{where}: field {k!r} missing or not a {t.__name__}")
    classes = obj["dataset"].get("classes")
    if not isinstance(classes, list) or not classes:
        raise NastyError(f"{where}: dataset.classes missing")
    thief = obj["dataset"].get("thief")
    if thief is not None and not (isinstance(thief, dict) and all(isinstance(thief.get(k), int) and not isinstance(thief.get(k), bool)
                                                                   for k in ("images", "labelled", "pool"))):
        raise NastyError(f"{where}: dataset.thief must give images, labelled and pool as integers")
    if "teacher" not in obj["targets"]:
        raise NastyError(f"{where}: targets.teacher missing")
    for g, tgt in obj["targets"].items():
        if not isinstance(tgt, dict) or not isinstance(tgt.get("attacks"), dict):
            raise NastyError(f"{where}: targets.{g}.attacks missing")
        if not isinstance(tgt.get("per_class_accuracy"), list) or len(tgt["per_class_accuracy"]) != len(classes):
            raise NastyError(f"{where}: targets.{g}.per_class_accuracy must have one entry per class")
        q = tgt.get("quality")
        if q is not None and not (isinstance(q, dict) and all(_is_number(q.get(k)) for k in QUALITY)):
            raise NastyError(f"{where}: targets.{g}.quality must give {', '.join(QUALITY)} as numbers")
        for a, att in tgt["attacks"].items():
            w = f"{where}: targets.{g}.attacks.{a}"
            for k, t in _ATTACK.items():
                if not isinstance(att.get(k), t) or (t is int and isinstance(att.get(k), bool)):
                    raise NastyError(f"{w}.{k} missing or not a {t.__name__}")
            if att["status"] not in ("ok", "skipped", "failed"):
                raise NastyError(f"{w}.status must be ok, skipped or failed")
            if ver >= 3 and att["status"] == "ok":
                pooled = att.get("pooled")
                if not isinstance(pooled, dict) or any(k not in pooled for k in _POOLED):
                    raise NastyError(f"{w}.pooled missing or incomplete (schema 3 needs {', '.join(_POOLED)})")
            if att["transferred_count"] != len(att["transferred_classes"]):
                raise NastyError(f"{w}: transferred_count disagrees with transferred_classes")
            if not all(isinstance(c, int) and 0 <= c < len(classes) for c in att["transferred_classes"]):
                raise NastyError(f"{w}.transferred_classes must be class indices")
            for st, row in att["students"].items():
                rows = row.get("classes") if isinstance(row, dict) else None
                if not isinstance(rows, list) or len(rows) != len(classes):
                    raise NastyError(f"{w}.students.{st}.classes must have one row per class")
                for r in rows:
                    missing = [k for k in (*_ROW, *(_ROW_V2 if ver >= 2 else ())) if k not in r]
                    if missing:
                        raise NastyError(f"{w}.students.{st}: class row lacks {missing[0]!r}")
    return obj


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_audit(path: str | Path) -> dict:
    """Read and validate an ``audit.json``."""
    p = Path(path)
    if p.is_dir():
        p = p / "audit.json"
    if not p.is_file():
        raise NastyError(f"audit file not found: {p}")
    try:
        obj = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NastyError(f"{p}: not valid JSON ({e})") from None
    return validate(obj, str(p))
