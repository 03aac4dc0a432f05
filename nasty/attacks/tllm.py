"""TLLM, "Teach Less, Learn More" (Zhu et al., NeurIPS 2022): find the *undistillable* classes --
those on which a KD student is less accurate than the same student trained on labels alone -- and
stop distilling them.

Identification (no code was released; this is a configurable version of the paper's
procedure): on the attacker's validation split (carved from the
attacker's own labelled data, never the test split), per class c
``delta_c = acc_val(KD student, c) - acc_val(label-only student, c)`` in percentage points and
``U = {c : delta_c < -delta}``.

- ``mode = oneshot`` (default): two preliminary runs (label-only, KD), then the final run.
- ``mode = online``: one label-only run records per-class validation curves every ``eval_every``
  epochs; during the single KD run the same curves are measured, and a class enters ``U`` after
  ``patience`` consecutive evaluations with ``delta_c < -delta``; from then on it is discarded.
  (The identification state is not part of ``fit``'s resumable training state: a resumed online run
  re-identifies from the evaluations it still makes.)

Per-class deltas need validation images of every class: with fewer than ``min_val`` (default 20)
of some class, a per-class accuracy moves by 5 points or more with one image, so the oneshot
identification falls back to one global decision (``U`` = every class when KD loses more than
``delta`` points overall on validation, else none) and says so.

``prelim_epochs`` (oneshot) shortens the two preliminary runs; online mode uses the run's epochs.
The preliminary runs log to ``run_dir/prelim-ce`` and ``run_dir/prelim-kd``.

Discarding (``discard``): ``ce-full`` (default) drops the KD term for samples of classes in U and
gives them full-weight CE, so they are learned from labels as a label-only student would (the
paper's aim: those classes learn *more* without the teacher); ``kd-term`` only drops the KD term,
``(1-a) CE + a T^2 KL 1[y not in U]`` (with a = 0.9 those samples get a tenth of the label signal);
``drop`` removes them from training (a run left with nothing to train on has failed, never scored).
In a thief's mixed batch (``y = -1`` on unlabelled queries) a query counts for the teacher's
decided class and adds no CE. The teacher is queried once per training image across all
runs (one shared output cache).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..errors import NastyError, TrainingDiverged
from ..params import Param
from ..data import Batch
from ..metrics import per_class_accuracy, predict_logits
from ..train import Objective, ce_objective, seed_everything
from .augment import Mixed
from .base import Attack, check_temperature_alpha, kd_per_sample, register_attack

DISCARD = ("kd-term", "ce-full", "drop")


def tllm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, m: Mixed, undistillable: torch.Tensor,
              temperature: float, alpha: float, discard: str = "kd-term") -> tuple[torch.Tensor, dict[str, float]]:
    """Per-sample KD with the classes flagged in ``undistillable`` (bool, per class) discarded.

    A mixed sample counts ``lam`` for ``y`` and ``1 - lam`` for ``y2``. With no class flagged and
    ``discard = kd-term`` this equals :func:`nasty.losses.kd_loss`.
    """
    known = m.y >= 0  # a thief's unlabelled query: the teacher's decision stands for its class, and it has no CE
    y1 = m.y if bool(known.all()) else torch.where(known, m.y, teacher_logits.argmax(1))
    y2 = y1 if m.y2 is m.y else m.y2
    if y1 is not m.y:
        m = Mixed(Batch(m.x, y1, m.batch.idx, m.batch.augmented), y2, m.lam)
    u1, u2 = undistillable[m.y].float(), undistillable[m.y2].float()
    lam = m.lam
    keep = lam * (1 - u1) + (1 - lam) * (1 - u2)  # share of the sample that is distillable
    kl = kd_per_sample(student_logits, teacher_logits, temperature)
    ce1 = F.cross_entropy(student_logits, m.y, reduction="none")
    ce2 = ce1 if lam == 1.0 else F.cross_entropy(student_logits, m.y2, reduction="none")
    ce_keep = (lam * (1 - u1) * ce1 + (1 - lam) * (1 - u2) * ce2) * known
    ce_u = (lam * u1 * ce1 + (1 - lam) * u2 * ce2) * known
    kd_part = alpha * keep * kl
    if discard == "kd-term":
        loss = (kd_part + (1 - alpha) * (ce_keep + ce_u)).mean()
    elif discard == "ce-full":
        loss = (kd_part + (1 - alpha) * ce_keep + ce_u).mean()
    elif discard == "drop":
        loss = (kd_part + (1 - alpha) * ce_keep).sum() / keep.sum().clamp_min(1.0)
    else:
        raise NastyError(f"discard must be one of {', '.join(DISCARD)}, got {discard!r}")
    return loss, {"kd_kl": (kl.mean() / temperature**2).item(), "ce": (ce_keep + ce_u).mean().item(),
                  "discarded": (1 - keep).mean().item()}


def class_accuracy(model, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float | None]:
    return per_class_accuracy(predict_logits(model, x).argmax(1), y, num_classes)


def deltas(kd_acc: list[float | None], ce_acc: list[float | None]) -> list[float | None]:
    return [None if k is None or c is None else k - c for k, c in zip(kd_acc, ce_acc)]


def subset_accuracy(pred: torch.Tensor, y: torch.Tensor, classes: list[int]) -> float | None:
    mask = torch.isin(y, torch.tensor(classes, dtype=y.dtype)) if classes else torch.zeros_like(y, dtype=torch.bool)
    return float(100.0 * (pred[mask] == y[mask]).float().mean()) if mask.any() else None


def every_kth_epoch(fn, every: int, epochs: int):
    """An end-of-epoch hook calling ``fn(model, epochs_done)`` after every ``every``-th epoch but the last."""

    def hook(model, done: int) -> None:
        if done % every == 0 and done < epochs:
            fn(model, done)

    return hook


@register_attack
class TLLM(Attack):
    name = "tllm"
    summary = "Teach Less, Learn More: find the undistillable classes on validation and stop distilling them"
    accepts = ("weights", "logits", "probs", "topk")
    supports_augment = True
    params = {"temperature": 4.0, "alpha": 0.9,
              "mode": Param("str", "oneshot", "tllm: oneshot or online identification.", choices=("oneshot", "online")),
              "delta": Param("float", 0.0, "tllm: a class is undistillable when KD loses more than DELTA points on it.",
                             lambda v: v >= 0, "a number >= 0 (percentage points)"),
              "discard": Param("str", "ce-full", "tllm: what to discard for undistillable classes: ce-full (their KD term, with "
                               "full-weight CE instead), kd-term or drop.", choices=DISCARD),
              "min_val": Param("int", 20, "tllm: validation images per class needed for per-class identification (fewer: one "
                               "global decision).", lambda v: 1 <= v <= 100000, "in 1..100000"),
              "eval_every": 1, "patience": 2, "prelim_epochs": None}

    def validate(self):
        p = self.p
        check_temperature_alpha(p)
        for k in ("eval_every", "patience"):
            if isinstance(p[k], bool) or not isinstance(p[k], int) or p[k] < 1:
                raise NastyError(f"tllm {k} must be a positive integer, got {p[k]!r}")
        pe = p["prelim_epochs"]
        if pe is not None and (isinstance(pe, bool) or not isinstance(pe, int) or pe < 1):
            raise NastyError(f"tllm prelim_epochs must be a positive integer, got {pe!r}")

    def _objective(self, teacher, mix, flags: torch.Tensor, end_of_epoch=None):
        T, a, discard = self.p["temperature"], self.p["alpha"], self.p["discard"]

        def loss(model, batch, epoch):
            m = mix(batch)
            return tllm_loss(model(m.x), teacher(m.batch), m, flags, T, a, discard)

        return Objective(loss, frozen=[teacher], end_of_epoch=end_of_epoch)

    def train(self, ctx):
        d = ctx.data
        C = d.num_classes
        teacher = ctx.frozen_teacher()  # one cache for every run below
        delta_min = float(self.p["delta"])
        prelim_cfg = replace(ctx.train, epochs=self.p["prelim_epochs"] or ctx.train.epochs)
        val_acc = lambda model: class_accuracy(model, d.x_val, d.y_val, C)  # noqa: E731
        info: dict = {"mode": self.p["mode"], "split": "attacker validation split", "n_val": int(len(d.y_val)),
                      "delta_threshold": delta_min}

        ce_model = self.build_student(ctx)
        # the audit hands over its label-only baseline's validation predictions when that baseline is this very
        # run (same student, data, schedule and seed): it is not trained twice (nasty.audit.run)
        reused = ctx.info.pop("label_only_val_pred", None)
        if self.p["mode"] == "oneshot":
            if reused is not None and prelim_cfg == ctx.train and len(reused) == len(d.y_val):
                ce_acc = per_class_accuracy(torch.as_tensor(reused, dtype=torch.long), d.y_val, C)
                info["label_only_run"] = "the audit's label-only baseline (the same run, not trained again)"
            else:
                ctx.fit(ce_model, ce_objective(), desc=f"tllm-ce:{ctx.student}", cfg=prelim_cfg, subdir="prelim-ce")
                ce_acc = val_acc(ce_model)
            # the KD run starts from the freshly seeded generator, so it is the same whether or not the label-only
            # run was trained here (fit seeds the generator at its start; no model here draws random numbers while
            # training, so this is also the state that run leaves: standalone results are unchanged)
            seed_everything(ctx.train.seed, ctx.train.deterministic)
            kd_model = self.build_student(ctx)
            ctx.fit(kd_model, self._objective(teacher, ctx.mixer(), torch.zeros(C, dtype=torch.bool)),
                    desc=f"tllm-kd:{ctx.student}", cfg=prelim_cfg, subdir="prelim-kd")
            kd_acc = val_acc(kd_model)
            delta = deltas(kd_acc, ce_acc)
            per_class = torch.bincount(d.y_val, minlength=C)
            if int(per_class.min()) >= self.p["min_val"]:
                U = [c for c, v in enumerate(delta) if v is not None and v < -delta_min]
            else:
                n = per_class.tolist()
                overall = sum(k * v for k, v in zip(n, delta) if v is not None) / max(1, sum(n))  # n-weighted: the overall delta
                U = list(range(C)) if overall < -delta_min else []
                info["global_fallback"] = {"overall_delta": overall, "min_val_per_class": int(per_class.min())}
                ctx.notes.append(f"tllm: {int(per_class.min())} validation images in the rarest class (< min_val {self.p['min_val']}): "
                                 f"one global decision (KD {overall:+.2f} points overall on validation -> "
                                 f"{'every class' if U else 'no class'} undistillable)")
            info.update({"ce_val_per_class": ce_acc, "kd_val_per_class": kd_acc})
            flags = torch.zeros(C, dtype=torch.bool)
            flags[U] = True
            if ctx.log:
                ctx.log(f"[tllm] undistillable classes {U} (delta < -{delta_min:g} on validation)")
            if len(U) == C and self.p["discard"] == "drop":
                raise TrainingDiverged("tllm: every class was found undistillable and discard=drop leaves nothing to train on; "
                                       "the attack failed (use discard=ce-full)")
            final = self.build_student(ctx)
            res = ctx.fit(final, self._objective(teacher, ctx.mixer(), flags), desc=f"tllm:{ctx.student}")
        else:
            k, patience = self.p["eval_every"], self.p["patience"]
            curve: dict[int, list[float | None]] = {}
            ce = ce_objective()
            ce.end_of_epoch = every_kth_epoch(lambda m, e: curve.__setitem__(e, val_acc(m)), k, ctx.train.epochs)
            ctx.fit(ce_model, ce, desc=f"tllm-ce:{ctx.student}", subdir="prelim-ce")
            flags = torch.zeros(C, dtype=torch.bool)
            streak = [0] * C
            delta: list[float | None] = [None] * C
            entered: dict[int, int] = {}
            history = []

            def identify(model, epoch):
                if epoch not in curve:  # the label-only run was restored from a saved state: no curve point here
                    return
                now = deltas(val_acc(model), curve[epoch])
                history.append({"epoch": epoch, "delta": now})
                for c, v in enumerate(now):
                    if flags[c]:
                        continue
                    delta[c] = v
                    streak[c] = streak[c] + 1 if v is not None and v < -delta_min else 0
                    if streak[c] >= patience:
                        flags[c] = True
                        entered[c] = epoch
                        if ctx.log:
                            ctx.log(f"[tllm] class {c} undistillable after epoch {epoch} (delta {v:+.1f})")

            final = self.build_student(ctx)
            res = ctx.fit(final, self._objective(teacher, ctx.mixer(), flags, every_kth_epoch(identify, k, ctx.train.epochs)),
                          desc=f"tllm:{ctx.student}")
            U = sorted(entered)
            info.update({"entered_after_epoch": {str(c): e for c, e in sorted(entered.items())}, "eval_every": k,
                         "patience": patience, "history": history})
            if not history:
                ctx.notes.append(f"tllm online: no evaluation happened (epochs {ctx.train.epochs} <= eval_every {k}); U is empty")
        pred = predict_logits(final, d.x_test).argmax(1)
        rest = [c for c in range(C) if c not in U]
        return final, {
            "best_epoch": res.best_epoch,
            "val_accuracy": res.best_val_accuracy,
            "undistillable_classes": U,
            "delta": delta,
            "accuracy_undistillable": subset_accuracy(pred, d.y_test, U),
            "accuracy_distillable": subset_accuracy(pred, d.y_test, rest),
            "identification": info,
        }
