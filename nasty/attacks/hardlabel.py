"""The hard-label floor of a thief with a few labels and many queries: cross-entropy on its own labels
where it has them and on the teacher's top-1 answer for every unlabelled query (Copycat's extraction,
Correia-Silva et al. 2018, plus the thief's labelled images). A defense that keeps the teacher's
decisions cannot lower this floor: a thief always gets at least this much from a decision-keeping
teacher, so a defense's leakage is measured above the better of this floor and labels alone. Label
smoothing (Szegedy et al. 2016) raises it: with ``tune`` it is chosen among 0, 0.1 and 0.3 on the thief's
validation split, from 0.3 as a floor of the thief's regime (``floor_params``); it still reads only the
thief's labels and the teacher's decisions. As floors, the probe and the audit use each smoothing of the
grid (:func:`variant`): a split of a few images cannot choose among them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..train import Objective
from .base import TUNE, register_attack
from .copycat import Copycat

TUNE_SMOOTHING = (0.0, 0.1, 0.3)


def variant(label_smoothing: float) -> str:
    """The name of hard-label at one label smoothing as a floor of its own: ``hard-label:ls=0.1``."""
    return f"hard-label:ls={label_smoothing:g}"


@register_attack
class HardLabel(Copycat):
    name = "hard-label"
    summary = "the decision floor: CE on the thief's labels and on the teacher's top-1 for its unlabelled queries"
    uses_labels = True  # Copycat with the thief's own labels where it has them (without any label it is Copycat)
    floor = True
    floor_params = {"label_smoothing": 0.3}  # the smoothing that raised this floor most against a decision-locked teacher (digits)
    params = {**Copycat.params, "tune": TUNE}

    def tuning_grid(self, labels: bool = True) -> list[dict]:
        """The label smoothings 0, 0.1 and 0.3."""
        return [{"label_smoothing": ls} for ls in TUNE_SMOOTHING]

    def variant_name(self, values: dict) -> str:
        return variant(values["label_smoothing"])

    def objective(self, ctx, student):
        teacher = ctx.frozen_teacher()
        ls = self.p["label_smoothing"]

        def loss(model, batch, epoch):
            y = batch.y
            if bool((y < 0).any()):
                y = torch.where(y >= 0, y, teacher(batch).argmax(1))
            return F.cross_entropy(model(batch.x), y, label_smoothing=ls), {}

        return Objective(loss, frozen=[teacher])
