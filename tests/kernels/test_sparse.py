"""CSR/BSR execution of masked layers equals the masked dense layer (its plain-PyTorch reference)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress_run.core.masks import attach_mask, magnitude_scores, prunable_layers, prune_by_score
from compress_run.kernels.sparse import SparseConv2d, SparseLinear, to_executed
from compress_run.models import cifar_resnet


@pytest.mark.parametrize("fmt", ["csr", "bsr_16"])
@pytest.mark.parametrize(("stride", "padding", "bias"), [(1, 1, False), (2, 0, True)])
def test_sparse_conv_equals_masked_dense(fmt, stride, padding, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 20, 3, stride, padding, bias=bias).eval()
    attach_mask(conv, torch.rand(conv.weight.shape) < 0.2)
    x = torch.randn(3, 12, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(SparseConv2d(conv, fmt)(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["csr", "bsr_16", "bsr_32"])
def test_sparse_linear_equals_masked_dense_on_3d_input(fmt):
    torch.manual_seed(0)
    linear = nn.Linear(40, 24).eval()
    attach_mask(linear, torch.rand(24, 40) < 0.3)
    x = torch.randn(2, 5, 40)
    with torch.no_grad():
        out = SparseLinear(linear, fmt)(x)
        assert out.shape == (2, 5, 24)
        torch.testing.assert_close(out, linear(x), rtol=1e-5, atol=1e-5)


def test_to_executed_swaps_named_layers_and_keeps_outputs():
    torch.manual_seed(0)
    model = cifar_resnet.resnet20(10, 3, 32).eval()
    layers = prunable_layers(model)
    prune_by_score(layers, magnitude_scores(layers), 0.9)
    names = list(layers)[:3]
    executed = to_executed(copy.deepcopy(model), {n: "csr" for n in names})
    assert all(isinstance(executed.get_submodule(n), SparseConv2d) for n in names)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(executed(x), model(x), rtol=1e-4, atol=1e-4)


def test_layers_without_a_kernel_stay_dense():
    model = torch.nn.Sequential(nn.Conv2d(8, 8, 3, padding="same"), nn.Conv2d(8, 8, 3, groups=8))
    executed = to_executed(copy.deepcopy(model), {"0": "csr", "1": "csr"})
    assert isinstance(executed[0], nn.Conv2d) and isinstance(executed[1], nn.Conv2d)
