"""Accuracy-budget nasty teacher: the defense picks its own strength omega.

The nasty teacher's knob omega silently trades accuracy for nastiness, and at small scale the
usable window is narrow (``shared/reference/observations.md``). Here the owner states the
accuracy it may lose instead: ``max_accuracy_drop`` (points of *validation* accuracy below the
adversary's, i.e. the normal model's). The problem

    maximise KL(teacher || adversaries)  subject to  acc_val(teacher) >= acc_val(adversary) - budget

has the Lagrangian ``lambda * CE - KL`` (up to constants), i.e. the nasty loss with
``omega = 1 / lambda``. Dual ascent on ``lambda`` in log space gives, after every epoch,

    omega <- clip(omega * exp(clip(dual_lr * (acc_val - target) / budget, -1, 1)), omega_min, omega_max)

with ``target = reference - target_ratio * budget`` (default ``target_ratio = 0.5``: aim inside the
budget, since validation accuracy is noisy). Omega grows while the teacher is more accurate than
it needs to be and shrinks as soon as it is less. ``reference`` is the normal model's final
validation accuracy when fine-tuning (``--init-from``); when training from scratch it is the
normal model's validation accuracy at the same fraction of its own training (its ``metrics.jsonl``,
when kept), so that the early, not yet converged epochs do not read as the defense's cost. Stability: ``omega_warmup`` epochs of linear
ramp before the first update, a per-sample KL cap (default :data:`DEFAULT_KL_CAP` nats), gradient
clipping (default :data:`DEFAULT_GRAD_CLIP`), and a :class:`TrainingDiverged` error (never NaN) when
the loss or the validation KL is not finite or the teacher collapses to chance at the smallest omega.

Caveats, logged and recorded: a validation split where one image weighs more than a fifth of the
budget cannot resolve it (digits: one image = 0.69 points), and a normal model selected on the same
split (best-val) has an optimistic validation accuracy; both make the budget look unmet.

The kept epoch is chosen on validation only: among epochs after warm-up, the one with the largest
validation KL whose accuracy meets the target; failing that, the floor; failing that, the most
accurate epoch, with ``budget_met = false`` in the result. It honours ``protect_classes`` /
``protect_by`` (class-selective) and ``combine`` (several adversaries) too.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from ..data import Batch
from ..errors import NastyError, TrainingDiverged
from ..metrics import accuracy, predict_logits
from ..train import Objective
from ..params import Param
from .base import _log, register_defense
from .multi import MultiAdversaryNasty
from .selective import ClassSelectiveNasty

DEFAULT_KL_CAP = 2.0  # nats per sample at temperature tau (above the 99th percentile of a working nasty teacher on digits)
DEFAULT_GRAD_CLIP = 5.0
DEFAULT_OMEGA_MAX = 1.0
OMEGA_MIN = 1e-4
MAX_LOG_STEP = 1.0  # omega changes by at most a factor e per epoch


@dataclass
class OmegaController:
    """Multiplicative dual update of omega from validation accuracy (percent)."""

    omega: float
    reference: float  # the adversary's validation accuracy
    max_drop: float  # the budget, in points
    lr: float = 0.5
    target_ratio: float = 0.5
    omega_min: float = OMEGA_MIN
    omega_max: float = DEFAULT_OMEGA_MAX
    history: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.max_drop > 0:
            raise NastyError(f"max_accuracy_drop must be positive, got {self.max_drop}")
        if not self.lr > 0:
            raise NastyError(f"dual_lr must be positive, got {self.lr}")
        if not 0 <= self.target_ratio <= 1:
            raise NastyError(f"target_ratio must be in [0, 1], got {self.target_ratio}")
        if not 0 < self.omega_min <= self.omega_max:
            raise NastyError(f"need 0 < omega_min <= omega_max, got {self.omega_min}, {self.omega_max}")
        self.omega = min(max(self.omega, self.omega_min), self.omega_max)

    @property
    def floor(self) -> float:
        return self.reference - self.max_drop

    @property
    def target(self) -> float:
        return self.reference - self.target_ratio * self.max_drop

    def update(self, val_accuracy: float, reference: float | None = None) -> float:
        """One dual step; ``reference`` (default: the final one) is the normal model's accuracy at this point of training."""
        if not math.isfinite(val_accuracy):
            raise TrainingDiverged(f"budget: validation accuracy is {val_accuracy}")
        ref = self.reference if reference is None else reference
        step = self.lr * (val_accuracy - (ref - self.target_ratio * self.max_drop)) / self.max_drop
        step = min(max(step, -MAX_LOG_STEP), MAX_LOG_STEP)
        self.omega = min(max(self.omega * math.exp(step), self.omega_min), self.omega_max)
        self.history.append(self.omega)
        return self.omega


@register_defense
class BudgetNasty(ClassSelectiveNasty, MultiAdversaryNasty):
    name = "budget"
    summary = "nasty teacher that sets its own omega to stay within --max-accuracy-drop of the adversary (dual update)"
    params: ClassVar[dict[str, Param]] = {
        "max_accuracy_drop": Param("float?", None, "budget: validation accuracy (points) the teacher may lose to the adversary; "
                                   "omega adapts.", lambda v: v > 0, "positive", hi=100.0),
        "dual_lr": Param("float", 0.5, "budget: step of the per-epoch omega update (default 0.5).", lambda v: v > 0, "positive", hi=1000.0),
        "omega_max": Param("float?", None, f"budget: upper bound of omega (default {DEFAULT_OMEGA_MAX}).", lambda v: v > 0, "positive", hi=1000.0),
    }
    require_protected: ClassVar[bool] = False
    min_adversaries: ClassVar[int] = 1
    target_ratio: ClassVar[float] = 0.5
    collapse_patience: ClassVar[int] = 2

    def validate(self) -> None:
        super().validate()
        c = self.cfg
        if c.get("max_accuracy_drop") is None:
            raise NastyError("defense budget needs --max-accuracy-drop (points of validation accuracy it may lose, e.g. 0.5)")
        if not c["omega"] > 0:
            raise NastyError(f"defense budget starts from --omega, which must be positive (got {c['omega']})")
        omax = c.get("omega_max") or DEFAULT_OMEGA_MAX
        if omax < c["omega"]:
            raise NastyError(f"omega_max ({omax}) is below the starting omega ({c['omega']})")
        # the effective config: a KL cap unless the user chose one (a copy: the run's config stays as given)
        self.cfg = {**c, "kl_cap": c["kl_cap"] if c["kl_cap"] is not None else DEFAULT_KL_CAP}
        self.controller: OmegaController | None = None
        self.rows: list[dict] = []
        self._epoch = -1
        self._states: dict[str, tuple[int, dict]] = {}

    def train_config(self, tcfg):
        # this defense keeps its own epoch (see finish); fit must hand back the last one
        self._epochs = tcfg.epochs
        return replace(tcfg, select="last", grad_clip=tcfg.grad_clip or DEFAULT_GRAD_CLIP)

    def reference_at(self, epoch: int) -> float:
        """The normal model's validation accuracy to compare with after ``epoch`` (0-based)."""
        ctl = self.controller
        assert ctl is not None
        curve = self.reference_curve
        if self.cfg.get("init_from") is not None or not curve:
            return ctl.reference
        n = len(curve)
        total = getattr(self, "_epochs", None) or n
        return curve[min(n - 1, max(0, round((epoch + 1) * n / total) - 1))]

    def omega_at(self, epoch: int) -> float:
        warm = self.cfg["omega_warmup"]
        if epoch < warm or self.controller is None:
            return self.cfg["omega"] * min(1.0, (epoch + 1) / warm) if warm else self.cfg["omega"]
        return self.controller.omega

    def objective(self, adversaries):
        if self.data is None:
            raise NastyError("defense budget needs the dataset (for its validation split)")
        d = self.data
        ref_fn = adversaries[0].fn
        reference = accuracy(predict_logits(ref_fn, d.x_val).argmax(1), d.y_val)
        c = self.cfg
        self.controller = OmegaController(c["omega"], reference, c["max_accuracy_drop"], lr=c["dual_lr"],
                                          target_ratio=self.target_ratio, omega_max=c.get("omega_max") or DEFAULT_OMEGA_MAX)
        self._val_adv = [predict_logits(a.fn, d.x_val) for a in adversaries]
        self.val_resolution = 100.0 / max(1, len(d.y_val))
        if self.val_resolution > c["max_accuracy_drop"] / 5:
            (self.log or _log)(f"[budget] warning: one validation image weighs {self.val_resolution:.3g} points, too coarse for a "
                 f"{c['max_accuracy_drop']:g}-point budget; the controller will chase noise (use a larger validation split)")
        self._val_batch = Batch(d.x_val, d.y_val, torch.arange(len(d.y_val)), False)
        self._epoch = -1
        inner = super().objective(adversaries)
        return Objective(inner.loss, frozen=inner.frozen, end_of_epoch=self._epoch_done, state=self)

    def _epoch_done(self, model, done: int) -> None:
        self._epoch = done - 1
        self.end_epoch(model, self._epoch)

    @torch.no_grad()
    def end_epoch(self, model, epoch: int) -> dict:
        """Score the teacher after ``epoch`` (0-based) on validation, keep candidates, update omega."""
        ctl = self.controller
        assert ctl is not None
        device = next(model.parameters()).device
        z = predict_logits(model, self.data.x_val.to(device)).cpu()
        acc = accuracy(z.argmax(1), self.data.y_val)
        kl = float(self.kl_term(z, self._val_batch, self._val_adv))
        omega_used = self.omega_at(epoch)
        if not (math.isfinite(acc) and math.isfinite(kl)):
            raise TrainingDiverged(f"budget: validation KL is {kl} after epoch {epoch + 1} (omega {omega_used:.4g}); "
                                   "lower --lr or --omega")
        row = {"epoch": epoch + 1, "omega": omega_used, "val_accuracy": acc, "val_kl": kl, "reference": self.reference_at(epoch)}
        past_warmup = epoch + 1 >= self.cfg["omega_warmup"]
        if past_warmup:
            for tier, ok in (("target", acc >= ctl.target), ("floor", acc >= ctl.floor)):
                best = self._states.get(tier)
                if ok and (best is None or kl > best[1]["val_kl"]):
                    self._states[tier] = (epoch + 1, {**row, "state": copy.deepcopy(model.state_dict())})
        best = self._states.get("accurate")
        if best is None or acc > best[1]["val_accuracy"]:
            self._states["accurate"] = (epoch + 1, {**row, "state": copy.deepcopy(model.state_dict())})
        if past_warmup:
            row["next_omega"] = ctl.update(acc, row["reference"])
        self.rows.append(row)
        chance = 100.0 / self.data.num_classes
        recent = self.rows[-self.collapse_patience:]
        if (len(recent) == self.collapse_patience and all(r["val_accuracy"] <= chance + 5 for r in recent)
                and ctl.omega <= ctl.omega_min):
            raise TrainingDiverged(f"budget: the teacher collapsed to {acc:.1f}% validation accuracy (chance {chance:.1f}%) "
                                   f"even at the smallest omega; lower --lr, or use --init-from adversary")
        (self.log or _log)(f"[budget] epoch {epoch + 1}: val_acc {acc:.2f} (normal {row['reference']:.2f} now, {ctl.reference:.2f} final) "
             f"val_kl {kl:.4f} omega {omega_used:.4g} -> {ctl.omega:.4g}")
        return row

    # resumable training (nasty.train.fit saves this with its own state after every epoch)
    def resume_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        ctl = self.controller
        assert ctl is not None
        tensors = {f"{tier}/{k}": v for tier, (_, d) in self._states.items() for k, v in d["state"].items()}
        meta = {"epoch": self._epoch, "omega": ctl.omega, "history": ctl.history, "rows": self.rows,
                "states": {tier: {"epoch": e, "row": {k: v for k, v in d.items() if k != "state"}} for tier, (e, d) in self._states.items()}}
        return tensors, meta

    def load_resume_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        ctl = self.controller
        assert ctl is not None
        ctl.omega, ctl.history = float(meta["omega"]), list(meta["history"])
        self._epoch, self.rows = int(meta["epoch"]), list(meta["rows"])
        self._states = {}
        for tier, info in meta["states"].items():
            state = {k[len(tier) + 1:]: v for k, v in tensors.items() if k.startswith(tier + "/")}
            self._states[tier] = (int(info["epoch"]), {**info["row"], "state": state})

    def finish(self, model) -> dict:
        ctl = self.controller
        if ctl is None or self._epoch < 0:
            return {}
        self._epoch = -1
        tier = "target" if "target" in self._states else "floor" if "floor" in self._states else "accurate"
        epoch, chosen = self._states[tier]
        model.load_state_dict(chosen["state"])
        met = tier != "accurate" or chosen["val_accuracy"] >= ctl.floor
        if not met:
            (self.log or _log)(f"[budget] warning: no epoch met the budget (best validation accuracy {chosen['val_accuracy']:.2f} < floor "
                 f"{ctl.floor:.2f}); keeping the most accurate epoch {epoch}")
        self._states.clear()
        return {
            "selected_epoch": epoch,
            "selected_by": tier,
            "val_accuracy": chosen["val_accuracy"],
            "val_kl": chosen["val_kl"],
            "omega": chosen["omega"],
            "reference_val_accuracy": ctl.reference,
            "target_val_accuracy": ctl.target,
            "floor_val_accuracy": ctl.floor,
            "budget_met": bool(met),
            "kl_cap": self.cfg["kl_cap"],
            "val_resolution": self.val_resolution,
            "history": self.rows,
        }
