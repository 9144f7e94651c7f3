"""The matrix view of a weight that every pattern is defined on, and the rounding of a density to a count.

A conv weight [C_out, C_in, K_h, K_w] is the matrix C_out × (K_h·K_w·C_in) with the input channel fastest
(so consecutive columns, and the banks of the gather-scatter pattern, interleave input channels); a linear
weight is [out, in] as it is.
"""

from __future__ import annotations

import torch


def keep_count(numel: int, density: float) -> int:
    """Number of entries kept at ``density`` (rounded to nearest, within [0, numel])."""
    return min(numel, max(0, int(round(density * numel))))


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Rows = outputs, columns = (k_h, k_w, c_in) with the input channel fastest."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1) if t.dim() == 4 else t.reshape(t.shape[0], -1)


def from_matrix(matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) == 4:
        c_out, c_in, kh, kw = shape
        return matrix.reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2).contiguous()
    return matrix.reshape(shape)
