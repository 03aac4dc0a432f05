"""CIFAR ResNets: pre-activation ResNet-20/32/56 ("ResNetC", 6n+2 layers, He et al. 2016) and
ResNet-18 with a 3x3 stride-1 stem and no max-pool, as used by the nasty-teacher paper."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._registry import register_model


def _w(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class PreActResNetC(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int, width: float):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("depth must be 6n+2")
        n = (depth - 2) // 6
        widths = [_w(c, width) for c in (16, 32, 64)]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        prev, self.stage_names = widths[0], []
        for i, c in enumerate(widths):
            blocks = [PreActBlock(prev if j == 0 else c, c, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{i + 1}")
            prev = c
        self.bn = nn.BatchNorm2d(prev)
        self.head = nn.Linear(prev, num_classes)
        self.num_features = prev

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = F.relu(self.bn(x))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def resnet20(num_classes: int, in_channels: int, image_size: tuple[int, int], width: float = 1.0) -> nn.Module:
    """Pre-activation CIFAR ResNet-20 (widths 16/32/64 x ``width``)."""
    return PreActResNetC(20, num_classes, in_channels, width)


@register_model
def resnet32(num_classes: int, in_channels: int, image_size: tuple[int, int], width: float = 1.0) -> nn.Module:
    """Pre-activation CIFAR ResNet-32 (widths 16/32/64 x ``width``)."""
    return PreActResNetC(32, num_classes, in_channels, width)


@register_model
def resnet56(num_classes: int, in_channels: int, image_size: tuple[int, int], width: float = 1.0) -> nn.Module:
    """Pre-activation CIFAR ResNet-56 (widths 16/32/64 x ``width``)."""
    return PreActResNetC(56, num_classes, in_channels, width)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18C(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: float):
        super().__init__()
        widths = [_w(c, width) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        prev, self.stage_names = widths[0], []
        for i, c in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(prev, c, stride), BasicBlock(c, c, 1)))
            self.stage_names.append(f"layer{i + 1}")
            prev = c
        self.head = nn.Linear(prev, num_classes)
        self.num_features = prev

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def resnet18(num_classes: int, in_channels: int, image_size: tuple[int, int], width: float = 1.0) -> nn.Module:
    """CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool, widths 64..512 x ``width``."""
    return ResNet18C(num_classes, in_channels, width)
