"""Decision-locked defended teachers: train the nasty part, lock it to the normal model's decisions,
and pick the defense strength on the validation split.

The served model (:class:`nasty.models.locked.LockedTeacher`) answers with the nasty part's
logits but the normal model's top class, so its accuracy is the normal model's by construction and
the strength ``omega`` is no longer bounded by what the teacher's accuracy can bear. Too little
``omega`` leaves the dark knowledge in, too much collapses the soft outputs toward a constant
(label smoothing, which helps a thief again); the window moves with the data, so by default
``omega`` is chosen from ``omega_grid`` by a KD probe scored on the validation split (never the
test split): students train on a labelled subset of the training split, with labels only, with
plain KD and with the adaptive re-head attack (:mod:`nasty.attacks.rehead`) from each candidate,
and the candidate under which the best of those attacks gains least over labels (worst probe
student) wins.

The two-head form also penalises the conditional mutual information of the head's outputs given
the class (``cmi``, after CMIM): the outputs should *destroy* what the normal model knows beyond
the decision, not disguise it, since a disguise that is a smooth function of the normal logits is
undone by a correction fitted on the thief's labels.

Two-head form: the nasty head trains on the frozen backbone's cached features, through the lock
(:class:`ServedHead`), with the defense's own objective (the adversaries' logits are computed once
on the images), which takes seconds.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import NastyError
from ..metrics import predict_logits
from ..models import create_model, model_spec
from ..models.locked import LockedTeacher

TUNING_ATTACKS = ("kd", "rehead")  # plain KD and the adaptive re-head attack: the strength must hold against both
HEAD_STEPS = 3000  # optimiser steps of the nasty head when head_epochs is not set


def spec_string(spec: dict) -> str:
    """``{"name": "cnn", "kwargs": {"width": 0.5}}`` -> ``"cnn:width=0.5"`` (parses back with ``create_model``)."""
    kw = ",".join(f"{k}={v!r}" for k, v in spec["kwargs"].items())
    return spec["name"] + (f":{kw}" if kw else "")


def assemble(decision: nn.Module, nasty: nn.Module, data, form: str, dcfg: dict) -> LockedTeacher:
    """One artifact from a trained normal model and a trained nasty part (a head or a network)."""
    nasty_spec = dcfg["nasty_head"] if form == "two-head" else spec_string(model_spec(nasty))
    locked = create_model("locked", data.num_classes, data.in_channels, data.image_size, decision=spec_string(model_spec(decision)),
                          nasty=nasty_spec, form=form, lock=dcfg["lock_rule"], margin=dcfg["lock_margin"])
    locked.decision.load_state_dict(decision.state_dict())
    locked.nasty.load_state_dict(nasty.state_dict())
    return locked.eval()


def conditional_mi(z: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """Batch estimate of the conditional mutual information of the tempered outputs given the class
    (Ye, Hamidi, Yang 2025): ``mean_i KL(P_i || Q_{y_i})`` with ``P = softmax(z / tau)`` and ``Q_c``
    the mean ``P`` over the batch's samples of class ``c``. Zero when the outputs say nothing beyond
    the class, so no correction fitted on labels can recover more than the class."""
    log_p = torch.log_softmax(z / tau, 1)
    p = log_p.exp()
    onehot = torch.nn.functional.one_hot(y, z.shape[1]).to(p.dtype)
    q = (onehot.T @ p) / onehot.sum(0).clamp_min(1)[:, None]
    return (p * (log_p - torch.log(q[y].clamp_min(1e-12)))).sum(1).mean()


def with_cmi(objective, weight: float, tau: float):
    """``objective`` plus ``weight * CMI`` of the head's outputs given the label (unchanged for weight 0)."""
    if not weight:
        return objective

    def wrapped(model, batch, epoch):
        loss, terms = objective(model, batch, epoch)
        cmi = conditional_mi(model(batch.x), batch.y, tau)  # a second pass of a head on features: negligible
        return loss + weight * cmi, {**terms, "cmi": cmi.item()}

    return wrapped


class ServedHead(nn.Module):
    """The nasty head as it is served: input = the backbone's features plus the decided class as a last
    column; output = the head's logits with the decision locked on top. Training through it makes
    the defense's objective (and the CMI term) act on what a thief will actually see."""

    def __init__(self, head: nn.Module, lock: str, margin: float):
        super().__init__()
        self.head, self.lock, self.margin = head, lock, margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..models.locked import lock_decision

        x = x.flatten(1)
        return lock_decision(self.head(x[:, :-1]), x[:, -1].long(), self.lock, self.margin)


def _with_decision(decision: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """``decision``'s features of ``x`` with its decided class appended as a last column."""
    decision.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            f = decision.forward_features(x[i : i + batch])
            out.append(torch.cat([f, decision.forward_head(f).argmax(1, keepdim=True).to(f.dtype)], 1))
    return torch.cat(out)


def train_head(defense, decision: nn.Module, adversaries: list[nn.Module], data, dcfg: dict, seed: int, deterministic: bool,
               run_dir: Path | None, log: Callable[[str], None]) -> tuple[nn.Module, dict]:
    """Train a nasty head on ``decision``'s frozen features with ``defense``'s objective."""
    from ..models.locked import head_module
    from ..train import Frozen, TrainConfig, fit, seed_everything

    f_train, f_val = (_with_decision(decision, x) for x in (data.x_train, data.x_val))
    adv = [Frozen.from_outputs(predict_logits(a, data.x_train)) for a in adversaries]
    fdata = dataclasses.replace(data, x_train=f_train[:, :, None, None], x_val=f_val[:, :, None, None],
                                x_test=f_val[:, :, None, None], y_test=data.y_val, augment="none")
    batch = 256
    steps = math.ceil(len(f_train) / batch)
    epochs = dcfg["head_epochs"] or max(5, min(300, math.ceil(HEAD_STEPS / steps)))
    seed_everything(seed, deterministic)
    head = head_module(dcfg["nasty_head"], f_train.shape[1] - 1, data.num_classes)
    net = ServedHead(head, dcfg["lock_rule"], dcfg["lock_margin"])
    cfg = TrainConfig(epochs=epochs, batch_size=batch, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="cosine",
                      seed=seed, deterministic=deterministic, select="last")
    res = fit(net, with_cmi(defense.objective(adv), dcfg["cmi"], defense.cfg["tau"]), fdata, cfg, run_dir=run_dir, desc=f"nasty-head:omega={defense.cfg['omega']:g}", log=log,
              frozen=adv)
    return head, {"head_epochs": epochs, "head_optimizer": "adam", "head_lr": 1e-3, "head_val_accuracy": res.best_val_accuracy}


def tuning_data(data, n: int | None, split_seed: int):
    """Students train on a stratified subset of the teacher's training split (their own val split
    carved from it) and are scored on the teacher's validation split: the test split is never read."""
    from ..data import stratified_indices

    y = data.y_train.numpy()
    keep = stratified_indices(y, min(n, len(y)), split_seed + 2) if n is not None and n < len(y) else torch.arange(len(y)).numpy()
    xs, ys = data.x_train[keep], data.y_train[keep]
    val = stratified_indices(ys.numpy(), 0.1, split_seed)
    mask = torch.zeros(len(ys), dtype=torch.bool)
    mask[torch.as_tensor(val)] = True
    return dataclasses.replace(data, x_train=xs[~mask], y_train=ys[~mask], x_val=xs[mask], y_val=ys[mask],
                               x_test=data.x_val, y_test=data.y_val)


def choose_strength(candidates: list[tuple[float, nn.Module]], cfg: dict, data, out: Path | None,
                    log: Callable[[str], None]) -> tuple[int, list[dict]]:
    """Index of the candidate whose KD probe on the validation split gains least over labels (worst
    probe student), and the table behind the choice."""
    from ..attacks import run_attack
    from ..config import train_config
    from ..probe import slug

    p = cfg["probe"]
    tdata = tuning_data(data, p["train_subset"], cfg["data"]["split_seed"])
    tcfg = train_config(cfg, p["train"])
    params = {"temperature": p["temperature"], "alpha": p["alpha"]}
    scratch = {}
    for s in p["students"]:
        _, r = run_attack("scratch", data=tdata, teachers=[], student=s, train=tcfg, params={},
                          out_dir=None if out is None else out / "tune" / slug(s) / "scratch", log=log)
        scratch[s] = r["accuracy"]
    table = []
    for omega, teacher in candidates:
        gains: dict[str, dict[str, float]] = {}
        for method in TUNING_ATTACKS:
            gains[method] = {}
            for s in p["students"]:
                _, r = run_attack(method, data=tdata, teachers=[teacher], student=s, train=tcfg, params=params,
                                  out_dir=None if out is None else out / "tune" / slug(s) / f"{method}-omega{omega:g}", log=log)
                gains[method][s] = r["accuracy"] - scratch[s]
        row = {"omega": omega, "val_gain": gains, "worst_gain": max(g for m in gains.values() for g in m.values())}
        table.append(row)
        log(f"[tune] omega={omega:g}: validation gain over labels " +
            "; ".join(f"{m} " + ", ".join(f"{s} {g:+.2f}" for s, g in gm.items()) for m, gm in gains.items()))
    best = min(range(len(table)), key=lambda i: (table[i]["worst_gain"], table[i]["omega"]))
    return best, table


def check_lock_config(cfg: dict) -> None:
    """Settings a lock cannot honour, refused before anything trains."""
    d = cfg["defense"]
    if d["lock"] == "none":
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


def describe_lock(side: dict) -> str | None:
    """A one-line description when a checkpoint sidecar is a decision-locked teacher, else ``None``."""
    m = side.get("model", {})
    if m.get("name") != "locked":
        return None
    kw = m.get("kwargs", {})
    return f"a decision-locked defended teacher ({kw.get('form', '?')}: decisions from {kw.get('decision', '?')}, soft outputs from {kw.get('nasty', '?')})"


def lock_summary(model: LockedTeacher) -> dict[str, Any]:
    return {"form": model.form, "lock": model.lock, "margin": model.margin,
            "white_box": "the artifact contains the normal model: whoever holds its weights holds the normal model"}


def lock_checkpoints(decision_path: str, nasty_path: str, lock: str = "swap", margin: float = 0.0) -> tuple[LockedTeacher, dict, dict]:
    """A two-net lock from two existing checkpoints (e.g. a nasty teacher trained with ``--lock none``
    and the normal model it was trained against). Both must agree on classes, input shape and
    normalisation, and neither may already be locked; returns the model and both sidecars."""
    from ..checkpoint import load_checkpoint, read_sidecar

    sides = {}
    for what, path in (("decision", decision_path), ("nasty", nasty_path)):
        _, side = read_sidecar(path)
        if describe_lock(side):
            raise NastyError(f"{path} is {describe_lock(side)}; a lock needs two plain models")
        sides[what] = side
    d, n = sides["decision"], sides["nasty"]
    for key, label in (("classes", "classes"), ("input_shape", "input shape"), ("normalization", "normalisation")):
        if d[key] != n[key]:
            raise NastyError(f"the decision model ({decision_path}) and the nasty part ({nasty_path}) disagree on {label}: "
                             f"{d[key]} vs {n[key]}")
    decision, _ = load_checkpoint(decision_path)
    nasty, _ = load_checkpoint(nasty_path)

    class _Data:  # what assemble needs of a dataset
        classes = d["classes"]
        num_classes = len(d["classes"])
        in_channels = d["input_shape"][0]
        image_size = tuple(d["input_shape"][1:])

    return assemble(decision, nasty, _Data, "two-net", {"lock_rule": lock, "lock_margin": margin}), d, n
