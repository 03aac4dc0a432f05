"""The nasty-teacher paper's plain CNN: 3 blocks conv3x3 -> BN -> max-pool -> ReLU, then FC."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._registry import register_model


class PlainCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: tuple[int, int], channels: tuple[int, ...]):
        super().__init__()
        self.stage_names = []
        size, prev = min(image_size), in_channels
        for i, c in enumerate(channels):
            pool = nn.MaxPool2d(2) if size >= 2 else nn.Identity()
            size //= 2 if size >= 2 else 1
            setattr(self, f"block{i + 1}", nn.Sequential(nn.Conv2d(prev, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), pool, nn.ReLU(inplace=True)))
            self.stage_names.append(f"block{i + 1}")
            prev = c
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(prev, num_classes)
        self.num_features = prev

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.pool(x).flatten(1)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def cnn(num_classes: int, in_channels: int, image_size: tuple[int, int], width: float = 1.0) -> nn.Module:
    """Plain 3-block CNN, channels 32/64/128 x ``width`` (Ma et al. 2021)."""
    if width <= 0:
        raise ValueError("width must be positive")
    return PlainCNN(num_classes, in_channels, image_size, tuple(max(1, int(round(c * width))) for c in (32, 64, 128)))
