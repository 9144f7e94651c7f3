"""torchvision ResNet-18/34/50/101 and MobileNetV2 built from scratch and adapted to the dataset.

* ``num_classes`` goes to the constructor; ``in_channels`` replaces the stem conv's input channels.
* ``stem``: ``imagenet`` keeps the 7x7/2 stem (+ max-pool) / stride-2 first conv; ``cifar`` uses a
  3x3 stride-1 stem without max-pool (the usual small-input adaptation); ``auto`` picks ``cifar`` for
  ``image_size <= 64``.
* ``width_mult``: MobileNetV2's own width multiplier; ResNets scale their base width (64 at 1.0).
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm


def _small(stem: str, image_size: int) -> bool:
    return stem == "cifar" or (stem == "auto" and image_size <= 64)


def _resnet(arch: str, num_classes: int, in_channels: int, image_size: int, width_mult: float,
            stem: str) -> nn.Module:
    if width_mult == 1.0:
        model = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    else:
        block, layers = {"resnet18": (tvm.resnet.BasicBlock, [2, 2, 2, 2]),
                         "resnet34": (tvm.resnet.BasicBlock, [3, 4, 6, 3]),
                         "resnet50": (tvm.resnet.Bottleneck, [3, 4, 6, 3]),
                         "resnet101": (tvm.resnet.Bottleneck, [3, 4, 23, 3])}[arch]
        model = _ScaledResNet(block, layers, num_classes=num_classes, base=max(1, round(64 * width_mult)))
    width = model.conv1.out_channels
    if _small(stem, image_size):
        model.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


class _ScaledResNet(tvm.ResNet):
    """torchvision ResNet whose stage widths are base, 2*base, 4*base, 8*base."""

    def __init__(self, block: type, layers: list[int], num_classes: int, base: int) -> None:
        super().__init__(block, layers, num_classes=num_classes)
        self.inplanes = base
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.layer1 = self._make_layer(block, base, layers[0])
        self.layer2 = self._make_layer(block, base * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base * 8, layers[3], stride=2)
        self.fc = nn.Linear(base * 8 * block.expansion, num_classes)


def resnet18(num_classes: int, in_channels: int, image_size: int, width_mult: float = 1.0,
             stem: str = "auto") -> nn.Module:
    return _resnet("resnet18", num_classes, in_channels, image_size, width_mult, stem)


def resnet34(num_classes: int, in_channels: int, image_size: int, width_mult: float = 1.0,
             stem: str = "auto") -> nn.Module:
    return _resnet("resnet34", num_classes, in_channels, image_size, width_mult, stem)


def resnet101(num_classes: int, in_channels: int, image_size: int, width_mult: float = 1.0,
              stem: str = "auto") -> nn.Module:
    return _resnet("resnet101", num_classes, in_channels, image_size, width_mult, stem)


def resnet50(num_classes: int, in_channels: int, image_size: int, width_mult: float = 1.0,
             stem: str = "auto") -> nn.Module:
    return _resnet("resnet50", num_classes, in_channels, image_size, width_mult, stem)


def mobilenet_v2(num_classes: int, in_channels: int, image_size: int, width_mult: float = 1.0,
                 stem: str = "auto") -> nn.Module:
    model = tvm.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
    first = model.features[0][0]
    stride = 1 if _small(stem, image_size) else 2
    if stride != first.stride[0] or in_channels != first.in_channels:
        conv = nn.Conv2d(in_channels, first.out_channels, 3, stride, 1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out")
        model.features[0][0] = conv
    return model
