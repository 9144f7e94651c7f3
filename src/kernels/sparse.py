"""Sparse-weight execution of masked conv/linear layers on the CPU (CSR and BSR via torch.sparse).

The weight is stored as a (C_out, C_in/groups * k_h * k_w) sparse matrix and applied as
``W_sparse @ X`` (the fast orientation of torch's MKL CSR path; ``F.linear(X, W_csr)`` is slower than
dense). Convolutions unfold the input (im2col) first. Each layer's plain-PyTorch reference is the dense
masked layer it was made from; :func:`to_executed` swaps layers in place by name.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from compress_run.core.masks import get_mask


def _sparse(matrix: torch.Tensor, fmt: str) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse (CSR|BSR) tensor support is in beta.*")
        if fmt == "csr":
            return matrix.to_sparse_csr()
        if fmt.startswith("bsr_"):
            block = int(fmt.split("_")[1])
            rows, cols = matrix.shape
            padded = F.pad(matrix, (0, -cols % block, 0, -rows % block))
            return padded.to_sparse_bsr((block, block))
    raise ValueError(f"unsupported sparse format {fmt!r} (csr, bsr_<b>)")


class SparseLinear(nn.Module):
    def __init__(self, dense: nn.Linear, fmt: str) -> None:
        super().__init__()
        weight = dense.weight.detach() * get_mask(dense) if get_mask(dense) is not None else dense.weight.detach()
        self.fmt, self.in_features, self.out_features = fmt, dense.in_features, dense.out_features
        self.weight = _sparse(weight, fmt)
        self.bias = None if dense.bias is None else dense.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        cols = flat.T.contiguous()
        if self.weight.shape[1] != self.in_features:  # BSR pads the reduction dim to whole blocks
            cols = F.pad(cols, (0, 0, 0, self.weight.shape[1] - self.in_features))
        out = (self.weight @ cols)[: self.out_features].T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class Im2colConv(nn.Module):
    """Geometry shared by the sparse conv kernels: output size, im2col columns, output assembly."""

    def __init__(self, dense: nn.Conv2d) -> None:
        super().__init__()
        if dense.groups != 1:
            raise ValueError("sparse execution of grouped/depthwise convs is not supported")
        self.out_channels = dense.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = (dense.kernel_size, dense.stride,
                                                                     dense.padding, dense.dilation)
        self.bias = None if dense.bias is None else dense.bias.detach().clone()

    def output_size(self, x: torch.Tensor) -> tuple[int, int]:
        (kh, kw), (_, _, height, width) = self.kernel_size, x.shape
        out_h = (height + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (width + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return out_h, out_w

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """im2col of ``x`` as one (C_in·k_h·k_w, batch·L) matrix (F.unfold's row order)."""
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, K, L)
        return cols.transpose(0, 1).reshape(cols.shape[1], -1)

    def assemble(self, out: torch.Tensor, batch: int, out_h: int, out_w: int) -> torch.Tensor:
        """(C_out, batch·L) product -> (batch, C_out, H_out, W_out) with the bias added."""
        out = out[: self.out_channels].reshape(self.out_channels, batch, out_h, out_w).transpose(0, 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out.contiguous()


class SparseConv2d(Im2colConv):
    def __init__(self, dense: nn.Conv2d, fmt: str) -> None:
        super().__init__(dense)
        mask = get_mask(dense)
        weight = dense.weight.detach() * mask if mask is not None else dense.weight.detach()
        self.fmt = fmt
        self.reduction = weight[0].numel()
        self.weight = _sparse(weight.reshape(dense.out_channels, -1), fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_h, out_w = self.output_size(x)
        cols = self.columns(x)
        if self.weight.shape[1] != self.reduction:  # BSR pads the reduction dim to whole blocks
            cols = F.pad(cols, (0, 0, 0, self.weight.shape[1] - self.reduction))
        return self.assemble(self.weight @ cols, x.shape[0], out_h, out_w)


def sparse_module(module: nn.Module, fmt: str) -> nn.Module:
    if isinstance(module, nn.Linear):
        return SparseLinear(module, fmt)
    if isinstance(module, nn.Conv2d) and isinstance(module.padding, tuple) and module.padding_mode == "zeros":
        return SparseConv2d(module, fmt)
    raise ValueError(f"no sparse kernel for {module!r}")


def to_executed(model: nn.Module, formats: dict[str, str]) -> nn.Module:
    """Replace each named layer by its sparse-format version (``formats``: module name -> format).

    A layer no kernel here can run (grouped conv, string padding, non-zero padding mode) stays dense.
    """
    from compress_run.kernels.select import executed_layer  # also runs gather_scatter (its module imports this one)

    for name, fmt in formats.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            setattr(parent, child, executed_layer(getattr(parent, child), fmt))
        except ValueError:
            continue
    return model
