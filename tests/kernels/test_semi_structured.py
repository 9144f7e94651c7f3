"""2:4 semi-structured execution: the GEMM layout (patch order, padding, output assembly) is checked on the
CPU with the padded dense matrix standing in for the compressed one; the real sparse tensor-core kernels are
checked against the dense masked layer on a CUDA GPU (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress_run.core.masks import attach_mask
from compress_run.core.projections import project
from compress_run.kernels import semi_structured
from compress_run.kernels.semi_structured import semi_structured_module

CONVS = [  # (c_in, c_out, kernel, stride, padding, dilation, bias)
    (4, 8, 3, 1, 1, 1, False), (16, 24, 3, 2, 1, 1, True), (8, 70, 1, 1, 0, 1, False),
    (12, 16, (1, 3), 1, (0, 1), 1, True), (8, 8, 3, 1, 2, 2, False),
]


def _masked(layer: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    attach_mask(layer, project("nm:2:4", layer.weight.detach().abs(), 0.5))
    return layer.eval()


def _identity(matrix: torch.Tensor) -> torch.Tensor:
    return matrix


@pytest.mark.parametrize("spec", CONVS)
def test_conv_layout_matches_the_masked_conv(spec):
    c_in, c_out, k, stride, pad, dil, bias = spec
    conv = _masked(nn.Conv2d(c_in, c_out, k, stride, pad, dil, bias=bias))
    module = semi_structured_module(conv, torch.float32, to_sparse=_identity)
    assert module.weight.shape[0] % 64 == 0 and module.weight.shape[1] % 128 == 0
    x = torch.randn(3, c_in, 11, 9)
    with torch.no_grad():
        assert torch.allclose(module(x), conv(x), atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 4), (96, 40), (384, 130)])
def test_linear_layout_matches_the_masked_linear(shape):
    in_features, out_features = shape
    linear = _masked(nn.Linear(in_features, out_features))
    module = semi_structured_module(linear, torch.float32, to_sparse=_identity)
    x = torch.randn(2, 5, in_features)
    with torch.no_grad():
        assert torch.allclose(module(x), linear(x), atol=1e-5)


def test_a_mask_that_is_not_2_of_4_is_refused():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    attach_mask(conv, project("irregular", conv.weight.detach().abs(), 0.5))
    with pytest.raises(ValueError, match="2:4"):
        semi_structured_module(conv, torch.float32, to_sparse=_identity)
    with pytest.raises(ValueError):
        semi_structured_module(_masked(nn.Conv2d(8, 8, 3, groups=2)), torch.float32, to_sparse=_identity)


@pytest.mark.skipif(not semi_structured.available(), reason="needs a CUDA GPU with sparse tensor cores")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_tensor_cores_compute_the_masked_layers(dtype):
    from compress_run.kernels.select import executed_layer

    conv = _masked(nn.Conv2d(64, 128, 3, padding=1)).cuda()
    linear = _masked(nn.Linear(384, 1152)).cuda()
    for layer, x in ((conv, torch.randn(4, 64, 14, 14, device="cuda")), (linear, torch.randn(197, 384, device="cuda"))):
        module = semi_structured_module(layer, dtype)
        assert type(module.weight).__name__.startswith("SparseSemiStructured")
        with torch.no_grad():
            reference = layer.to(dtype)(x.to(dtype)).float()
            layer.float()
            assert torch.allclose(module(x).float(), reference, rtol=2e-2, atol=2e-2)
        assert type(executed_layer(layer, "nm_2_4")).__name__.startswith("SemiStructured")
