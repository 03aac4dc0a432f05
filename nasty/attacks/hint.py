"""FitNets hints (Romero et al., ICLR 2015): white-box feature distillation. A student stage is
regressed onto a teacher stage through a small adapter (the "regressor"):
``L = (1-a) CE(z_S, y) + a T^2 KL(sig_T(z_T) || sig_T(z_S)) + beta * MSE(r(F_S), F_T)``.

The nasty loss shapes the teacher's logits only; its features may still teach (``a = 0``, the
default, ignores the logits altogether). Stages are 1-based indices into ``stage_names`` (default:
the middle stage of each network, FitNets' "guided" layer). Adapter: 1x1 convolution between
feature maps (the larger map is average-pooled to the smaller's size); between a vector and a map
the map is globally average-pooled first and the adapter is linear. ``hint_epochs`` > 0 runs
FitNets' first stage (hint loss alone) for that many epochs before the joint loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import labelled_ce

from ..errors import NastyError
from ..frozen import Frozen
from ..train import Objective
from .base import (Attack, TappedStudent, TeacherFeatures, check_temperature_alpha, kd_per_sample, match_spatial,
                   probe_shapes, register_attack, resolve_stage, stage_names)


def default_stage(model: nn.Module, what: str) -> int:
    return (len(stage_names(model, what)) + 1) // 2


def make_adapter(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """The regressor from a student stage output to a teacher stage output."""
    if len(student_shape) == 3 and len(teacher_shape) == 3:
        return nn.Conv2d(student_shape[0], teacher_shape[0], 1, bias=False)
    if len(student_shape) not in (1, 3) or len(teacher_shape) not in (1, 3):
        raise NastyError(f"hint: cannot match stage outputs of shapes {student_shape} and {teacher_shape}")
    return nn.Linear(student_shape[0], teacher_shape[0], bias=False)


def hint_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, adapter: nn.Module) -> torch.Tensor:
    """``MSE(adapter(F_S), F_T)`` (mean over all elements), shapes matched as described above."""
    if student_feat.dim() == 4 and teacher_feat.dim() == 4:
        r, t = match_spatial(adapter(student_feat), teacher_feat)
        return F.mse_loss(r, t)
    s = student_feat.mean((2, 3)) if student_feat.dim() == 4 else student_feat
    t = teacher_feat.mean((2, 3)) if teacher_feat.dim() == 4 else teacher_feat
    return F.mse_loss(adapter(s), t)


@register_attack
class Hint(Attack):
    name = "hint"
    summary = "FitNets: regress a student stage onto a teacher stage through an adapter (white-box)"
    accepts = ("weights",)
    params = {"student_stage": None, "teacher_stage": None, "beta": 1.0, "alpha": 0.0, "temperature": 4.0, "hint_epochs": 0}

    def validate(self):
        p = self.p
        check_temperature_alpha(p)
        if not p["beta"] >= 0:
            raise NastyError(f"hint beta must be >= 0, got {p['beta']}")
        if isinstance(p["hint_epochs"], bool) or not isinstance(p["hint_epochs"], int) or p["hint_epochs"] < 0:
            raise NastyError(f"hint hint_epochs must be an integer >= 0, got {p['hint_epochs']!r}")

    def train(self, ctx):
        d = ctx.data
        student, teacher_model = self.build_student(ctx), ctx.teacher.model
        s_name = resolve_stage(student, self.p["student_stage"] or default_stage(student, "student"), "student")
        t_name = resolve_stage(teacher_model, self.p["teacher_stage"] or default_stage(teacher_model, "teacher"), "teacher")
        feats = TeacherFeatures(ctx.teacher, [t_name], d.in_channels, d.image_size)
        s_shape = probe_shapes(student, [s_name], d.in_channels, d.image_size)[s_name]
        wrapped = TappedStudent(student, [s_name], nn.ModuleDict({"adapter": make_adapter(s_shape, feats.shapes[0])}))
        teacher = Frozen(feats, len(ctx.train_split()[0]), cache=ctx.cache_teacher)
        T, a, beta, warm = self.p["temperature"], self.p["alpha"], self.p["beta"], self.p["hint_epochs"]

        def loss(model, batch, epoch):
            z = model(batch.x)
            zt, (ft,) = feats.unpack(teacher(batch))
            hl = hint_loss(model.tap[s_name], ft, model.extra["adapter"])
            if epoch < warm:
                return beta * hl, {"hint": hl.item()}
            ce = labelled_ce(z, batch.y)
            kd = kd_per_sample(z, zt, T).mean() if a > 0 else z.new_zeros(())
            return (1 - a) * ce + a * kd + beta * hl, {"hint": hl.item(), "ce": ce.item()}

        res = ctx.fit(wrapped, Objective(loss, frozen=[teacher]), eval_model=student, desc=f"hint:{ctx.student}")
        wrapped.release()
        return student, {"best_epoch": res.best_epoch, "val_accuracy": res.best_val_accuracy,
                         "stages": {"student": s_name, "teacher": t_name}}
