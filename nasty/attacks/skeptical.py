"""Skeptical student (Kundu et al., NeurIPS 2021, "Analyzing the Confidentiality of Undistillable
Teachers in Knowledge Distillation"): distil the teacher only into a *shallow auxiliary head*
attached to an intermediate stage of the student, so the nasty signal reaches a shallow part of the
network; the final head learns from labels and self-distillation. Inference uses the final head
(the saved student is the plain architecture; the auxiliary heads are discarded).

Works for any registered student: auxiliary heads hang on forward hooks at its ``stage_names``.
With ``n`` stages, stage ``h = head_stage`` (default ``max(1, n - 2)``) carries the teacher's head
and stage ``s = sd_stage`` (default ``max(1, n - 1)``) the self-distillation head. The warm-up is
the official code's: while ``epoch <= kd_delay`` (``kd_delay + 1`` epochs, published ``kd_delay``
20) only the final head learns, with ``CE`` (``warmup=all``: the variant with ``CE`` on every head
for ``kd_delay`` epochs). A run too short for the delay (``epochs <= kd_delay + 1``) uses half its
epochs and says so in its notes. Then the loss is the reference one:

``a T^2 KL(sig_T(z_T) || sig_T(z_h)) + (1-a) CE(z_h, y)
+ g KL(sig_T(z_final) || sig_T(z_s)) + (1-g) CE(z_s, y) + CE(z_final, y)``

with ``g = sd_weight`` (0.3); the self-distillation KL is written out, so its gradient reaches
both the final head and head ``s``. When ``h = s`` one head receives both groups of terms.
Auxiliary head: conv3x3-BN-ReLU, global average pool, linear (``head_width`` channels, default the
student's final width) on feature maps; linear-ReLU-linear on vectors.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import NastyError
from ..losses import kl_div
from ..metrics import accuracy, predict_logits
from .augment import mixed_ce
from ..params import Param
from ..train import Objective
from .base import Attack, TappedStudent, check_temperature_alpha, kd_per_sample, probe_shapes, register_attack, resolve_stage, stage_names


def aux_head(shape: tuple[int, ...], num_classes: int, width: int) -> nn.Module:
    """A small classifier on a stage output of ``shape`` (``(C, H, W)`` or ``(D,)``)."""
    if len(shape) == 3:
        return nn.Sequential(nn.Conv2d(shape[0], width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
    if len(shape) == 1:
        return nn.Sequential(nn.Linear(shape[0], width), nn.ReLU(inplace=True), nn.Linear(width, num_classes))
    raise NastyError(f"skeptical: cannot attach a head to a stage output of shape {shape}")


@register_attack
class Skeptical(Attack):
    name = "skeptical"
    summary = "teacher distilled into a shallow auxiliary head; final head from labels + self-distillation (Kundu et al. 2021)"
    accepts = ("weights", "logits", "probs", "topk")
    supports_augment = True
    params = {"temperature": 4.0, "alpha": 0.9,
              "head_stage": Param("int?", None, "skeptical: student stage (1-based) whose auxiliary head learns from the teacher."),
              "sd_stage": None, "sd_weight": 0.3,
              "kd_delay": Param("int", 20, "skeptical: labels-only warm-up epochs before distillation.", lambda v: v >= 0,
                                "an integer >= 0 (epochs)"),
              "warmup": "final", "head_width": None}

    def validate(self):
        p = self.p
        check_temperature_alpha(p)
        if not 0 <= p["sd_weight"] <= 1:
            raise NastyError(f"skeptical sd_weight must be in [0, 1], got {p['sd_weight']}")
        if p["warmup"] not in ("final", "all"):
            raise NastyError(f"skeptical warmup must be final (official: CE on the final head) or all, got {p['warmup']!r}")
        hw = p["head_width"]
        if hw is not None and (isinstance(hw, bool) or not isinstance(hw, int) or hw < 1):
            raise NastyError(f"skeptical head_width must be a positive integer, got {hw!r}")

    def layout(self, student: nn.Module) -> tuple[str, str]:
        n = len(stage_names(student, "student"))
        h = self.p["head_stage"] if self.p["head_stage"] is not None else max(1, n - 2)
        s = self.p["sd_stage"] if self.p["sd_stage"] is not None else max(1, n - 1)
        return resolve_stage(student, h, "student"), resolve_stage(student, s, "student")

    def train(self, ctx):
        d = ctx.data
        student = self.build_student(ctx)
        h, s = self.layout(student)
        shapes = probe_shapes(student, [h, s], d.in_channels, d.image_size)
        width = self.p["head_width"] or int(getattr(student, "num_features", 64))
        heads = nn.ModuleDict({name.replace(".", "_"): aux_head(shapes[name], d.num_classes, width) for name in dict.fromkeys([h, s])})
        wrapped = TappedStudent(student, [h, s], heads)
        teacher = ctx.frozen_teacher()
        mix = ctx.mixer()
        T, a, g, delay = self.p["temperature"], self.p["alpha"], self.p["sd_weight"], self.p["kd_delay"]
        official = self.p["warmup"] == "final"
        warm_epochs = delay + 1 if official else delay
        if warm_epochs >= ctx.train.epochs:
            warm_epochs = ctx.train.epochs // 2
            ctx.notes.append(f"kd_delay {delay} leaves no distillation epoch in {ctx.train.epochs}: warm-up shortened to {warm_epochs} epochs")
        kh, ks = h.replace(".", "_"), s.replace(".", "_")

        def loss(model, batch, epoch):
            warm = epoch < warm_epochs
            m = mix.identity(batch) if warm else mix(batch)
            z = model(m.x)
            ce_f = mixed_ce(z, m)
            if warm and official:
                return ce_f, {"ce": ce_f.item()}
            zh = model.extra[kh](model.tap[h])
            zs = zh if ks == kh else model.extra[ks](model.tap[s])
            if warm:
                loss = ce_f + mixed_ce(zh, m) + (mixed_ce(zs, m) if ks != kh else 0.0)
                return loss, {"ce": ce_f.item()}
            kd = kd_per_sample(zh, teacher(m.batch), T).mean()
            sd = kl_div(torch.log_softmax(z / T, 1), torch.log_softmax(zs / T, 1))
            loss = a * kd + (1 - a) * mixed_ce(zh, m) + g * sd + (1 - g) * mixed_ce(zs, m) + ce_f
            return loss, {"kd_kl": kd.item() / T**2, "self_kl": sd.item(), "ce": ce_f.item()}

        warm_best: dict = {"val": -1.0, "epoch": 0, "state": None}

        def keep_warm_best(model, done: int) -> None:  # the warm-up is labels only: its best epoch is the label-only answer
            if done <= warm_epochs:
                acc = accuracy(predict_logits(student, d.x_val).argmax(1), d.y_val)
                if acc > warm_best["val"]:
                    warm_best.update(val=acc, epoch=done, state=copy.deepcopy(student.state_dict()))

        # the epoch is chosen after the warm-up: selecting inside it would return the label-only student
        res = ctx.fit(wrapped, Objective(loss, frozen=[teacher], end_of_epoch=keep_warm_best), eval_model=student,
                      desc=f"skeptical:{ctx.student}", select_from=warm_epochs + 1)
        wrapped.release()
        best_epoch, best_val = res.best_epoch, res.best_val_accuracy
        if warm_best["state"] is not None and warm_best["val"] > best_val:
            student.load_state_dict(warm_best["state"])
            ctx.notes.append(f"skeptical: the thief's validation split says labels win (warm-up epoch {warm_best['epoch']}: "
                             f"{warm_best['val']:.2f}% vs {best_val:.2f}% after distilling); the label-only warm-up student is kept")
            best_epoch, best_val = warm_best["epoch"], warm_best["val"]
        return student, {"best_epoch": best_epoch, "val_accuracy": best_val,
                         "heads": {"teacher_head_stage": h, "self_distillation_stage": s}}
