"""Model zoo: reference MAC/parameter counts, adaptation to channels/classes/small inputs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from compress_run.models import cifar_resnet, cifar_vgg, timm_models, torchvision_models


def macs(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    return counter.get_total_flops() // 2


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# reference counts: the MACs torchvision, timm and the papers publish for these models
@pytest.mark.parametrize(("builder", "shape", "classes", "ref_macs", "ref_params"), [
    (cifar_resnet.resnet20, (3, 32, 32), 10, 40551040, None),
    (cifar_resnet.resnet56, (3, 32, 32), 10, 125485696, None),
    (cifar_vgg.vgg16_bn, (3, 32, 32), 10, 313201664, None),
    (torchvision_models.resnet18, (3, 224, 224), 1000, 1814073344, 11689512),
    (torchvision_models.resnet50, (3, 224, 224), 1000, 4089184256, 25557032),
    (torchvision_models.mobilenet_v2, (3, 224, 224), 1000, 300774272, 3504872),
])
def test_reference_counts(builder, shape, classes, ref_macs, ref_params):
    model = builder(num_classes=classes, in_channels=shape[0], image_size=shape[1])
    assert macs(model, shape) == ref_macs
    if ref_params:
        assert params(model) == ref_params


def test_cifar_resnet_parameter_counts():
    assert round(params(cifar_resnet.resnet20(10, 3, 32)) / 1e6, 2) == 0.27
    assert round(params(cifar_resnet.resnet56(10, 3, 32)) / 1e6, 2) == 0.85
    assert round(params(cifar_vgg.vgg16_bn(10, 3, 32)) / 1e6, 2) == 14.72


def test_deit_parameter_counts():
    tiny = timm_models.vit("deit_tiny_patch16_224", num_classes=1000, in_channels=3, image_size=224)
    small = timm_models.vit("deit_small_patch16_224", num_classes=1000, in_channels=3, image_size=224)
    assert round(params(tiny) / 1e6, 2) == 5.72 and round(params(small) / 1e6, 2) == 22.05


@pytest.mark.parametrize("builder", [cifar_resnet.resnet32, cifar_vgg.vgg16_bn, torchvision_models.resnet18,
                                     torchvision_models.resnet50, torchvision_models.mobilenet_v2])
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (1, 8), (3, 32)])
def test_cnns_adapt_to_channels_classes_and_small_inputs(builder, channels, size):
    model = builder(num_classes=7, in_channels=channels, image_size=size, width_mult=0.25).eval()
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == channels


def test_torchvision_stem_choice():
    small = torchvision_models.resnet18(10, 1, 28)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    big = torchvision_models.resnet18(10, 1, 224)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.in_channels == 1
    assert torchvision_models.mobilenet_v2(10, 3, 32).features[0][0].stride == (1, 1)
    assert torchvision_models.mobilenet_v2(10, 3, 224).features[0][0].stride == (2, 2)


@pytest.mark.parametrize(("size", "patch"), [(224, 16), (32, 4), (28, 4), (8, 1)])
def test_vit_auto_patch_size_and_forward(size, patch):
    assert timm_models.auto_patch_size(size) == patch
    model = timm_models.vit("deit_tiny_patch16_224", num_classes=10, in_channels=1, image_size=size,
                            width_mult=0.25).eval()
    assert model.patch_embed.proj.kernel_size == (patch, patch)
    assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_fashion_mnist_vit_shape_and_cost():
    from hydra.utils import instantiate

    from tests.conftest import compose

    cfg, _ = compose(["model=vit_fmnist"])
    model = instantiate(cfg.model).eval()
    assert model.embed_dim == 96 and len(model.blocks) == 6 and model.blocks[0].attn.num_heads == 3
    assert model.blocks[0].mlp.fc1.out_features == 384 and model.patch_embed.proj.kernel_size == (4, 4)
    assert model.patch_embed.num_patches == 49
    # 50 tokens: patch embedding + per block (qkv, proj, fc1, fc2 and the two attention products) + head
    from torch.nn.attention import SDPBackend, sdpa_kernel

    block = 50 * (96 * 288 + 96 * 96 + 2 * 96 * 384) + 2 * 50 * 50 * 96
    with sdpa_kernel(SDPBackend.MATH):  # the counter sees the attention products only when they are decomposed
        assert macs(model, (1, 28, 28)) == 49 * 16 * 96 + 6 * block + 96 * 10


def test_vit_size_keys_are_checked():
    from omegaconf import OmegaConf

    from tests.conftest import compose

    cfg, _ = compose(["model=vit_fmnist", "model.num_heads=5"])
    with pytest.raises(Exception, match="model.embed_dim"):
        OmegaConf.to_object(cfg.model)


def test_the_frequency_stem_of_resnet50_is_the_papers_surgery():
    """The authors' ResNet-50 for DCT inputs: no stem, layer1's first block reads the 192 channels of the 56x56
    grid through 1x1 convs (its conv1 and its shortcut), every later layer unchanged."""
    from compress_run.models.frequency_stem import take_frequency_input
    from compress_run.models.torchvision_models import resnet50

    torch.manual_seed(0)
    reference = resnet50(10, 3, 224, width_mult=0.25, stem="imagenet")
    net = take_frequency_input(resnet50(10, 3, 224, width_mult=0.25, stem="imagenet"), 192)
    assert all(isinstance(getattr(net, n), torch.nn.Identity) for n in ("conv1", "bn1", "relu", "maxpool"))
    first = net.layer1[0]
    assert first.conv1.kernel_size == (1, 1) and first.conv1.in_channels == 192
    assert first.downsample[0].in_channels == 192 and first.downsample[0].kernel_size == (1, 1)
    changed = {"conv1.weight", "layer1.0.conv1.weight", "layer1.0.downsample.0.weight"}
    ours, theirs = net.state_dict(), reference.state_dict()
    assert {k for k in theirs if k.startswith("bn1.")} | changed >= {k for k in theirs if k not in ours or
                                                                     ours[k].shape != theirs[k].shape}
    assert net(torch.zeros(1, 192, 56, 56)).shape == (1, 10)  # the grid of a 448x448 image in 8x8 blocks
    # layer1 sees the same 56x56 resolution from the DCT grid as from the removed stem of a 224x224 image
    seen = {}
    for model, x in ((net, torch.zeros(1, 192, 56, 56)), (reference, torch.zeros(1, 3, 224, 224))):
        hook = model.layer2.register_forward_pre_hook(lambda m, a, model=model: seen.update({id(model): a[0].shape}))
        model(x)
        hook.remove()
    assert seen[id(net)] == seen[id(reference)]
