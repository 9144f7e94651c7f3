"""MAC counter: published reference counts (torchvision, timm, papers), fused attention, mask-aware MACs."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from compress_run.core.masks import magnitude_scores, prunable_layers, prune_by_score
from compress_run.hardware.macs import count_macs
from compress_run.hardware.trace import trace_model
from compress_run.models import cifar_resnet, cifar_vgg, timm_models, torchvision_models


@pytest.mark.parametrize(("model", "shape", "reference"), [
    (lambda: cifar_resnet.resnet20(10, 3, 32), (1, 3, 32, 32), 40551040),
    (lambda: cifar_resnet.resnet56(10, 3, 32), (1, 3, 32, 32), 125485696),
    (lambda: cifar_vgg.vgg16_bn(10, 3, 32), (1, 3, 32, 32), 313201664),
    (lambda: torchvision_models.resnet18(1000, 3, 224), (1, 3, 224, 224), 1814073344),
    (lambda: torchvision_models.resnet50(1000, 3, 224), (1, 3, 224, 224), 4089184256),
    (lambda: torchvision_models.mobilenet_v2(1000, 3, 224), (1, 3, 224, 224), 300774272),
    (lambda: torchvision.models.vgg16(weights=None), (1, 3, 224, 224), 15470264320),
], ids=["resnet20", "resnet56", "vgg16_bn_cifar", "resnet18", "resnet50", "mobilenet_v2", "vgg16"])
def test_cnn_reference_counts_exact(model, shape, reference):
    assert count_macs(model(), shape).dense == reference


@pytest.mark.parametrize(("variant", "reference"), [("deit_tiny_patch16_224", 1253683200),
                                                     ("deit_small_patch16_224", 4598882304)])
def test_vit_counts_include_fused_attention(variant, reference):
    model = timm_models.vit(variant, num_classes=1000, in_channels=3, image_size=224)
    report = count_macs(model, (1, 3, 224, 224))
    assert abs(report.dense - reference) / reference < 1e-3
    heads, tokens, head_dim = model.blocks[0].attn.num_heads, 197, model.embed_dim // model.blocks[0].attn.num_heads
    attention_own = report.per_module["blocks.0.attn"]  # QK^T and AV; qkv/proj belong to their linears
    assert attention_own == 2 * heads * tokens * tokens * head_dim


def test_per_module_attribution_sums_to_total_and_names_layers():
    model = cifar_resnet.resnet20(10, 3, 32)
    report = count_macs(model, (1, 3, 32, 32))
    assert report.per_module["conv1"] == 16 * 3 * 9 * 32 * 32
    assert report.per_module["fc"] == 64 * 10
    assert sum(report.per_module.values()) == report.dense


def test_effective_macs_follow_mask_density():
    torch.manual_seed(0)
    model = cifar_resnet.resnet20(10, 3, 32)
    dense = count_macs(model, (1, 3, 32, 32))
    layers = prunable_layers(model)
    prune_by_score(layers, magnitude_scores(layers), 0.75)
    report = count_macs(model, (1, 3, 32, 32))
    assert report.dense == dense.dense
    for name in layers:
        kept = layers[name].weight_mask.float().mean().item()
        assert report.per_module_effective[name] == pytest.approx(report.per_module[name] * kept)
    assert report.per_module_effective["conv1"] == report.per_module["conv1"]  # kept dense
    pruned = sum(report.per_module[n] for n in layers)
    assert report.effective == pytest.approx(dense.dense - 0.75 * pruned, rel=1e-3)


def test_multihead_attention_is_counted_in_eval_mode_like_in_training():
    """nn.MultiheadAttention's fused eval kernel carries no MAC formula: the trace must take the priced path."""
    tokens, dim, heads = 17, 64, 4
    block = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=128, batch_first=True, dropout=0.0)
    expected = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * 128
    block.eval()
    with torch.no_grad():
        assert count_macs(block, (1, tokens, dim)).dense == expected
    assert torch.backends.mha.get_fastpath_enabled()  # the trace restores PyTorch's setting


def test_torchvision_vit_b_16_matches_its_published_ops():
    from torchvision.models import ViT_B_16_Weights, vit_b_16

    published = ViT_B_16_Weights.IMAGENET1K_V1.meta["_ops"] * 1e9  # torchvision's GMACs (no download)
    assert count_macs(vit_b_16(), (1, 3, 224, 224)).dense == pytest.approx(published, rel=0.01)


def test_an_op_doing_mac_work_without_a_formula_is_reported():
    class FusedAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # the fused kernel, called directly
            a = self.attn
            return torch._native_multi_head_attention(x, x, x, 32, 2, a.in_proj_weight, a.in_proj_bias,
                                                      a.out_proj.weight, a.out_proj.bias, need_weights=False)[0]

    with torch.no_grad():
        trace = trace_model(FusedAttention().eval(), (1, 9, 32))
    assert trace.unpriced_ops == ["_native_multi_head_attention"]
    assert trace_model(nn.Linear(8, 8), (1, 8)).unpriced_ops == []
