"""``nasty train-defended``: adversary (loaded or trained) -> defended teacher -> KD probe -> verdict.

Stages: check the settings (before anything trains) -> the normal adversaries (given checkpoints or
trained here) -> one defended candidate per strength (a nasty head on the normal model's features, a
nasty network beside it, or the paper's single network) -> the strength chosen on the validation
split by plain KD and the adaptive re-head attack (:func:`choose_strength`; the test split is never
read) -> the KD probe -> ``result.json`` with the verdict.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..attacks import run_attack
from ..checkpoint import atomic_write_json, read_sidecar
from ..config import train_config
from ..data import stratified_indices
from ..defenses import PAPER_OMEGA, get_defense, parse_output_defense, split_model_specs
from ..defenses.lock import LOCK_PARAMS, TUNING_ATTACKS, assemble, describe_lock, lock_summary, train_head
from ..defenses.selective import split_accuracy
from ..errors import NastyError
from ..metrics import quality_of_probabilities, served_cmi, served_probabilities, served_quality
from ..models import model_spec, parse_model_spec
from ..models.served import check_keep_classes, parse_keep
from ..registry import slug
from ..resume import Checkpointing
from ..runs import data_from_config, new_model, save_model, test_metrics, train_normal
from ..train import Frozen, fit, seed_everything
from .common import normalization, open_teacher
from .leakage import StudentRuns, best_attack, measure, thief_pool
from .probe import run_probe, verdict_text


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_defended(cfg: dict, out: Path, log: Callable[[str], None] = _log, ck: Checkpointing = Checkpointing()) -> dict:
    """Adversary (loaded or trained) -> defended teacher (locked to the normal model's decisions unless
    ``lock = "none"``; strength chosen on validation unless ``omega`` is set) -> KD probe -> verdict
    (also ``result.json``). ``ck``: whether each training saves its state and resumes from it."""
    dcfg = cfg["defense"]
    check_lock_config(cfg)
    _check_adversary_specs(cfg)
    defense_cls = get_defense(dcfg["name"])
    omegas = [dcfg["omega"]] if dcfg["omega"] is not None else (list(dcfg["omega_grid"]) if dcfg["lock"] != "none" else [PAPER_OMEGA])
    data = data_from_config(cfg, normalization=_checkpoint_normalization(dcfg))
    defense_cls({**dcfg, "omega": omegas[0]}, data)  # validate before anything trains
    if dcfg["lock"] != "none":
        try:
            check_keep_classes(dcfg["keep"], data.num_classes)
        except ValueError as e:
            raise NastyError(str(e)) from None
    atomic_write_json(out / "config.json", cfg)
    adversaries, normal_test = _adversaries(cfg, data, out, log, ck)
    calibration, calibration_note = calibration_split(cfg, data)
    if calibration_note:
        log(f"[lock] {calibration_note}")
    candidates = [_candidate(defense_cls, omega, len(omegas) > 1, cfg, data, adversaries, out, log, ck, calibration) for omega in omegas]
    best, tuning, students = 0, None, StudentRuns()
    if len(candidates) > 1:
        best, tuning = choose_strength([(c[0], c[1]) for c in candidates], cfg, data, out, log, ck, students)
        log(f"[tune] chose omega={candidates[best][0]:g} on the validation split")
    omega, teacher, info, defense, seconds = candidates[best]
    if dcfg["lock"] != "none":
        info = {**info, "lock": {**lock_summary(teacher), **({"calibration": calibration_note} if calibration_note else {})}}
    if tuning is not None:
        info = {**info, "tuning": tuning}
    defended_test = test_metrics(teacher, data)
    metrics = {"test": defended_test, "best_epoch": info.get("selected_epoch"), "val_accuracy": info.get("val_accuracy"),
               "train_seconds": seconds}
    save_model(out / "defended", teacher, data, cfg, metrics,
               extra={"defense": {"name": defense.name, **{k: v for k, v in dcfg.items() if k != "train"}, "omega": omega},
                      "adversaries": [p for _, p in adversaries], "defense_info": info})
    normal = adversaries[0][0]
    result: dict[str, Any] = {
        "normal_accuracy": normal_test["accuracy"],
        "defended_accuracy": defended_test["accuracy"],
        "accuracy_drop": normal_test["accuracy"] - defended_test["accuracy"],
        "normal_per_class_accuracy": normal_test["per_class_accuracy"],
        "defended_per_class_accuracy": defended_test["per_class_accuracy"],
        **served_utility(normal, teacher, data),
        "validation_cmi": {"normal": served_cmi(normal, data.x_val, data.y_val), "defended": served_cmi(teacher, data.x_val, data.y_val)},
        "defense": defense.name,
        "lock": dcfg["lock"],
        "omega": omega,
        "defended_checkpoint": str(out / "defended"),
        "normal_checkpoint": adversaries[0][1],
        "train_seconds": seconds,
        "defense_info": info,
        "probe": None,
    }
    if getattr(defense, "protected", None):
        result["protected_classes"] = [data.classes[c] for c in defense.protected]
        result["normal_split_accuracy"] = split_accuracy(normal_test, defense.protected)
        result["defended_split_accuracy"] = split_accuracy(defended_test, defense.protected)
    if cfg["probe"]["enabled"]:
        result["probe"] = run_probe(cfg, data, normal, teacher, out / "probe", log, ck, students)
    result["verdict"] = verdict_text(result)
    atomic_write_json(out / "result.json", result)
    return result


REFERENCES = {"labels_only": "label", "template": "template"}  # reference outputs served over the normal model (output defenses, defaults)


def served_utility(normal: nn.Module, teacher: nn.Module, data) -> dict[str, dict]:
    """What the served probabilities give a legitimate user on the test split (:func:`nasty.metrics.quality_of_probabilities`:
    top-1, top-5, ECE, NLL), for the normal and the defended teacher and two references over the normal model:
    labels only (the one-hot of its decision) and the class template (its decision mapped to one fixed soft
    vector per class), which say nothing beyond the decision (one pass of the normal model serves all three)."""
    p = served_probabilities(normal, data.x_test)
    out = {"normal_quality": quality_of_probabilities(p, data.y_test),
           "defended_quality": served_quality(teacher, data.x_test, data.y_test)}
    for k, spec in REFERENCES.items():
        out[f"{k}_quality"] = quality_of_probabilities(parse_output_defense(spec)(p), data.y_test)
    return out


def _checkpoint_normalization(dcfg: dict) -> tuple[list[float], list[float]] | None:
    """Checkpoints fix the normalisation: the first adversary's (or the init checkpoint's) wins. A locked
    checkpoint is refused here: an adversary or an init must be a plain model."""
    norm = None
    for i, path in enumerate([*dcfg["adversary"], *([dcfg["init_from"]] if dcfg["init_from"] not in (None, "adversary") else [])]):
        _, side = read_sidecar(path)
        what = describe_lock(side)
        if what:
            raise NastyError(f"{path} is {what}, not a normal model; pass the normal model it was built from")
        if i == 0:
            norm = normalization(side)
    return norm


def _adversaries(cfg: dict, data, out: Path, log: Callable[[str], None], ck: Checkpointing) -> tuple[list[tuple[nn.Module, str]], dict]:
    """The normal adversaries (loaded, or trained here; the first is the normal reference) and the first one's test metrics."""
    dcfg = cfg["defense"]
    adversaries = []
    if dcfg["adversary"]:
        for path in dcfg["adversary"]:
            model, _ = open_teacher(path, data, "adversary")
            adversaries.append((model, str(path)))
        adversaries = _decision_first(cfg, adversaries, [_spec_of(m) for m, _ in adversaries], log)
        return adversaries, test_metrics(adversaries[0][0], data)
    normal_test: dict = {}
    specs = split_model_specs(dcfg["adversary_model"]) or [cfg["model"]["name"]]
    specs = _decision_first(cfg, specs, [parse_model_spec(s) for s in specs], log)
    for i, spec in enumerate(specs):
        log(f"[nasty] no --adversary given: training a normal {spec} first")
        adv_dir = out / ("normal" if i == 0 else f"normal-{i}-{slug(spec, '')}")
        model, metrics = train_normal(cfg, data, adv_dir, model_spec=spec, log=log, desc=f"normal:{spec}", ck=ck)
        adversaries.append((model, str(adv_dir)))
        if i == 0:
            normal_test = metrics["test"]
    return adversaries, normal_test


def calibration_split(cfg: dict, data) -> tuple[tuple | None, str | None]:
    """Where ``keep = "confidence:bins=B"`` fits its bins, and a note saying so: the owner's held-out images
    (:func:`owner_holdout`: never trained on, never used to pick an epoch) when the teacher trained on a
    ``train_subset``, else the validation split, which picked the normal model's epoch, so the accuracy it
    shows is optimistic (on digits, 70 images: 100% where the test split gives 97.2%). ``(None, None)`` for
    the kinds without bins."""
    dcfg = cfg["defense"]
    if dcfg["lock"] == "none" or parse_keep(dcfg["keep"]).bins is None:
        return None, None
    pool, _ = thief_pool(cfg, data)
    x, y = owner_holdout(cfg, pool, data)
    if x is data.x_val:
        return None, (f"calibration bins fitted on the validation split ({len(y)} images; it also picked the normal model's "
                      "epoch, so its accuracy there is optimistic)")
    return (x, y), f"calibration bins fitted on {len(y)} held-out images the teacher never trained on (not the test split)"


def _candidate(defense_cls, omega: float, several: bool, cfg: dict, data, adversaries: list, out: Path, log: Callable[[str], None],
               ck: Checkpointing, calibration: tuple | None = None) -> tuple[float, nn.Module, dict, Any, float | None]:
    """The served teacher defended at strength ``omega``: ``(omega, served model, facts, defense, seconds)``."""
    dcfg, lock = cfg["defense"], cfg["defense"]["lock"]
    normal = adversaries[0][0]
    defense = defense_cls({**dcfg, "omega": omega}, data, reference_curve=validation_curve(adversaries[0][1]), log=log)
    run_dir = out / "defended" / f"omega{omega:g}" if several else out / "defended"
    if lock == "two-head":
        tseed = train_config(cfg, dcfg["train"])
        head, info = train_head(defense, normal, [m for m, _ in adversaries], data, defense.cfg, tseed.seed, tseed.deterministic,
                                run_dir, log, ck, calibration)
        return omega, assemble(normal, head, data, "two-head", defense.cfg, calibration), info, defense, None
    net, info, res = _train_network(defense, cfg, data, adversaries, run_dir, log, ck)
    served = net if lock == "none" else assemble(normal, net, data, "two-net", defense.cfg, calibration)
    info = {**info, "selected_epoch": info.get("selected_epoch", res.best_epoch), "val_accuracy": info.get("val_accuracy", res.best_val_accuracy)}
    return omega, served, info, defense, res.seconds


def _train_network(defense, cfg: dict, data, adversaries: list, run_dir: Path, log, ck: Checkpointing) -> tuple[Any, dict, Any]:
    """The nasty network of ``--lock none`` (served alone) or ``two-net`` (locked afterwards)."""
    dcfg = defense.cfg
    init = dcfg["init_from"]
    tcfg = train_config(cfg, dcfg["train"])
    seed_everything(tcfg.seed, tcfg.deterministic)
    if init is None:
        teacher = new_model(cfg["model"]["name"], data)
    else:
        path = _matching_adversary(cfg, adversaries) if init == "adversary" else init
        teacher, _ = open_teacher(path, data, "--init-from")
        teacher.train()
        for p in teacher.parameters():
            p.requires_grad_(True)
    tcfg = defense.train_config(tcfg)
    frozen = [Frozen(m, len(data.y_train)) for m, _ in adversaries]
    res = fit(teacher, defense.objective(frozen), data, tcfg, run_dir=run_dir, desc=f"defended:{defense.name}", log=log, **ck.fit_args())
    info = defense.finish(teacher)
    return teacher, info, res


def validation_curve(checkpoint: str | Path) -> list[float] | None:
    """Per-epoch validation accuracy of the run that trained ``checkpoint`` (its ``metrics.jsonl``), if kept."""
    p = Path(checkpoint)
    f = (p if p.is_dir() else p.parent) / "metrics.jsonl"
    try:
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        curve = [float(r["val_accuracy"]) for r in rows]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return curve or None


def _matching_adversary(cfg: dict, adversaries: list) -> str:
    """``--init-from adversary``: the adversary of the defended model's own architecture (never another one)."""
    name, kwargs = parse_model_spec(cfg["model"]["name"])
    for model, path in adversaries:
        spec = model_spec(model)
        if spec["name"] == name and spec["kwargs"] == kwargs:
            return path
    raise NastyError(f"--init-from adversary: no adversary is a {cfg['model']['name']} (adversaries: "
                     f"{', '.join(model_spec(m)['name'] for m, _ in adversaries)}); pass --init-from CKPT or list {cfg['model']['name']} among the adversaries")


def _spec_of(model: nn.Module) -> tuple[str, dict]:
    spec = model_spec(model)
    return spec["name"], spec["kwargs"]


def _decision_first(cfg: dict, items: list, specs: list[tuple[str, dict]], log: Callable[[str], None]) -> list:
    """The adversaries (``items``, of architectures ``specs``) reordered so that the first, which is the
    normal reference and the decision model of a locked teacher, is the one whose architecture is
    ``--model`` when one is (the others keep their order). The one place that says which model decides:
    adversaries still to be trained are checked before training (:func:`_check_adversary_specs`); when
    none of the given checkpoints is a ``--model``, the first one decides and the log says so."""
    want = parse_model_spec(cfg["model"]["name"])
    i = next((k for k, s in enumerate(specs) if s == want), None)
    if i is None:
        if cfg["defense"]["lock"] != "none":
            log(f"[nasty] no adversary is a {cfg['model']['name']} (--model): the locked teacher decides with the first one, "
                f"{_describe_spec(specs[0])}")
        return list(items)
    if cfg["defense"]["lock"] != "none" and len(items) > 1:
        log(f"[nasty] the locked teacher decides with the adversary that is a {cfg['model']['name']} (--model)")
    return [items[i], *items[:i], *items[i + 1:]]


def _describe_spec(spec: tuple[str, dict]) -> str:
    name, kwargs = spec
    return name + "".join(f":{k}={v}" for k, v in kwargs.items())


def _check_adversary_specs(cfg: dict) -> None:
    """Before anything trains: with a lock, adversaries trained here must include ``--model``'s architecture
    (the locked teacher's decision model, see :func:`_decision_first`); ``--init-from adversary`` with
    adversaries still to be trained: one of them must be the defended architecture."""
    dcfg = cfg["defense"]
    if dcfg["lock"] != "none" and not dcfg["adversary"]:
        specs = split_model_specs(dcfg["adversary_model"]) or [cfg["model"]["name"]]
        if parse_model_spec(cfg["model"]["name"]) not in [parse_model_spec(s) for s in specs]:
            raise NastyError(f"--lock {dcfg['lock']}: the locked teacher decides with a normal {cfg['model']['name']} (--model), "
                             f"and no adversary of --adversary-model {dcfg['adversary_model']} is one; add {cfg['model']['name']} "
                             "to --adversary-model (or use --lock none)")
    if dcfg["init_from"] != "adversary" or dcfg["adversary"] or dcfg["lock"] == "two-head":
        return
    specs = split_model_specs(dcfg["adversary_model"]) or [cfg["model"]["name"]]
    if parse_model_spec(cfg["model"]["name"]) not in [parse_model_spec(s) for s in specs]:
        raise NastyError(f"--init-from adversary: no adversary is a {cfg['model']['name']} (--adversary-model {dcfg['adversary_model']}); "
                         f"add {cfg['model']['name']} to --adversary-model or drop --init-from")


def check_lock_config(cfg: dict) -> None:
    """Settings a lock cannot honour, refused before anything trains."""
    d = cfg["defense"]
    if d["lock"] == "none":
        if d["keep"] != LOCK_PARAMS["keep"].default:  # the default is simply not used without a lock
            raise NastyError(f"--keep {d['keep']} sets what a locked teacher serves; --lock none serves the nasty network alone")
        return
    if d["name"] == "budget":
        raise NastyError("--defense budget bounds the teacher's accuracy cost, which a decision lock already makes zero; "
                         "use it with --lock none")
    if d["lock"] == "two-head" and d["init_from"] not in (None, "adversary"):
        raise NastyError("--init-from CKPT fine-tunes a nasty network; with --lock two-head the nasty part is a new head "
                         "(use --lock two-net or --lock none to fine-tune a network)")
    if d["omega"] is None and not d["omega_grid"]:
        raise NastyError("omega_grid is empty: give --omega or at least one value in --omega-grid")
    if d["omega"] is None and len(d["omega_grid"]) > 1 and not cfg["probe"]["students"]:
        raise NastyError("choosing omega on validation needs probe students (probe.students)")


def tuning_data(data, n: int | None, split_seed: int):
    """Students train on a stratified subset of the teacher's training split (their own val split
    carved from it) and are scored on the teacher's validation split: the test split is never read."""
    y = data.y_train.numpy()
    keep = stratified_indices(y, min(n, len(y)), split_seed + 2) if n is not None and n < len(y) else torch.arange(len(y)).numpy()
    xs, ys = data.x_train[keep], data.y_train[keep]
    val = stratified_indices(ys.numpy(), 0.1, split_seed)
    mask = torch.zeros(len(ys), dtype=torch.bool)
    mask[torch.as_tensor(val)] = True
    return dataclasses.replace(data, x_train=xs[~mask], y_train=ys[~mask], x_val=xs[mask], y_val=ys[mask],
                               x_test=data.x_val, y_test=data.y_val)


def choose_strength(candidates: list[tuple[float, nn.Module]], cfg: dict, data, out: Path | None,
                    log: Callable[[str], None], ck: Checkpointing, students: StudentRuns | None = None) -> tuple[int, list[dict]]:
    """Index of the candidate whose KD probe on the validation split gains least over labels (worst
    probe student), and the table behind the choice. In the thief's regime (``probe.labelled``) the
    choice is by leakage: :func:`choose_by_leakage`."""
    p = cfg["probe"]
    if p["labelled"] is not None:
        return choose_by_leakage(candidates, cfg, data, out, log, ck, students=students)
    tdata = tuning_data(data, p["train_subset"], cfg["data"]["split_seed"])
    tcfg = train_config(cfg, p["train"])
    params = {"temperature": p["temperature"], "alpha": p["alpha"]}
    scratch = {}
    for s in p["students"]:
        _, r = run_attack("scratch", data=tdata, teachers=[], student=s, train=tcfg, params={},
                          out_dir=None if out is None else out / "tune" / slug(s) / "scratch", log=log,
                          checkpointing=ck)
        scratch[s] = r["accuracy"]
    table = []
    for omega, teacher in candidates:
        gains: dict[str, dict[str, float]] = {}
        for method in TUNING_ATTACKS:
            gains[method] = {}
            for s in p["students"]:
                _, r = run_attack(method, data=tdata, teachers=[teacher], student=s, train=tcfg, params=params,
                                  out_dir=None if out is None else out / "tune" / slug(s) / f"{method}-omega{omega:g}", log=log,
                                  checkpointing=ck)
                gains[method][s] = r["accuracy"] - scratch[s]
        row = {"omega": omega, "val_gain": gains, "worst_gain": max(g for m in gains.values() for g in m.values())}
        table.append(row)
        log(f"[tune] omega={omega:g}: validation gain over labels " +
            "; ".join(f"{m} " + ", ".join(f"{s} {g:+.2f}" for s, g in gm.items()) for m, gm in gains.items()))
    best = min(range(len(table)), key=lambda i: (table[i]["worst_gain"], table[i]["omega"]))
    return best, table


def choose_by_leakage(candidates: list[tuple[float, nn.Module]], cfg: dict, data, out: Path | None, log: Callable[[str], None],
                      ck: Checkpointing, normal: nn.Module | None = None, students: StudentRuns | None = None) -> tuple[int, list[dict]]:
    """The strength by leakage, not by harm: the thief's students (``probe.labelled`` of ``probe.queries``
    images from the thief's pool, ``probe.seeds`` seeds; plain KD and the adaptive re-head attack, each
    tuning itself: :data:`TUNING_ATTACKS`; the probe afterwards runs every probe attack) are scored on
    the owner's held-out images: the thief pool's images this thief does not hold (the teacher, the
    defense and the thief never trained on them), else the teacher's validation split; never the test
    split. A candidate's score is, for its worst probe student, the best
    attack's mean gain over the best floor of the seed, clipped at 0; among the candidates whose score is within
    noise of the best (1.96 standard errors of the difference) the smallest omega wins: the least
    distortion that leaks no more. The candidates are measured from the smallest omega up, and the first
    that leaks nothing (score 0) ends the search: no candidate can score lower and the others are larger, so
    the rule would pick it whatever they score. ``students``: the trained students are kept there with their predictions
    on the test images (their labels are not read here), so that the probe reuses the floors and the
    chosen strength's students instead of training them again."""
    p = cfg["probe"]
    pool, note = thief_pool(cfg, data)
    log(f"[tune] {note}")
    holdout = owner_holdout(cfg, pool, data)
    students = StudentRuns() if students is None else students  # the floors train once for every candidate
    table: list[dict | None] = [None] * len(candidates)
    failed: list[str] = []
    for i in sorted(range(len(candidates)), key=lambda i: candidates[i][0]):  # the weakest strength first
        omega, teacher = candidates[i]
        key = f"omega={omega:g}"
        res = measure(cfg, pool, {key: teacher}, {key: list(TUNING_ATTACKS)}, score_on=holdout,
                      seeds=list(range(cfg["train"]["seed"], cfg["train"]["seed"] + p["seeds"])), out=None if out is None else out / "tune",
                      log=log, ck=ck, runs=students, also={"test": pool.x_test} if getattr(pool, "x_test", None) is not None else None)
        failed += res["failed"]
        worst = None
        for s in p["students"]:
            name, b = best_attack(res["leakage"][key][s])
            if b is None:
                continue
            score, se = max(0.0, b["mean"]), (b["sd"] / b["n"] ** 0.5 if b["n"] > 1 else float("inf"))
            if worst is None or score > worst["score"]:
                worst = {"score": score, "se": se, "student": s, "attack": name, "mean": b["mean"]}
        table[i] = {"omega": omega, "leakage": res["leakage"][key], **(worst or {"score": float("inf"), "se": float("inf")})}
        log(f"[tune] omega={omega:g}: score {table[i]['score']:+.2f} (best attack {table[i].get('attack')} on {table[i].get('student')})")
        if table[i]["score"] == 0.0:
            # no attack gains over the floors: nothing can score lower, and every stronger candidate is larger,
            # so the rule below picks this one whatever they score; they are not trained
            for j, (o, _) in enumerate(candidates):
                if table[j] is None:
                    table[j] = {"omega": o, "score": None, "skipped": f"not measured: omega={omega:g} already leaks nothing"}
            break
    scored = [i for i, r in enumerate(table) if r is not None and r["score"] is not None]
    best = min(scored, key=lambda i: (table[i]["score"], table[i]["omega"]))
    near = [i for i in scored
            if table[i]["score"] - table[best]["score"] <= 1.96 * (table[i]["se"] ** 2 + table[best]["se"] ** 2) ** 0.5]
    pick = min(near, key=lambda i: table[i]["omega"])
    for i in scored:
        table[i]["within_noise_of_best"] = i in near
    if failed:
        log(f"[tune] {len(failed)} runs failed (not scored); first: {failed[0]}")
    return pick, table


def owner_holdout(cfg: dict, pool, data) -> tuple:
    """Images the owner may score the strength's choice on (and fit calibration bins on): the thief pool's images
    outside the probe thief's own (all of them outside the thief's regime), when the teacher trained on a subset
    and at least 200 are left, else the teacher's validation split."""
    import numpy as np

    from ..attacks.run import thief_indices

    p = cfg["probe"]
    if pool is not data:
        if p["labelled"] is None:  # not in the thief's regime: no probe thief holds any of the pool
            taken = np.array([], dtype=np.int64)
        else:
            taken = np.concatenate(thief_indices(pool, p["labelled"], p["queries"] or len(pool.y_train)))
        rest = torch.from_numpy(np.setdiff1d(np.arange(len(pool.y_train)), taken))
        if len(rest) >= 200:
            return torch.cat([pool.x_train[rest], pool.x_val]), torch.cat([pool.y_train[rest], pool.y_val])
    return data.x_val, data.y_val
