"""``compression_info(module)``: what the MAC counter and the latency simulator know about a layer.

Every dict has ``kind`` and ``density``:

* ``kind="mask"`` — the layer still runs at its dense shape with a ``weight_mask`` buffer; ``density``
  is the kept fraction, ``shape`` the weight shape and ``formats`` maps each sparse storage format to
  the fraction of the weight it stores (``csr``: nonzeros; ``bsr_<b>``: non-empty b x b blocks;
  ``nm_2_4``: 0.5 if every group of 4 along the reduction dim keeps at most 2, else absent).
  Blocks are counted on the (C_out, C_in/groups * k_h * k_w) matrix the im2col kernels multiply; N:M
  groups run along input channels (innermost), as N:M kernels (cuSPARSELt, ASP) lay a conv out.
* any other ``kind`` (structural change, factorization) — the layer's ops already run at their new,
  smaller shapes, so what is traced is what executes; ``density`` is the fraction of the original dense
  layer's MACs that remains (used to report the dense view). Such layers implement
  ``compression_info()`` themselves; an op is matched to the nearest enclosing module that has info.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress_run.core.masks import get_mask

BLOCK_SIZES = (4, 16, 32, 64)


GS_BANKS = 16  # the gather-scatter kernel's banks (format "gather_scatter")


def mask_matrix(mask: torch.Tensor) -> torch.Tensor:
    """2-D (rows = outputs, cols = reduction) view of a weight mask, input channels innermost."""
    if mask.dim() > 2:
        return mask.permute(0, *range(2, mask.dim()), 1).reshape(mask.shape[0], -1)
    return mask.reshape(mask.shape[0], -1)


def block_density(matrix: torch.Tensor, block: int) -> float:
    rows, cols = matrix.shape
    padded = F.pad(matrix.float(), (0, -cols % block, 0, -rows % block))
    blocks = F.max_pool2d(padded[None, None], block, block)
    return blocks.mean().item() * blocks.numel() * block * block / (rows * cols) if rows * cols else 0.0


def nm_compliant(matrix: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    rows, cols = matrix.shape
    if cols % m:
        return False
    return bool((matrix.reshape(rows, cols // m, m).sum(-1) <= n).all())


def mask_formats(mask: torch.Tensor) -> dict[str, float]:
    plain = mask.bool().reshape(mask.shape[0], -1)
    formats = {"csr": plain.float().mean().item()}
    for block in BLOCK_SIZES:
        formats[f"bsr_{block}"] = block_density(plain, block)
    matrix = mask_matrix(mask.bool())
    if nm_compliant(matrix):
        formats["nm_2_4"] = 0.5
    if gs_compliant(matrix):
        formats["gather_scatter"] = formats["csr"]
    return formats


def gs_compliant(matrix: torch.Tensor, banks: int = GS_BANKS) -> bool:
    """A gather-scatter pattern with ``banks`` banks (equal per-row and per-bank counts in every row group, under
    consecutive grouping or one of the tilings :func:`~compress_run.core.gs_pattern.gs_tile_of` tries)."""
    from compress_run.core.gs_pattern import gs_tile_of

    return 0 < int(matrix.sum()) < matrix.numel() and gs_tile_of(matrix, banks, 1) is not None


def compression_info(module: nn.Module) -> dict[str, Any] | None:
    own = getattr(module, "compression_info", None)
    if callable(own):
        return own()
    mask = get_mask(module)
    if mask is None:
        return None
    return {"kind": "mask", "pattern": "irregular", "density": mask.sum().item() / mask.numel(),
            "shape": list(mask.shape), "formats": mask_formats(mask)}


def compression_infos(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {name: info for name, module in model.named_modules() if (info := compression_info(module))}


def info_for(infos: dict[str, dict[str, Any]], module: str) -> dict[str, Any] | None:
    """Info of ``module`` or of its nearest ancestor that has one."""
    name = module
    while True:
        if name in infos:
            return infos[name]
        if not name:
            return None
        name = name.rpartition(".")[0]
