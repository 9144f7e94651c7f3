"""Networks that take block-DCT inputs (Xu, Qin, Sun et al., "Learning in the Frequency Domain", CVPR 2020).

The DCT tensor (frequency channels at 1/block of the image's resolution) replaces the image, and only the layers
that read the image, plus one stride in a torchvision ResNet, change:

* torchvision ResNets: the authors' DCT ResNet (kaix90/DCTNet, classification/models/imagenet/resnet.py:
  ``ResNetDCT_Upscaled_Static.__init__``, built on that file's ``ResNet.__init__``). The stem (conv1, bn1, relu,
  max-pool) is removed and the DCT tensor goes straight into layer1, whose first block reads the frequency
  channels: its first conv becomes a 1x1 conv from them (a 3x3 one in a basic block) and its shortcut a 1x1
  conv + BN from them. layer2's first block runs at stride 1 instead of 2 (the authors' ``ResNet`` builds
  ``layer2`` with ``stride=1``, "to match the input size"). The paper feeds the 8x8-block grid of the image at
  448x448 (``dataset.dct_upsample=2``, ``dct_block=8``: a 56x56 grid), so layers 2-4 run at the resolutions an RGB
  ResNet has on a 448x448 image, and the DCT ResNet-50 costs 13.7 GMACs (192 channels; 13.5 with 24) against
  the RGB ResNet-50's 4.09 at 224x224 and 16.35 at 448x448 (``tests/core/test_frequency_stem.py``). It is *not*
  MAC-equal to the RGB network at 224x224 that the paper compares it with.
* MobileNetV2: the first conv reads the frequency channels, at stride 1 (the block already reduced the
  resolution); the rest is unchanged (ours; the authors' MobileNetV2 is not followed here).
* CIFAR-style ResNets and VGG: the first conv reads the frequency channels (3x3, stride 1 as before). These
  networks have no stem reduction, so the grid is the network's first-stage resolution (ours: the authors have no
  such network).

Any other network is refused (a ValueError the pipeline turns into exit 2).

Initialisation from RGB weights (:func:`image_weights_for_frequency_input`, applied to ``init_ckpt``): the authors
start the DCT ResNet-50 from torchvision's RGB-pretrained ResNet-50. Every layer keeps its RGB weights; the stem's
are dropped; layer1's first conv and its shortcut conv keep the first ``channels`` input slices of their RGB
weights when the DCT input has at most as many channels as they read (24 or 64 of 64 in the authors' code), and
start fresh (Kaiming, fan-out) when it has more (the 192-channel gate network).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from compress_run.models.cifar_resnet import CifarResNet
from compress_run.models.cifar_vgg import CifarVGG

ROOT_NAME = "frequency_input"  # the child module that gates or selects the frequency channels (core)
STEM = ("conv1.", "bn1.")                                          # the image network's stem parameters
INPUT_CONVS = ("layer1.0.conv1.weight", "layer1.0.downsample.0.weight")  # the DCT ResNet's convs that read the input


def _conv_like(conv: nn.Conv2d, in_channels: int, kernel: int | None = None, stride: int | None = None) -> nn.Conv2d:
    k = conv.kernel_size[0] if kernel is None else kernel
    new = nn.Conv2d(in_channels, conv.out_channels, k, conv.stride if stride is None else stride, k // 2,
                    bias=conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    return new


def _layer2_at_stride_one(net: ResNet) -> None:
    """The authors' ``layer2 = _make_layer(block, 128, layers[1], stride=1)``: same weights, no downsampling."""
    first = net.layer2[0]
    (first.conv2 if isinstance(first, Bottleneck) else first.conv1).stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    first.stride = 1


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
        _layer2_at_stride_one(net)
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


def image_weights_for_frequency_input(net: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` made to initialise ``net``: when ``net`` is a torchvision ResNet adapted to DCT inputs and ``state``
    is the state dict of the same ResNet on images (it holds the stem's ``conv1.weight``), the authors'
    initialisation (kaix90/DCTNet, classification/models/imagenet/resnet.py: ``ResNetDCT_Upscaled_Static.__init__``):
    the stem's entries are dropped, each conv that reads the input keeps the first ``channels`` input slices of its
    image weights (``weight[:, :channels]``) when it reads no more channels than the image network's, and keeps its
    own fresh weights otherwise (the authors' 192-channel case); a gate or selection on the network and a basic
    block's new shortcut keep their own. Any other state is returned as it is (a strict load then judges it)."""
    if not (isinstance(net, ResNet) and isinstance(net.conv1, nn.Identity) and "conv1.weight" in state):
        return dict(state)
    own = net.state_dict()
    converted = {k: v for k, v in state.items() if not k.startswith(STEM)}
    for key in INPUT_CONVS:
        channels = own[key].shape[1]
        image = state.get(key)
        fits = image is not None and image.dim() == 4 and channels <= image.shape[1]
        converted[key] = image[:, :channels].clone() if fits else own[key]
    for key, value in own.items():
        if key not in converted and key.startswith((f"{ROOT_NAME}.", "layer1.0.downsample.")):
            converted[key] = value
    return converted
