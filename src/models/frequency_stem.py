"""Networks that take block-DCT inputs (Xu, Qin, Sun et al., "Learning in the Frequency Domain", CVPR 2020).

The DCT tensor (frequency channels at 1/block of the image's resolution) replaces the image, and only the layers
that read the image change; every other layer is kept as it is:

* torchvision ResNets (the paper's surgery, as in the authors' ResNet-50): the stem (conv1, bn1, relu, max-pool)
  is removed and the DCT tensor goes straight into layer1, whose first block reads the frequency channels: its
  first conv becomes a 1x1 conv from them (a 3x3 one in a basic block) and its shortcut a 1x1 conv + BN from
  them. The paper feeds the 8x8-block grid of a 2x-upsampled image, which has the removed stem's 1/4
  resolution (``dataset.dct_upsample=2``, ``dct_block=8``).
* MobileNetV2: the first conv reads the frequency channels, at stride 1 (the block already reduced the
  resolution); the rest is unchanged.
* CIFAR-style ResNets and VGG: the first conv reads the frequency channels (3x3, stride 1 as before). These
  networks have no stem reduction, so the grid is the network's first-stage resolution.

Any other network is refused (a ValueError the pipeline turns into exit 2).
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from compress_run.models.cifar_resnet import CifarResNet
from compress_run.models.cifar_vgg import CifarVGG


def _conv_like(conv: nn.Conv2d, in_channels: int, kernel: int | None = None, stride: int | None = None) -> nn.Conv2d:
    k = conv.kernel_size[0] if kernel is None else kernel
    new = nn.Conv2d(in_channels, conv.out_channels, k, conv.stride if stride is None else stride, k // 2,
                    bias=conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    return new


def take_frequency_input(net: nn.Module, channels: int) -> nn.Module:
    """Adapt ``net`` in place to ``channels`` frequency channels (module docstring); returns it."""
    if isinstance(net, ResNet):
        for name in ("conv1", "bn1", "relu", "maxpool"):
            setattr(net, name, nn.Identity())
        first = net.layer1[0]
        if isinstance(first, Bottleneck):
            first.conv1 = _conv_like(first.conv1, channels, kernel=1)
        elif isinstance(first, BasicBlock):
            first.conv1 = _conv_like(first.conv1, channels)
        else:
            raise ValueError(f"a ResNet whose first block is a {type(first).__name__} cannot take DCT inputs")
        out = first.conv3.out_channels if isinstance(first, Bottleneck) else first.conv2.out_channels
        first.downsample = nn.Sequential(nn.Conv2d(channels, out, 1, first.conv2.stride, bias=False),
                                         nn.BatchNorm2d(out))
        return net
    if isinstance(net, CifarResNet | CifarVGG):
        conv_name = "conv1" if isinstance(net, CifarResNet) else "features.0"
        parent, attr = (net, "conv1") if conv_name == "conv1" else (net.features, "0")
        setattr(parent, attr, _conv_like(net.get_submodule(conv_name), channels))
        return net
    features = getattr(net, "features", None)
    if type(net).__name__ == "MobileNetV2" and features is not None:
        features[0][0] = _conv_like(features[0][0], channels, stride=1)
        return net
    raise ValueError(f"{type(net).__name__} has no frequency-input adaptation (torchvision ResNets, MobileNetV2, "
                     "the CIFAR-style ResNets and VGG have one); use dataset.input_domain=spatial with it")
