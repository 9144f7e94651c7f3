"""The authors' DCT ResNet (kaix90/DCTNet, classification/models/imagenet/resnet.py): layer2 at stride 1, hence
layers 2-4 at the resolutions of an RGB ResNet on the 448x448 image and 3.35x the MACs of the RGB ResNet-50 at
224x224 (not the same MACs); and its initialisation from RGB weights, the input convs sliced to the first
``channels`` input slices."""

from __future__ import annotations

import pytest
import torch

from compress_run.core.frequency_input import attach_gate
from compress_run.hardware.macs import count_macs
from compress_run.models.frequency_stem import image_weights_for_frequency_input, take_frequency_input
from compress_run.models.torchvision_models import resnet18, resnet50


def _stage_macs(net: torch.nn.Module, shape: tuple[int, ...]) -> dict[str, float]:
    stages: dict[str, float] = {}
    for name, macs in count_macs(net.eval(), shape).per_module.items():
        stages[name.split(".")[0]] = stages.get(name.split(".")[0], 0.0) + macs
    return stages


@pytest.mark.parametrize("build", [resnet18, resnet50])
def test_layer2_runs_at_stride_one_so_the_grid_keeps_its_resolution_through_layer2(build):
    net = take_frequency_input(build(10, 3, 224, width_mult=0.25, stem="imagenet"), 24)
    first = net.layer2[0]
    assert first.stride == 1 and first.downsample[0].stride == (1, 1)
    assert (first.conv2 if build is resnet50 else first.conv1).stride == (1, 1)
    seen = {}
    net.layer3.register_forward_pre_hook(lambda m, a: seen.update(layer3=a[0].shape[-1]))
    assert net.eval()(torch.zeros(1, 24, 56, 56)).shape == (1, 10)
    assert seen["layer3"] == 56  # the authors' layer2 keeps the 56x56 grid; layer3 and layer4 halve it


def test_the_dct_resnet50_costs_what_the_rgb_one_costs_on_the_448_image_not_on_the_224_one():
    """Documented in models/frequency_stem.py and docs/frequency.md: 13.69 GMACs (192 channels) and 13.53 (24)
    against 4.09 for the RGB ResNet-50 at 224x224 and 16.35 at 448x448; layer3 and layer4 exactly as on 448."""
    rgb = resnet50(1000, 3, 224, stem="imagenet")
    rgb224, rgb448 = _stage_macs(rgb, (1, 3, 224, 224)), _stage_macs(rgb, (1, 3, 448, 448))
    dct192 = _stage_macs(take_frequency_input(resnet50(1000, 3, 224, stem="imagenet"), 192), (1, 192, 56, 56))
    dct24 = _stage_macs(take_frequency_input(resnet50(1000, 3, 224, stem="imagenet"), 24), (1, 24, 56, 56))
    total = {k: sum(v.values()) / 1e9 for k, v in (("rgb224", rgb224), ("rgb448", rgb448), ("dct192", dct192),
                                                     ("dct24", dct24))}
    assert total["rgb224"] == pytest.approx(4.089, rel=1e-3) and total["rgb448"] == pytest.approx(16.351, rel=1e-3)
    assert total["dct192"] == pytest.approx(13.695, rel=1e-3) and total["dct24"] == pytest.approx(13.526, rel=1e-3)
    assert 3.3 < total["dct24"] / total["rgb224"] < total["dct192"] / total["rgb224"] < 3.4
    assert dct192["layer3"] == rgb448["layer3"] and dct192["layer4"] == rgb448["layer4"]


def test_rgb_weights_initialise_the_dct_resnet_as_the_authors_do():
    torch.manual_seed(0)
    image = resnet50(10, 3, 224, width_mult=0.25, stem="imagenet").state_dict()  # layer1 reads 16 stem channels
    for channels, sliced in ((8, True), (16, True), (48, False)):
        net = take_frequency_input(resnet50(10, 3, 224, width_mult=0.25, stem="imagenet"), channels)
        attach_gate(net, channels, 0.25, 1.0, 1.0)
        own = {k: v.clone() for k, v in net.state_dict().items()}
        state = image_weights_for_frequency_input(net, image)
        net.load_state_dict(state, strict=True)
        loaded = net.state_dict()
        for key in ("layer1.0.conv1.weight", "layer1.0.downsample.0.weight"):
            expected = image[key][:, :channels] if sliced else own[key]  # more channels: fresh, as for 192
            assert torch.equal(loaded[key], expected)
        assert not any(k.startswith(("conv1.", "bn1.")) for k in state)
        assert all(torch.equal(loaded[k], own[k]) for k in own if k.startswith("frequency_input."))
        kept = [k for k in image if not k.startswith(("conv1.", "bn1.", "layer1.0.conv1.", "layer1.0.downsample.0."))]
        assert all(torch.equal(loaded[k], image[k]) for k in kept)


def test_a_basic_block_resnet_keeps_its_new_shortcut_and_other_states_pass_unchanged():
    torch.manual_seed(0)
    image = resnet18(10, 3, 224, width_mult=0.25, stem="imagenet").state_dict()  # layer1.0 has no shortcut
    net = take_frequency_input(resnet18(10, 3, 224, width_mult=0.25, stem="imagenet"), 8)
    own = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(image_weights_for_frequency_input(net, image), strict=True)
    assert torch.equal(net.layer1[0].conv1.weight, image["layer1.0.conv1.weight"][:, :8])  # 3x3, sliced
    assert torch.equal(net.layer1[0].downsample[0].weight, own["layer1.0.downsample.0.weight"])
    same = net.state_dict()
    assert image_weights_for_frequency_input(net, same).keys() == same.keys()  # a DCT state: as it is
    rgb = resnet18(10, 3, 224, width_mult=0.25, stem="imagenet")
    assert image_weights_for_frequency_input(rgb, image).keys() == image.keys()  # an image network: as it is
