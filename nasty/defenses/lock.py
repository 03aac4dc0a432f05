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
from ..frozen import Frozen
from ..metrics import class_conditional_mi, predict_logits
from ..models import create_model, model_spec
from ..models.locked import LOCKS, LockedTeacher, head_module
from ..models.served import KEEP_EXPECT, Served, fit_bins, keep_ok
from ..params import Param
from ..resume import Checkpointing
from ..train import Objective, TrainConfig, fit, seed_everything

LOCK_PARAMS: dict[str, Param] = {  # the [defense] keys of the lock and of choosing its strength
    "lock": Param("str", "two-head", "Serve the nasty part's soft outputs with the normal model's decisions (two-head: a nasty head on "
                  "the normal backbone, the default; two-net: a nasty network beside the normal one; none: the paper's single nasty "
                  "network, which pays accuracy).", choices=("two-head", "two-net", "none")),
    "nasty_head": Param("str", "linear", "two-head: the nasty head, linear (default) or mlp:hidden=H."),
    "lock_rule": Param("str", "swap", "How the decision is imposed on the nasty logits (default swap).", choices=LOCKS),
    "lock_margin": Param("float", 0.0, "margin lock: how far the decided class is put above the others (default 0).",
                         lambda v: 0 <= v <= 100, "in [0, 100]"),
    "keep": Param("str", "confidence:bins=1", "What the served top probability is: confidence:bins=B (the normal model's top "
                  "probability replaced by its held-out accuracy in B equal-mass bins, fitted on held-out images the teacher never "
                  "trained on, else the validation split; default bins=1: one calibrated value for every answer (ECE at or below the "
                  "normal model's), within the 1-point leakage target on digits and MNIST (undefended: 2-8 points), "
                  "short of it on one weaker digits teacher's MLP student (bound +1.14, undefended +1.8); bins=2 and bins=3 keep "
                  "confidence levels and leak on MNIST: best thief +1.5 and +0.9 points, 95% bounds +3.8 and +4.4), decision "
                  "(the nasty part's own, with the normal model's decision on top: within the target, ECE 17-26%) or confidence "
                  "(the normal model's top probability exactly: leaks about 1 point on digits). Append top=K (confidence:bins=1,top=5) to "
                  "serve the normal model's K most probable classes as the top K (its top-K accuracy): that set is dark knowledge "
                  "and leaks (MNIST, K=5: +3.6 points over the floor, 95% CI +3.0..+4.3, where the undefended teacher leaks 8.2).",
                  keep_ok, KEEP_EXPECT),
    "omega_grid": Param("list[float]", [0.1, 0.3, 1.0], "Candidates for omega, chosen by a KD probe on the validation split when "
                        "--omega is not given (comma-separated; default 0.1,0.3,1).", lambda v: all(o >= 0 for o in v),
                        "a list of numbers >= 0", hi=1000.0),
    "cmi": Param("float", 10.0, "two-head: weight of the head's conditional mutual information given the class (outputs that say "
                 "nothing beyond the decision; default 10, 0 turns it off).", lambda v: 0 <= v <= 1e6, "in [0, 1e6]"),
    "head_epochs": Param("int?", None, "two-head: epochs of the nasty head on cached features (default: about 3000 steps).",
                         lambda v: 1 <= v <= 100000, "in 1..100000"),
}
TUNING_ATTACKS = ("kd", "rehead")  # plain KD and the adaptive re-head attack: the strength must hold against both
HEAD_STEPS = 3000  # optimiser steps of the nasty head when head_epochs is not set


def spec_string(spec: dict) -> str:
    """``{"name": "cnn", "kwargs": {"width": 0.5}}`` -> ``"cnn:width=0.5"`` (parses back with ``create_model``)."""
    kw = ",".join(f"{k}={v!r}" for k, v in spec["kwargs"].items())
    return spec["name"] + (f":{kw}" if kw else "")


def served_for(decision: nn.Module, data, dcfg: dict, calibration: tuple | None = None) -> Served:
    """The served function's settings of ``dcfg`` (``lock_rule``, ``lock_margin``, ``keep``); for
    ``keep = "confidence:bins=B"`` its bins fitted on ``decision``'s logits of ``calibration`` (images,
    labels), by default the **validation** split."""
    served = Served(data.num_classes, dcfg["lock_rule"], dcfg["lock_margin"], dcfg.get("keep", LOCK_PARAMS["keep"].default))
    if served.bins is not None:
        x, y = calibration if calibration is not None else (data.x_val, data.y_val)
        if not len(x):
            raise NastyError(f"--keep {served.keep} calibrates on the validation split, which is empty")
        served.set_bins(*fit_bins(_cached(_logits, decision, x), y, served.bins))
    return served


def assemble(decision: nn.Module, nasty: nn.Module, data, form: str, dcfg: dict, calibration: tuple | None = None) -> LockedTeacher:
    """One artifact from a trained normal model and a trained nasty part (a head or a network); ``calibration``:
    see :func:`served_for`."""
    nasty_spec = dcfg["nasty_head"] if form == "two-head" else spec_string(model_spec(nasty))
    served = served_for(decision, data, dcfg, calibration)
    locked = create_model("locked", data.num_classes, data.in_channels, data.image_size, decision=spec_string(model_spec(decision)),
                          nasty=nasty_spec, form=form, lock=served.lock, margin=served.margin, keep=served.keep)
    locked.decision.load_state_dict(decision.state_dict())
    locked.nasty.load_state_dict(nasty.state_dict())
    locked.served.load_state_dict(served.state_dict())
    return locked.eval()


# A lock whose served probabilities are within this of its decision model's serves the undefended model.
SAME_OUTPUTS = 1e-4


def check_lock_defends(locked: LockedTeacher, x: torch.Tensor, what: str) -> None:
    """Refuse (one line, exit 2) a locked artifact whose nasty part adds nothing on ``x`` (normalised images;
    ``what`` says which): it serves what its own served function would serve with the decision model's
    logits in the nasty part's place (for ``keep decision``, the decision model's own probabilities; for the
    confidence kinds, the decision model's runner-up distribution under the kept top). It would be named a
    defended teacher and serve the undefended model's dark knowledge. The data check of a lock, whatever its
    parts' files say."""
    with torch.no_grad():
        normal_logits, _ = locked.decide_and_serve(x)
        served = torch.softmax(locked(x).float(), 1)
        undefended = torch.softmax(locked.served(normal_logits, normal_logits).float(), 1)
    gap = float((served - undefended).abs().max())
    if gap <= SAME_OUTPUTS:
        raise NastyError(f"the locked teacher would serve its decision model's own probabilities (max |p_served - p_decision| "
                         f"= {gap:.1e} on {len(x)} {what}, keep {locked.keep}): its nasty part does not defend it; refused")


def conditional_mi(z: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """Leave-one-out batch estimate of the conditional mutual information of the tempered outputs given
    the class (after Ye, Hamidi, Yang 2025), in nats: ``mean_i KL(P_i || Q_{-i})`` with ``P = softmax(z / tau)``
    and ``Q_{-i} = (n_c Q_c - P_i) / (n_c - 1)`` the mean ``P`` of the *other* samples of class ``c = y_i`` in
    the batch (:func:`nasty.metrics.class_conditional_mi`). A sample alone in its class in the batch has
    no such mean and is left out (the mean is over the others; 0 when every sample is alone). Zero when the
    outputs say nothing beyond the class, so no correction fitted on labels can recover more than the class.

    Since ``Q_{-i}`` is independent of ``P_i``, the estimate is an upper bound of the CMI in expectation
    (Jensen on ``-log``), whereas a sample inside its own class mean pulls that mean toward itself and the
    estimate is a lower bound that the outputs can push down without the CMI falling. Measured on
    class-conditional Dirichlet outputs with a known CMI (``python benchmarks/cmi_bias.py``; alpha 20,
    uniform labels; bias in percent of the truth), own-mean vs leave-one-out: 10 classes, batch 64
    -17% vs +24%, batch 256 -4% vs +5%; 100 classes, batch 64 -81% vs +244%, batch 256 -49% vs +139%;
    at a whole split (1000 or 10000 samples) both are within 2.5%."""
    return class_conditional_mi(torch.log_softmax(z / tau, 1), y, leave_one_out=True)


def with_cmi(objective: Objective, weight: float, tau: float) -> Objective:
    """``objective`` plus ``weight * CMI`` of the head's outputs given the label, the leave-one-out batch
    estimate of :func:`conditional_mi` (unchanged for weight 0)."""
    if not weight:
        return objective

    def loss(model, batch, epoch):
        once = _OncePerBatch(model, batch.x)
        total, terms = objective.loss(once, batch, epoch)
        cmi = conditional_mi(once(batch.x), batch.y, tau)  # the served outputs the objective computed, not a second pass
        return total + weight * cmi, {**terms, "cmi": cmi.item()}

    return Objective(loss, frozen=objective.frozen, end_of_epoch=objective.end_of_epoch, state=objective.state)


class _OncePerBatch:
    """``model`` that runs once on the batch's images ``x``: a second call with the same tensor returns the
    first output (with its graph); any other input or attribute goes to the model itself."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self._model, self._x, self._out = model, x, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self._x:
            return self._model(x)
        if self._out is None:
            self._out = self._model(x)
        return self._out

    def __getattr__(self, name: str):
        return getattr(self._model, name)


class ServedHead(nn.Module):
    """The nasty head as it is served: input = the backbone's features with the normal model's logits
    appended as the last C columns; output = what the locked teacher serves for them (the same
    function, :class:`nasty.models.served.Served`). Training through it makes the defense's objective
    (and the CMI term) act on what a thief will actually see."""

    def __init__(self, head: nn.Module, served: Served):
        super().__init__()
        self.head, self.served = head, served

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        c = self.served.num_classes
        return self.served(self.head(x[:, :-c]), x[:, -c:])


def _with_normal_logits(decision: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """``decision``'s features of ``x`` with its logits appended as the last columns."""
    decision.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            f = decision.forward_features(x[i : i + batch])
            out.append(torch.cat([f, decision.forward_head(f).to(f.dtype)], 1))
    return torch.cat(out)


_FEATURES: dict[tuple, tuple] = {}  # one feature/logit cache per run: every strength candidate trains on the same cached features


def _cached(fn, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``fn(model, x)``, computed once per (function, model, image tensor) while both are alive."""
    key = (fn.__name__, id(model), id(x))
    hit = _FEATURES.get(key)
    if hit is not None and hit[0] is model and hit[1] is x:
        return hit[2]
    if len(_FEATURES) > 16:
        _FEATURES.clear()
    out = fn(model, x)
    _FEATURES[key] = (model, x, out)
    return out


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return predict_logits(model, x)


def train_head(defense, decision: nn.Module, adversaries: list[nn.Module], data, dcfg: dict, seed: int, deterministic: bool,
               run_dir: Path | None, log: Callable[[str], None], ck: Checkpointing = Checkpointing(),
               calibration: tuple | None = None) -> tuple[nn.Module, dict]:
    """Train a nasty head on ``decision``'s frozen features with ``defense``'s objective (the backbone's
    features and the adversaries' logits are computed once per run, shared by every strength candidate),
    through the served function (its bins fitted on ``calibration``, see :func:`served_for`)."""

    f_train, f_val = (_cached(_with_normal_logits, decision, x) for x in (data.x_train, data.x_val))
    adv = [Frozen.from_outputs(_cached(_logits, a, data.x_train)) for a in adversaries]
    fdata = dataclasses.replace(data, x_train=f_train[:, :, None, None], x_val=f_val[:, :, None, None],
                                x_test=f_val[:, :, None, None], y_test=data.y_val, augment="none")
    batch = 256
    steps = math.ceil(len(f_train) / batch)
    epochs = dcfg["head_epochs"] or max(5, min(300, math.ceil(HEAD_STEPS / steps)))
    seed_everything(seed, deterministic)
    head = head_module(dcfg["nasty_head"], f_train.shape[1] - data.num_classes, data.num_classes)
    net = ServedHead(head, served_for(decision, data, dcfg, calibration))
    cfg = TrainConfig(epochs=epochs, batch_size=batch, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="cosine",
                      seed=seed, deterministic=deterministic, select="last")
    res = fit(net, with_cmi(defense.objective(adv), dcfg["cmi"], defense.cfg["tau"]), fdata, cfg, run_dir=run_dir,
              desc=f"nasty-head:omega={defense.cfg['omega']:g}", log=log, **ck.fit_args())
    return head, {"head_epochs": epochs, "head_optimizer": "adam", "head_lr": 1e-3, "head_val_accuracy": res.best_val_accuracy}


def describe_lock(side: dict) -> str | None:
    """A one-line description when a checkpoint sidecar is a decision-locked teacher, else ``None``."""
    m = side.get("model", {})
    if m.get("name") != "locked":
        return None
    kw = m.get("kwargs", {})
    return f"a decision-locked defended teacher ({kw.get('form', '?')}: decisions from {kw.get('decision', '?')}, soft outputs from {kw.get('nasty', '?')})"


def lock_summary(model: LockedTeacher) -> dict[str, Any]:
    return {"form": model.form, "lock": model.lock, "margin": model.margin, "keep": model.keep,
            "white_box": "the artifact contains the normal model: whoever holds its weights holds the normal model"}


