"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): white-box feature distillation that
matches normalised spatial attention maps between paired stages:
``at(F) = normalize(vec(mean_c |F_c|^p))`` (p = 2) and
``L = (1-a) CE(z_S, y) + a T^2 KL(sig_T(z_T) || sig_T(z_S)) + beta/2 * sum_pairs mean((at(F_S) - at(F_T))^2)``
with ``beta = 1000`` as in the paper's code. Attention maps are channel-free, so no adapter is needed
when widths differ; where spatial sizes differ the larger map is average-pooled to the smaller.

Pairs: ``pairs = "1:1,2:2"`` (student stage : teacher stage, 1-based); default: every student
stage ``i`` with teacher stage ``round(i * n_T / n_S)``. Needs feature maps on both sides (an MLP
student has none).
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


def attention_map(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``mean_c |F_c|^p`` per position, shape ``(B, H, W)`` (not yet normalised)."""
    return feat.abs().pow(p).mean(1)


def at_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``mean((normalize(at_S) - normalize(at_T))^2)`` after matching spatial sizes."""
    a_s, a_t = match_spatial(attention_map(student_feat, p), attention_map(teacher_feat, p))
    return (F.normalize(a_s.flatten(1), dim=1) - F.normalize(a_t.flatten(1), dim=1)).pow(2).mean()


def parse_pairs(spec, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    if spec is None:
        return [(i, max(1, round(i * n_teacher / n_student))) for i in range(1, n_student + 1)]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        try:
            s, t = (int(v) for v in (item.split(":") if isinstance(item, str) else item))
        except (ValueError, TypeError):
            raise NastyError(f"attention pairs must look like '1:1,2:3' (student:teacher stages), got {spec!r}") from None
        out.append((s, t))
    if not out:
        raise NastyError("attention pairs is empty")
    return out


@register_attack
class Attention(Attack):
    name = "attention"
    summary = "attention transfer: match spatial attention maps of paired stages (white-box)"
    accepts = ("weights",)
    params = {"pairs": None, "beta": 1000.0, "p": 2.0, "alpha": 0.0, "temperature": 4.0}

    def validate(self):
        check_temperature_alpha(self.p)
        if not self.p["beta"] >= 0:
            raise NastyError(f"attention beta must be >= 0, got {self.p['beta']}")
        if not self.p["p"] > 0:
            raise NastyError(f"attention p must be positive, got {self.p['p']}")

    def train(self, ctx):
        d = ctx.data
        student, teacher_model = self.build_student(ctx), ctx.teacher.model
        pairs = parse_pairs(self.p["pairs"], len(stage_names(student, "student")), len(stage_names(teacher_model, "teacher")))
        names = [(resolve_stage(student, s, "student"), resolve_stage(teacher_model, t, "teacher")) for s, t in pairs]
        s_names, t_names = [s for s, _ in names], list(dict.fromkeys(t for _, t in names))
        feats = TeacherFeatures(ctx.teacher, t_names, d.in_channels, d.image_size)
        s_shapes = probe_shapes(student, s_names, d.in_channels, d.image_size)
        for (s, t), t_shape in zip(names, [feats.shapes[t_names.index(t)] for _, t in names]):
            if len(s_shapes[s]) != 3 or len(t_shape) != 3:
                raise NastyError(f"attention transfer needs feature maps: student stage {s} gives {s_shapes[s]}, "
                                 f"teacher stage {t} gives {t_shape} (use a convolutional student, or the hint attack)")
        wrapped = TappedStudent(student, s_names, nn.ModuleDict())
        teacher = Frozen(feats, len(ctx.train_split()[0]), cache=ctx.cache_teacher)
        T, a, beta, p = self.p["temperature"], self.p["alpha"], self.p["beta"], self.p["p"]

        def loss(model, batch, epoch):
            z = model(batch.x)
            zt, fts = feats.unpack(teacher(batch))
            ft = dict(zip(t_names, fts))
            at = sum(at_loss(model.tap[s], ft[t], p) for s, t in names)
            ce = labelled_ce(z, batch.y)
            kd = kd_per_sample(z, zt, T).mean() if a > 0 else z.new_zeros(())
            return (1 - a) * ce + a * kd + beta / 2 * at, {"at": at.item(), "ce": ce.item()}

        res = ctx.fit(wrapped, Objective(loss, frozen=[teacher]), eval_model=student, desc=f"attention:{ctx.student}")
        wrapped.release()
        return student, {"best_epoch": res.best_epoch, "val_accuracy": res.best_val_accuracy,
                         "pairs": [{"student": s, "teacher": t} for s, t in names]}
