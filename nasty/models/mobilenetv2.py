"""MobileNetV2 (Sandler et al. 2018), CIFAR variant: stride-1 stem and first stages at stride 1."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._registry import register_model

# (expansion, out channels, repeats, stride): CIFAR variant keeps stride 1 for the first two stages
_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2C(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: float):
        super().__init__()

        def w(c: int) -> int:
            return max(4, int(round(c * width)))

        self.stem = nn.Sequential(nn.Conv2d(in_channels, w(32), 3, 1, 1, bias=False), nn.BatchNorm2d(w(32)), nn.ReLU6(inplace=True))
        prev, self.stage_names = w(32), []
        for i, (t, c, n, s) in enumerate(_CFG):
            blocks = [InvertedResidual(prev if j == 0 else w(c), w(c), t, s if j == 0 else 1) for j in range(n)]
            setattr(self, f"stage{i + 1}", nn.Sequential(*blocks))
            self.stage_names.append(f"stage{i + 1}")
            prev = w(c)
        last = max(w(1280), 64)
        self.conv_last = nn.Sequential(nn.Conv2d(prev, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(last, num_classes)
        self.num_features = last

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.pool(self.conv_last(x)).flatten(1)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def mobilenetv2(num_classes: int, in_channels: int, image_size: tuple[int, int], width: float = 1.0) -> nn.Module:
    """MobileNetV2, CIFAR variant (stride-1 stem), channel multiplier ``width``."""
    return MobileNetV2C(num_classes, in_channels, width)
