"""Multi-layer perceptron: the smallest student, no spatial prior."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._registry import register_model


class MLP(nn.Module):
    def __init__(self, num_classes: int, in_features: int, hidden: tuple[int, ...]):
        super().__init__()
        width = in_features
        self.stage_names = []
        for i, h in enumerate(hidden):
            setattr(self, f"fc{i}", nn.Sequential(nn.Linear(width, h), nn.ReLU(inplace=True)))
            self.stage_names.append(f"fc{i}")
            width = h
        self.head = nn.Linear(width, num_classes)
        self.num_features = width

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def mlp(num_classes: int, in_channels: int, image_size: tuple[int, int], hidden: int | list[int] = 256) -> nn.Module:
    """MLP with ReLU hidden layers (``hidden``: an int or a list of widths)."""
    hidden_t = (hidden,) if isinstance(hidden, int) else tuple(int(h) for h in hidden)
    if not hidden_t or min(hidden_t) < 1:
        raise ValueError("hidden widths must be positive")
    return MLP(num_classes, in_channels * image_size[0] * image_size[1], hidden_t)
