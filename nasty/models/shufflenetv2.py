"""ShuffleNetV2 (Ma et al. 2018), CIFAR variant: 3x3 stride-1 stem, no max-pool."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._registry import register_model

_WIDTHS = {0.5: (48, 96, 192, 1024), 1.0: (116, 232, 464, 1024), 1.5: (176, 352, 704, 1024), 2.0: (244, 488, 976, 2048)}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride == 2:
            self.left = nn.Sequential(
                nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True),
            )
            rin = cin
        else:
            self.left = None
            rin = branch
        self.right = nn.Sequential(
            nn.Conv2d(rin, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True),
            nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False), nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.left is None:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.right(b)], 1)
        else:
            out = torch.cat([self.left(x), self.right(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2C(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: float):
        super().__init__()
        if width in _WIDTHS:
            c1, c2, c3, last = _WIDTHS[width]
        else:  # free multiplier: keep channel counts even
            c1, c2, c3 = (max(8, 2 * int(round(c * width / 2))) for c in (116, 232, 464))
            last = max(64, int(round(1024 * width)))
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        prev, self.stage_names = 24, []
        for i, (c, n) in enumerate(zip((c1, c2, c3), (4, 8, 4))):
            blocks = [ShuffleBlock(prev if j == 0 else c, c, 2 if j == 0 else 1) for j in range(n)]
            setattr(self, f"stage{i + 2}", nn.Sequential(*blocks))
            self.stage_names.append(f"stage{i + 2}")
            prev = c
        self.conv_last = nn.Sequential(nn.Conv2d(prev, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU(inplace=True))
        self.head = nn.Linear(last, num_classes)
        self.num_features = last

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.conv_last(x).mean(dim=(2, 3))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def shufflenetv2(num_classes: int, in_channels: int, image_size: tuple[int, int], width: float = 1.0) -> nn.Module:
    """ShuffleNetV2, CIFAR variant (3x3 stride-1 stem, no max-pool), width 0.5/1/1.5/2 or free."""
    return ShuffleNetV2C(num_classes, in_channels, width)
