"""``compression_info(module)``: what the MAC counter (and latency simulator) needs to know about a layer.

A layer that was structurally changed or factorized implements ``compression_info()`` itself; masked
layers are plain conv/linear modules carrying a ``weight_mask`` buffer, read here. The returned dict
always has ``kind`` and ``density`` (fraction of the dense layer's multiply-accumulates still needed).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from compress_run.methods.masks import get_mask


def compression_info(module: nn.Module) -> dict[str, Any] | None:
    own = getattr(module, "compression_info", None)
    if callable(own):
        return own()
    mask = get_mask(module)
    if mask is None:
        return None
    return {"kind": "mask", "pattern": "irregular", "density": mask.sum().item() / mask.numel(),
            "shape": list(mask.shape)}
