"""GS kernel: the compact format keeps exactly the mask's non-zeros with equal counts per row group, and
GS linear/conv execution matches the dense masked layer for random shapes and sparsities."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress_run.core.masks import attach_mask, get_mask
from compress_run.core.projections import project
from compress_run.kernels.gather_scatter import GSConv2d, GSLinear, GSMatrix, gs_matrix


def _masked(layer: nn.Module, density: float, banks: int, elems: int) -> nn.Module:
    attach_mask(layer, project(f"gather_scatter:{banks}:{elems}", layer.weight.detach().abs(), density))
    return layer


@pytest.mark.parametrize("rows,cols", [(16, 64), (64, 128), (48, 200)])
@pytest.mark.parametrize("density", [0.5, 0.1, 0.02])
@pytest.mark.parametrize("banks,elems", [(16, 1), (16, 4)])
def test_gs_linear_matches_the_masked_dense_layer(rows, cols, density, banks, elems):
    torch.manual_seed(rows + cols)
    layer = _masked(nn.Linear(cols, rows), density, banks, elems)
    matrix = gs_matrix(layer, banks, elems)
    assert matrix.nnz() == int(get_mask(layer).sum())
    counts = [v.shape[1] for v in matrix.values]
    assert all(c % elems == 0 for c in counts) and matrix.pack_counts.tolist() == [c // elems for c in counts]
    x = torch.randn(5, 3, cols)
    with torch.no_grad():
        assert torch.allclose(GSLinear(layer, banks, elems)(x), layer(x), atol=1e-5)


@pytest.mark.parametrize("shape,stride,padding", [((32, 16, 3, 3), 1, 1), ((16, 32, 3, 3), 2, 1),
                                                 ((64, 16, 1, 1), 1, 0), ((32, 8, 5, 3), 1, (2, 1)),
                                                 ((32, 16, 1, 1), 2, 0), ((16, 8, 5, 3), (2, 3), (2, 1)),
                                                 ((16, 8, 7, 7), 2, 3)])
@pytest.mark.parametrize("density", [0.5, 0.1])
def test_gs_conv_matches_the_masked_dense_conv(shape, stride, padding, density):
    torch.manual_seed(0)
    c_out, c_in, kh, kw = shape
    conv = _masked(nn.Conv2d(c_in, c_out, (kh, kw), stride, padding), density, 16, 1)
    x = torch.randn(2, c_in, 11, 9)
    with torch.no_grad():
        assert torch.allclose(GSConv2d(conv)(x), conv(x), atol=1e-5)


@pytest.mark.parametrize("c_in,c_out,kernel,size", [
    (128, 32, 3, (23, 15)),   # 4 channel blocks; one 389-long run: a last tile of 133 cut as 112 + 21
    (128, 16, 3, (20, 23)),   # a last tile of 114 (7 vectors, the last one overlapping)
    (512, 16, 1, (7, 9)),     # 1x1 over 13 channel blocks, a run of 63 (under 4 vectors)
    (96, 16, 3, (3, 2)),      # a run shorter than one vector: scalar sums accumulated over blocks
])
def test_gs_conv_blocked_over_input_channels_matches_the_dense_conv(c_in, c_out, kernel, size):
    torch.manual_seed(c_in + size[0])
    conv = _masked(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), 0.1, 16, 1)
    x = torch.randn(2, c_in, *size)
    with torch.no_grad():
        assert torch.allclose(GSConv2d(conv)(x), conv(x), atol=1e-4)


@pytest.mark.parametrize("cols,tokens", [(1024, 15), (1024, 74), (1024, 200), (96, 300)])
def test_gs_linear_blocked_over_inputs_matches_the_dense_layer(cols, tokens):
    """Many input blocks (1024 columns), token counts under one vector, a last tile merged into the previous one
    (200 = 64 + 64 + 72) and a last tile of its own (300 = 128 + 128 + 44, without a bias)."""
    torch.manual_seed(cols + tokens)
    layer = _masked(nn.Linear(cols, 48, bias=tokens != 300), 0.1, 16, 1)
    x = torch.randn(tokens, cols)
    with torch.no_grad():
        assert torch.allclose(GSLinear(layer)(x), layer(x), atol=1e-4)


def test_invalid_mask_is_rejected():
    weight = torch.randn(16, 32)
    mask = torch.zeros(16, 32, dtype=torch.bool)
    mask[0, 0] = True  # one row with a non-zero, the others empty
    with pytest.raises(ValueError, match="not a valid gather-scatter pattern"):
        GSMatrix.from_masked(weight, mask)


def test_pytorch_fallback_kernel_matches(monkeypatch):
    import compress_run.kernels.gather_scatter as gs

    torch.manual_seed(3)
    conv = _masked(nn.Conv2d(16, 32, 3, stride=2, padding=1), 0.2, 16, 1)
    linear = _masked(nn.Linear(64, 32), 0.2, 16, 1)
    x, v = torch.randn(2, 16, 9, 9), torch.randn(4, 64)
    with torch.no_grad():
        compiled = GSConv2d(conv)(x), GSLinear(linear)(v)
        monkeypatch.setattr(gs, "compiled_kernel", lambda: None)
        fallback = GSConv2d(conv)(x), GSLinear(linear)(v)
        assert torch.allclose(fallback[0], conv(x), atol=1e-5) and torch.allclose(fallback[1], linear(v), atol=1e-5)
    assert torch.allclose(compiled[0], fallback[0], atol=1e-5) and torch.allclose(compiled[1], fallback[1], atol=1e-5)


@pytest.mark.parametrize("pattern,rows", [("gather_scatter:16", 40), ("gather_scatter:16:1:32", 64),
                                          ("gather_scatter:16:1:32", 72)])
def test_partial_and_tiled_row_groups_execute_exactly(monkeypatch, pattern, rows):
    import compress_run.kernels.gather_scatter as gs

    torch.manual_seed(rows)
    layer = nn.Linear(48, rows)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(rows, 1) ** 3 * 10)  # rows of different magnitude: tiles regroup them
    attach_mask(layer, project(pattern, layer.weight.detach().abs(), 0.25))
    matrix = gs_matrix(layer)
    assert matrix.nnz() == int(get_mask(layer).sum()) and sum(len(g) for g in matrix.groups) == rows
    x = torch.randn(3, 48)
    with torch.no_grad():
        assert torch.allclose(GSLinear(layer)(x), layer(x), atol=1e-5)
        monkeypatch.setattr(gs, "compiled_kernel", lambda: None)
        assert torch.allclose(GSLinear(layer)(x), layer(x), atol=1e-5)
