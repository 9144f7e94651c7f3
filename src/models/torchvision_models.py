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

from compress_run.models.by_name import check_width, checked_run


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


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Give the first 3-channel conv ``in_channels`` inputs (grey-scale data on an RGB architecture)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            conv = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                             module.dilation, bias=module.bias is not None, padding_mode=module.padding_mode)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], conv)
            return
    raise ValueError(f"found no 3-channel input conv to adapt to in_channels={in_channels}")


def any_model(name: str, num_classes: int, in_channels: int, image_size: int, width_mult: float = 1.0) -> nn.Module:
    """Any torchvision classification model by name (``tvm.list_models``), from scratch, adapted to the data.

    ``num_classes`` goes to the constructor (and ``image_size`` for the ViTs, whose position embedding
    depends on it); ``in_channels`` != 3 replaces the input conv. The architecture is taken as published:
    no small-input stem, no width multiplier (pick a smaller variant). A model that cannot be built or
    cannot run on ``image_size`` inputs is refused with the reason (a ValueError: exit 2 in the pipeline).
    """
    names = tvm.list_models(module=tvm)
    if name not in names:
        raise ValueError(f"model.name={name!r} is not a torchvision classification model; choose one of "
                         f"{', '.join(names)}")
    check_width("torchvision", width_mult)
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if name.startswith("vit_"):
        kwargs["image_size"] = image_size
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    try:
        model = tvm.get_model(name, **kwargs)
    except (AssertionError, ValueError, TypeError) as exc:
        raise ValueError(f"torchvision {name} cannot be built for image_size={image_size}: {exc or type(exc).__name__}"
                         ) from exc
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return checked_run(model, f"torchvision {name}", in_channels, image_size)
