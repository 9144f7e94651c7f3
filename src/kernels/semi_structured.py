"""2:4 masks on NVIDIA sparse tensor cores through PyTorch's semi-structured sparse tensors (CUDA only).

A layer whose mask keeps at most 2 of every 4 consecutive weights of its GEMM row (the ``nm:2:4``
projection, :mod:`compress_run.core.projections`) runs as ``F.linear(X, W_2:4)`` with ``W`` compressed by
``torch.sparse.to_sparse_semi_structured`` (CUTLASS or cuSPARSELt, Ampere and newer, fp16/bf16). The
projection groups a conv weight's reduction dim in (k_h, k_w, c_in) order, input channel fastest
(``as_matrix``), so a conv runs as a GEMM over im2col patches re-ordered the same way. The weight matrix is
zero-padded to the backends' shape multiples (rows 64, columns 128 cover every dtype of both backends);
zero columns keep every group of 4 within 2:4, and the dense operand is padded by PyTorch.

Without a CUDA device of compute capability >= 8.0 this module is not used: :func:`available` is False, the
kernel choice skips ``nm_2_4`` and the simulator prices it (the GPU profiles' ``nm_2_4`` format). ``to_sparse``
is a parameter so that the layout (patch order, padding, output assembly) is tested on the CPU with the
padded dense matrix in place of the compressed one; the CUDA test runs the real kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress_run.core.compression_info import nm_compliant
from compress_run.core.masks import get_mask
from compress_run.core.projections import as_matrix
from compress_run.kernels.sparse import Im2colConv

ROW_MULTIPLE, COL_MULTIPLE = 64, 128
ToSparse = Callable[[torch.Tensor], torch.Tensor]


def available() -> bool:
    """True on a CUDA device with sparse tensor cores (compute capability 8.0 or newer)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def _semi_structured(matrix: torch.Tensor) -> torch.Tensor:
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(matrix)


def _padded_weight(layer: nn.Conv2d | nn.Linear, dtype: torch.dtype, to_sparse: ToSparse | None,
                   device: torch.device | None) -> tuple[torch.Tensor, int]:
    mask = get_mask(layer)
    weight = layer.weight.detach() * mask if mask is not None else layer.weight.detach()
    matrix = as_matrix(weight)
    if not nm_compliant(matrix != 0, 2, 4):
        raise ValueError("the mask is not 2:4 along the weight's reduction dim (use method.pattern=nm:2:4)")
    rows, cols = matrix.shape
    padded = F.pad(matrix, (0, -cols % COL_MULTIPLE, 0, -rows % ROW_MULTIPLE))
    padded = padded.to(device or layer.weight.device, dtype).contiguous()
    return (to_sparse or _semi_structured)(padded), cols


class SemiStructuredLinear(nn.Module):
    def __init__(self, dense: nn.Linear, dtype: torch.dtype = torch.float16, to_sparse: ToSparse | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.out_features, self.dtype = dense.out_features, dtype
        self.weight, self.in_features = _padded_weight(dense, dtype, to_sparse, device)
        self.bias = None if dense.bias is None else dense.bias.detach().to(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = F.pad(x.reshape(-1, self.in_features).to(self.dtype), (0, self.weight.shape[1] - self.in_features))
        out = F.linear(rows, self.weight)[:, : self.out_features].to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


class SemiStructuredConv2d(Im2colConv):
    def __init__(self, dense: nn.Conv2d, dtype: torch.dtype = torch.float16, to_sparse: ToSparse | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__(dense)
        if not (isinstance(dense.padding, tuple) and dense.padding_mode == "zeros"):
            raise ValueError(f"no 2:4 kernel for {dense!r} (string padding or a non-zero padding mode)")
        self.in_channels, self.dtype = dense.in_channels, dtype
        self.weight, self.reduction = _padded_weight(dense, dtype, to_sparse, device)
        if self.bias is not None:
            self.bias = self.bias.to(self.weight.device)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """im2col as (batch·L, k_h·k_w·C_in) rows, input channel fastest (the 2:4 groups' order)."""
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, C_in·kh·kw, L)
        batch, _, length = cols.shape
        cols = cols.reshape(batch, self.in_channels, -1, length).transpose(1, 2)  # (B, kh·kw, C_in, L)
        return cols.reshape(batch, self.reduction, length).transpose(1, 2).reshape(batch * length, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_h, out_w = self.output_size(x)
        rows = F.pad(self.patches(x).to(self.dtype), (0, self.weight.shape[1] - self.reduction))
        out = F.linear(rows, self.weight)[:, : self.out_channels]  # (B·L, C_out)
        out = out.reshape(x.shape[0], out_h * out_w, self.out_channels).transpose(1, 2)
        out = out.reshape(x.shape[0], self.out_channels, out_h, out_w).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1).to(x.dtype)
        return out.contiguous()


def semi_structured_module(layer: nn.Module, dtype: torch.dtype = torch.float16,
                           to_sparse: ToSparse | None = None) -> nn.Module:
    """``layer`` on the 2:4 kernels (ValueError if its mask or type cannot run there)."""
    if isinstance(layer, nn.Linear):
        return SemiStructuredLinear(layer, dtype, to_sparse)
    if isinstance(layer, nn.Conv2d):
        return SemiStructuredConv2d(layer, dtype, to_sparse)
    raise ValueError(f"no 2:4 kernel for {layer!r}")
