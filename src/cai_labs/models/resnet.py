"""ResNet-50 (He et al., 2016), written out so it can be traced without torchvision.

The layout is torchvision's ``resnet50``: a 7x7 stride-2 stem convolution, batch norm, ReLU and
a 3x3 stride-2 max pool, then four stages of ``[3, 4, 6, 3]`` bottleneck blocks (1x1 reduce,
3x3, 1x1 expand by 4), global average pooling and a linear classifier: 53 convolutions and one
linear layer. ``width`` is the channel count of the first stage (64 in the paper); the tutorials
use a smaller width so a CPU step takes milliseconds. Shapes: images ``(b, 3, H, W)`` ->
logits ``(b, num_classes)``; every stage after the first halves ``H`` and ``W``.

The residual sum is written ``out = out + identity`` (not in place) and ReLUs are not in place,
so ``torch.fx`` sees every tensor as a separate value.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Bottleneck", "ResNet", "resnet50"]


class Bottleneck(nn.Module):
    """``(b, c_in, h, w) -> (b, 4 * planes, h / stride, w / stride)``: 1x1, 3x3, 1x1 + shortcut."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu3 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(nn.Module):
    """Stem, four stages of bottlenecks, pool, classifier. ``seed`` makes weights reproducible."""

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        width: int = 64,
        num_classes: int = 10,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages, c_in = [], width
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(c_in, planes, stride=2 if (i > 0 and j == 0) else 1))
                c_in = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def chain(self) -> list[nn.Module]:
        """The model as a chain of stages (stem, each bottleneck, head) for checkpointing."""
        head = nn.Sequential(self.avgpool, nn.Flatten(1), self.fc)
        return [self.stem, *self.layer1, *self.layer2, *self.layer3, *self.layer4, head]


def resnet50(width: int = 64, num_classes: int = 10, seed: int | None = None) -> ResNet:
    """ResNet-50: ``[3, 4, 6, 3]`` bottlenecks; ``width=64`` is the published network."""
    return ResNet((3, 4, 6, 3), width=width, num_classes=num_classes, seed=seed)
