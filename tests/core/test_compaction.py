"""Compaction: random channel masks -> the compacted network computes what the masked one computes,
stores exactly the kept weights, reloads from its own state dict, and the channel groups tie what a
residual add, a depthwise conv, an option-A shortcut or an attention head ties."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress_run.core.channel_graph import channel_groups
from compress_run.core.channel_masks import set_channel_mask, unit_rows
from compress_run.core.compaction import compact, dead_channels, restore_compacted
from compress_run.core.masks import attach_masks_from_state_dict
from compress_run.hardware.macs import count_macs
from compress_run.methods.channels import MacModel
from compress_run.models import timm_models
from compress_run.models.cifar_resnet import resnet20
from compress_run.models.cifar_vgg import vgg16_bn
from compress_run.models.timm_models import vit
from compress_run.models.torchvision_models import mobilenet_v2, resnet18, resnet50

ARCHS = {
    "resnet20": lambda: resnet20(10, 3, 32),
    "resnet18": lambda: resnet18(10, 3, 32, width_mult=0.25),
    "resnet50": lambda: resnet50(10, 3, 32, width_mult=0.25),
    "resnet50_imagenet_stem": lambda: resnet50(10, 3, 64, width_mult=0.125, stem="imagenet"),
    "vgg16_bn": lambda: vgg16_bn(10, 3, 32, width_mult=0.25),
    "mobilenet_v2": lambda: mobilenet_v2(10, 3, 32, width_mult=0.5),
    "deit_tiny": lambda: vit("deit_tiny_patch16_224", 10, 3, 32),
    "deit_small": lambda: vit("deit_small_patch16_224", 10, 3, 32, width_mult=0.5),
    # timm's BatchNormAct2d (BN + activation in one BatchNorm2d subclass) is compacted in place
    "timm_regnetx_002": lambda: timm_models.any_model("regnetx_002", 10, 3, 32),
    "timm_mobilenetv3_small_050": lambda: timm_models.any_model("mobilenetv3_small_050", 10, 3, 32),
}


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so a wrongly kept/removed channel shows."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-1, 1)


def _random_masks(model: nn.Module, generator: torch.Generator, skip_scatter_targets: bool = False):
    groups, modules = channel_groups(model), dict(model.named_modules())
    keeps = {}
    for group in groups:
        if group.frozen or (skip_scatter_targets and group.scatters):
            continue
        keep = torch.rand(group.size, generator=generator) < 0.5
        keep[torch.randint(group.size, (1,), generator=generator)] = True
        set_channel_mask(group, modules, keep)
        keeps[group.id] = keep
    return groups, keeps


def _expected_params(model: nn.Module, groups, keeps) -> int:
    """Weights that survive: each parameter entry whose output row and input column are both kept."""
    out_keep: dict[str, torch.Tensor] = {}
    in_keep: dict[str, torch.Tensor] = {}
    for group in groups:
        keep = keeps.get(group.id)
        if keep is None:
            continue
        for name, norm in group.producers + group.passthrough:
            out_keep[name] = unit_rows(group, keep)
            if norm:
                out_keep[norm] = keep
        for name, factor in group.consumers:
            in_keep[name] = keep.repeat_interleave(group.unit * factor)
    total = 0
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            rows = out_keep.get(name)
            cols = in_keep.get(name) if (pname == "weight" and param.dim() > 1) else None
            n_rows = int(rows.sum()) if rows is not None else param.shape[0]
            n_cols = int(cols.sum()) if cols is not None else (param.shape[1] if param.dim() > 1 else 1)
            total += n_rows * n_cols * (param[0, 0].numel() if param.dim() > 2 else 1)
    return total


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_compacted_outputs_equal_masked_outputs_and_reload(arch):
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    _randomise_norms(model)
    _random_masks(model, torch.Generator().manual_seed(1))
    x = torch.randn(3, 3, 64 if "imagenet" in arch else 32, 64 if "imagenet" in arch else 32)
    with torch.no_grad():
        masked = model(x)
        before = sum(p.numel() for p in model.parameters())
        shrunk = compact(model)
        compacted = model(x)
    assert shrunk, "random masks must remove channels"
    assert sum(p.numel() for p in model.parameters()) < before
    torch.testing.assert_close(compacted, masked, rtol=1e-4, atol=1e-5)

    state = model.state_dict()
    fresh = ARCHS[arch]()
    restore_compacted(fresh, state)
    attach_masks_from_state_dict(fresh, state)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), compacted, rtol=0, atol=0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_parameter_count_equals_kept_weights(arch):
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    groups, keeps = _random_masks(model, torch.Generator().manual_seed(2), skip_scatter_targets=True)
    expected = _expected_params(model, groups, keeps)
    compact(model)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_mac_model_predicts_the_compacted_networks_macs():
    torch.manual_seed(0)
    model = resnet50(10, 3, 32, width_mult=0.25).eval()
    groups, keeps = _random_masks(model, torch.Generator().manual_seed(3))
    predicted = MacModel(model, (3, 32, 32), groups).macs({g: int(k.sum()) for g, k in keeps.items()})
    compact(model)
    assert count_macs(model, (1, 3, 32, 32)).effective == pytest.approx(predicted, rel=1e-9)


def test_groups_tie_residual_adds_depthwise_and_option_a_shortcuts():
    r50 = {g.name: g for g in channel_groups(resnet50(10, 3, 32, width_mult=0.25))}
    stage2 = next(g for g in r50.values() if any(n == "layer2.0.downsample.0" for n, _ in g.producers))
    assert {n for n, _ in stage2.producers} == {"layer2.0.downsample.0", *(f"layer2.{i}.conv3" for i in range(4))}
    assert dict(stage2.producers)["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    stem = next(g for g in r50.values() if any(n == "conv1" for n, _ in g.producers))
    assert {n for n, _ in stem.producers} == {"conv1"}  # layer1 starts with a downsample conv
    assert r50["fc"].frozen == "network output"

    mbv2 = channel_groups(mobilenet_v2(10, 3, 32))
    expand = next(g for g in mbv2 if g.producers == [("features.2.conv.0.0", "features.2.conv.0.1")])
    assert expand.passthrough == [("features.2.conv.1.0", "features.2.conv.1.1")]
    assert expand.consumers == [("features.2.conv.2", 1)]

    r20 = channel_groups(resnet20(10, 3, 32))
    streams = [g for g in r20 if g.residual]
    assert [len(g.producers) for g in streams] == [4, 3, 3]  # stem + 3 blocks, then 3 blocks per stage
    assert [bool(g.scatters) for g in streams] == [False, True, True]
    inner = [g for g in r20 if not g.residual and not g.frozen]
    assert len(inner) == 9 and all(len(g.consumers) == 1 for g in inner)


def test_option_a_shortcut_keeps_a_residual_channel_alive():
    model = resnet20(10, 3, 32).eval()
    groups, modules = channel_groups(model), dict(model.named_modules())
    stream1, stream2 = [g for g in groups if g.residual][:2]
    set_channel_mask(stream2, modules, torch.zeros(stream2.size, dtype=torch.bool))
    dead = dead_channels(model, stream2, groups)
    assert not dead[:stream1.size].any() and dead[stream1.size:].all()  # the shortcut still carries 0..15


class SigmoidGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.sigmoid(self.bn1(self.conv1(x)))  # sigmoid(0) = 0.5: a masked channel is not zero
        return self.fc(self.conv2(x).mean((2, 3)))


def _mask_half_and_compact_nothing(model: SigmoidGate, frozen_group) -> None:
    """Masking half of a frozen group's channels: compaction removes nothing and the output is unchanged."""
    _randomise_norms(model)
    set_channel_mask(frozen_group, dict(model.named_modules()), torch.arange(8) < 4)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        masked = model(x)
        assert compact(model) == {}
        torch.testing.assert_close(model(x), masked)
    assert model.conv1.out_channels == 8


def test_unknown_ops_freeze_their_groups_and_stay_exact():
    model = SigmoidGate().eval()
    groups = channel_groups(model)
    gated = next(g for g in groups if g.producers == [("conv1", "bn1")])
    assert gated.frozen and "sigmoid" in gated.frozen
    _mask_half_and_compact_nothing(model, gated)


def test_a_norm_with_an_activation_that_is_not_zero_preserving_freezes_its_group():
    from timm.layers import BatchNormAct2d

    class NormAct(SigmoidGate):
        def __init__(self, act: type[nn.Module]) -> None:
            super().__init__()
            self.bn1 = BatchNormAct2d(8, act_layer=act)

        def forward(self, x):
            return self.fc(self.conv2(self.bn1(self.conv1(x))).mean((2, 3)))

    assert channel_groups(NormAct(nn.ReLU))[0].frozen is None
    model = NormAct(nn.Sigmoid).eval()
    gated = next(g for g in channel_groups(model) if g.producers and g.producers[0][0] == "conv1")
    assert gated.frozen and "bn1" in gated.frozen
    _mask_half_and_compact_nothing(model, gated)


def test_a_model_fx_cannot_trace_is_left_whole_with_the_reason():
    class DataDependent(SigmoidGate):
        def forward(self, x):
            x = self.bn1(self.conv1(x))
            if x.sum() > 0:  # control flow on a traced value
                x = x.relu()
            return self.fc(self.conv2(x).mean((2, 3)))

    model = DataDependent().eval()
    (group,) = channel_groups(model)
    assert group.name == "model" and "torch.fx cannot trace DataDependent" in group.frozen
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        assert compact(model) == {} and torch.equal(model(x), before)


def test_a_compacted_network_can_be_pruned_and_compacted_again():
    torch.manual_seed(0)
    model = resnet50(10, 3, 32, width_mult=0.25).eval()
    _randomise_norms(model)
    _random_masks(model, torch.Generator().manual_seed(4))
    compact(model)
    _random_masks(model, torch.Generator().manual_seed(5))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        masked = model(x)
        assert compact(model)
        torch.testing.assert_close(model(x), masked, rtol=1e-4, atol=1e-5)
    assert count_macs(model, (1, 3, 32, 32)).dense == count_macs(resnet50(10, 3, 32, width_mult=0.25),
                                                                 (1, 3, 32, 32)).dense



def test_an_attention_module_not_laid_out_like_timm_is_left_whole():
    """torchvision's Swin attention has qkv/proj/num_heads but its own head layout (and no head_dim)."""
    import torchvision

    from compress_run.methods.base import NotApplicable
    from compress_run.methods.l1_filter import L1Filter

    swin = torchvision.models.swin_t(num_classes=10)
    groups = channel_groups(swin)
    heads = [g for g in groups if g.kind == "heads"]
    assert len(heads) == 12 and all("ShiftedWindowAttention is not a timm-style attention" in g.frozen for g in heads)
    assert {g.size for g in heads} == {3, 6, 12, 24} and {g.unit for g in heads} == {32}
    method = L1Filter(sparsity=0.3)
    method.input_shape = (3, 64, 64)
    with pytest.raises(NotApplicable, match="not a timm-style attention"):
        method.check_applicable(swin)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = swin.eval()(x)
        assert compact(swin) == {} and torch.equal(swin(x), before)  # nothing to compact, nothing changed

