"""CIFAR-style VGG-16 with BatchNorm (as in network slimming / CHEX CIFAR code).

13 3x3 conv+BN+ReLU layers in five blocks, each followed by 2x2 max pooling with ``ceil_mode`` (so
28x28 inputs work; identical to floor mode at 32x32), then one linear layer 512 -> num_classes.
On 3x32x32 this is 313.20 M MACs.
"""

from __future__ import annotations

import torch
from torch import nn

VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M")


class CifarVGG(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width_mult: float = 1.0,
                 cfg: tuple[int | str, ...] = VGG16_CFG) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                continue
            out = max(1, round(int(v) * width_mult))
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg16_bn(num_classes: int, in_channels: int, image_size: int, width_mult: float = 1.0) -> CifarVGG:
    return CifarVGG(num_classes, in_channels, width_mult)
