"""Gather-scatter (GS) sparse execution (Sun et al. 2021) of masked linear and conv layers.

A GS mask (:func:`compress_run.core.projections.gather_scatter`) gives every row of a group of B/E rows
the same number of non-zeros, spread evenly over the B banks (column mod B). The compact format
:class:`GSMatrix` stores, per row, its K_g non-zero values and their column indices (K_g equal within a
group: no per-row pointers, no load imbalance) plus the per-group pack counts P_g = K_g / E; a row group's
non-zeros are the union of its P_g packs of B entries, one per bank. The kernel gathers the input rows
named by the indices and accumulates per output row: Y[r] = Σ_k V[r, k] · X[C[r, k]]. Two kernels: a
compiled one (``csrc/gather_scatter.cpp``, built on first use with torch's JIT extension loader) and a
vectorised PyTorch one (gathers in chunks, one batched matmul per group) used when no compiler is available or
``COMPRESS_RUN_GS_KERNEL=torch``. The compiled kernel is register-blocked: up to 8 vectors of one output row
stay in registers while every non-zero of the row adds its weight times the gathered input segment, then are
stored once; the linear kernel packs each tile of tokens (sized to ~256 KB) transposed per thread (a non-zero
then reads a contiguous segment of the tile), output rows in parallel, bias added as the result is stored.
Both kernels are cache-blocked as well: 16 output rows at a time, a row's non-zeros are taken block by block of
input rows (input channels for a conv) whose data for the tile fit in L1, partial sums accumulated in the output,
so the 16 rows reuse what one block loaded (the flat format keeps each row's columns ascending for this).

Conv layers run directly on the padded input with the compiled kernel (no im2col: each output plane
accumulates shifted input rows, one per non-zero, the planes cut into tiles of 8 vectors and the work ordered
(image, tile, output-channel chunk) with the input-channel blocks inside; a strided
conv runs as the stride-1 conv over the input's stride phases, :func:`space_to_depth`, so its inner loop stays
contiguous), else as ``W @ im2col(x)``.
The GS matrix view orders a conv's columns (k_h, k_w, C_in) with the input channel fastest (so banks
interleave channels), and the indices are mapped to ``F.unfold``'s (C_in, k_h, k_w) order when the format is built.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress_run.core.gs_pattern import group_shape, gs_tile_of, row_groups
from compress_run.core.masks import get_mask
from compress_run.core.projections import as_matrix
from compress_run.kernels.sparse import Im2colConv

CHUNK_ELEMENTS = 1 << 22  # gathered values per chunk (16 MB of fp32)
TILE = 0  # tokens per tile in the compiled linear kernel (0: the kernel sizes its tile buffer to ~256 KB)


@functools.lru_cache(maxsize=1)
def compiled_kernel() -> Any | None:
    """The compiled GS extension, or None (no compiler, build failure, or COMPRESS_RUN_GS_KERNEL=torch)."""
    if os.environ.get("COMPRESS_RUN_GS_KERNEL", "").lower() == "torch":
        return None
    try:
        from torch.utils.cpp_extension import load

        source = Path(__file__).parent / "csrc" / "gather_scatter.cpp"
        # one build directory per source version: two checkouts (or a running job and a newer checkout) never
        # rebuild each other's extension or wait on each other's build lock
        version = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load(name=f"compress_run_gs_{version}", sources=[str(source)],
                        extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler / headers: fall back to the PyTorch kernel
        warnings.warn(f"gather-scatter C++ kernel unavailable ({str(exc).splitlines()[0][:200]}); using the "
                      "vectorised PyTorch kernel", stacklevel=2)
        return None


@dataclass
class GSMatrix:
    rows: int
    cols: int
    banks: int
    elems: int
    values: list[torch.Tensor]       # per row group: (rows in group, K_g)
    columns: list[torch.Tensor]      # per row group: (rows in group, K_g), column indices
    pack_counts: torch.Tensor        # per row group: K_g / (entries per row of one of its packs)
    groups: list[torch.Tensor]       # per row group: its row indices (consecutive, or a tile's grouping)
    flat: dict[str, torch.Tensor] = field(default_factory=dict)  # row-major values/columns/offsets (C++ kernel)

    @classmethod
    def from_masked(cls, weight: torch.Tensor, mask: torch.Tensor, banks: int = 16, elems: int = 1,
                    column_order: torch.Tensor | None = None) -> GSMatrix:
        """Compact a (rows × cols) weight matrix whose ``mask`` is GS-valid; ``column_order`` maps the
        matrix's column index to the index the kernel's input uses (default: identity)."""
        tile = gs_tile_of(mask, banks, elems)
        if tile is None:
            raise ValueError(f"mask is not a valid gather-scatter pattern (B={banks}, E={elems}, any tiling)")
        groups = row_groups(mask, banks, elems, tile)
        values, columns, packs = [], [], []
        for rows_idx in groups:
            part_mask = mask[rows_idx].bool()
            count = int(part_mask[0].sum())
            index = torch.nonzero(part_mask, as_tuple=False)[:, 1].reshape(len(rows_idx), count)
            columns.append(index if column_order is None else column_order[index])
            values.append(weight[rows_idx].gather(1, index).contiguous())
            packs.append(count // group_shape(len(rows_idx), banks, elems)[0])
        rows_nz, cols_nz = torch.nonzero(mask.bool(), as_tuple=True)  # row-major: the C++ kernel's order
        flat_columns = cols_nz if column_order is None else column_order[cols_nz]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), mask.bool().sum(1).cumsum(0)])
        flat_values, flat_columns = sorted_rows(weight[rows_nz, cols_nz].float(), flat_columns, rows_nz)
        return cls(weight.shape[0], weight.shape[1], banks, elems, values, columns, torch.tensor(packs), groups,
                   {"values": flat_values, "columns": flat_columns, "offsets": offsets})

    def nnz(self) -> int:
        return sum(v.numel() for v in self.values)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``W @ x`` for x of shape (cols, n): the compiled kernel for fp32 CPU tensors when available."""
        if self.compiled_for(x):
            return compiled_kernel().gs_linear(self.flat["values"], self.flat["columns"], self.flat["offsets"],
                                               x.T, x.new_empty(0), TILE).T
        return self.matmul_torch(x)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` for x of shape (n, cols)."""
        if self.compiled_for(x):
            return compiled_kernel().gs_linear(self.flat["values"], self.flat["columns"], self.flat["offsets"],
                                               x, x.new_empty(0) if bias is None else bias, TILE)
        out = self.matmul_torch(x.T).T
        return out if bias is None else out + bias

    def compiled_for(self, x: torch.Tensor) -> bool:
        return (bool(self.flat) and x.dtype == torch.float32 and x.device.type == "cpu"
                and compiled_kernel() is not None)

    def matmul_torch(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        out = x.new_zeros(self.rows, n)
        for rows, vals, cols in zip(self.groups, self.values, self.columns, strict=True):
            if not vals.numel():
                continue
            chunk = max(1, CHUNK_ELEMENTS // vals.numel())
            for lo in range(0, n, chunk):
                gathered = x[cols.flatten(), lo:lo + chunk].reshape(*cols.shape, -1)  # (group, K, chunk)
                out[rows, lo:lo + chunk] = torch.bmm(vals[:, None, :], gathered)[:, 0]
        return out


def gs_matrix(layer: nn.Module, banks: int = 16, elems: int = 1) -> GSMatrix:
    """The GS compact format of a masked linear or conv layer (conv columns in ``F.unfold`` order)."""
    mask = get_mask(layer)
    if mask is None:
        raise ValueError("layer has no mask")
    weight = layer.weight.detach() * mask
    order = None
    if weight.dim() == 4:
        c_out, c_in, kh, kw = weight.shape
        # matrix column (i_h, i_w, c) -> unfold column c * kh * kw + i_h * kw + i_w
        order = torch.arange(c_in * kh * kw).reshape(c_in, kh, kw).permute(1, 2, 0).flatten()
    return GSMatrix.from_masked(as_matrix(weight), as_matrix(mask), banks, elems, order)


class GSLinear(nn.Module):
    def __init__(self, dense: nn.Linear, banks: int = 16, elems: int = 1) -> None:
        super().__init__()
        self.matrix = gs_matrix(dense, banks, elems)
        self.in_features, self.out_features = dense.in_features, dense.out_features
        self.bias = None if dense.bias is None else dense.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matrix.linear(x.reshape(-1, self.in_features), self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


class GSConv2d(Im2colConv):
    def __init__(self, dense: nn.Conv2d, banks: int = 16, elems: int = 1) -> None:
        super().__init__(dense)
        self.matrix = gs_matrix(dense, banks, elems)
        self.phase: tuple[torch.Tensor, torch.Tensor] | None = None  # values and columns over the stride phases
        if self.stride != (1, 1) and self.dilation == (1, 1):
            flat = self.matrix.flat
            rows = torch.repeat_interleave(torch.arange(len(flat["offsets"]) - 1), flat["offsets"].diff())
            self.phase = sorted_rows(flat["values"], phase_columns(flat["columns"], dense.in_channels,
                                                                   self.kernel_size, self.stride), rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_h, out_w = self.output_size(x)
        kernel = compiled_kernel()
        if kernel is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            (kh, kw), (ph, pw) = self.kernel_size, self.padding
            flat, padded = self.matrix.flat, F.pad(x, (pw, pw, ph, ph))
            if self.phase is None:
                out = kernel.gs_conv2d(flat["values"], flat["columns"], flat["offsets"], padded,
                                       kh, kw, *self.stride, *self.dilation, out_h, out_w)
            else:  # a strided conv is a stride-1 conv over the input's stride phases
                (sh, sw) = self.stride
                out = kernel.gs_conv2d(*self.phase, flat["offsets"],
                                       space_to_depth(padded, sh, sw), -(-kh // sh), -(-kw // sw), 1, 1, 1, 1,
                                       out_h, out_w)
            return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)
        return self.assemble(self.matrix.matmul(self.columns(x)), x.shape[0], out_h, out_w)


def sorted_rows(values: torch.Tensor, columns: torch.Tensor,
                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major non-zeros (``rows`` ascending) reordered so that the columns ascend within each row, as the
    compiled kernels' blocking over input rows requires; returned contiguous, columns as int32."""
    order = torch.argsort(rows.long() * (int(columns.max()) + 1 if columns.numel() else 1) + columns.long())
    return values[order].contiguous(), columns[order].int().contiguous()


def space_to_depth(x: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C·sh·sw, ⌈H/sh⌉, ⌈W/sw⌉): channel (c·sh + p)·sw + q holds x[:, c, p::sh, q::sw]."""
    batch, channels, height, width = x.shape
    x = F.pad(x, (0, -width % sw, 0, -height % sh))
    hq, wq = x.shape[2] // sh, x.shape[3] // sw
    return x.reshape(batch, channels, hq, sh, wq, sw).permute(0, 1, 3, 5, 2, 4).reshape(batch, -1, hq, wq)


def phase_columns(columns: torch.Tensor, in_channels: int, kernel_size: tuple[int, int],
                  stride: tuple[int, int]) -> torch.Tensor:
    """Unfold-order columns (c, i_h, i_w) of a strided conv -> columns of the equivalent stride-1 conv over
    :func:`space_to_depth` input: tap (i_h, i_w) reads phase (i_h mod s_h, i_w mod s_w) at offset
    (i_h div s_h, i_w div s_w), since x[o·s + i] = phase[i mod s][o + i div s]."""
    (kh, kw), (sh, sw) = kernel_size, stride
    khq, kwq = -(-kh // sh), -(-kw // sw)
    col = columns.long()
    ch, ih, iw = col // (kh * kw), (col % (kh * kw)) // kw, col % kw
    phase_channel = (ch * sh + ih % sh) * sw + iw % sw
    return (phase_channel * (khq * kwq) + (ih // sh) * kwq + iw // sw).int().contiguous()
