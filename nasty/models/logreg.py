"""Multinomial logistic regression on the flattened image: the weakest student, a floor for what any
student learns from the labels alone (its one stage is the flattening, its head the linear map)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._registry import register_model


class LogReg(nn.Module):
    def __init__(self, num_classes: int, in_features: int):
        super().__init__()
        self.flat = nn.Flatten()
        self.stage_names = ["flat"]
        self.head = nn.Linear(in_features, num_classes)
        self.num_features = in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.flat(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def logreg(num_classes: int, in_channels: int, image_size: tuple[int, int]) -> nn.Module:
    """Multinomial logistic regression on the flattened image (no hidden layer)."""
    return LogReg(num_classes, in_channels * image_size[0] * image_size[1])
