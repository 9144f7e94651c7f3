"""Per-layer kernel choice by measurement: run every kernel that can execute a masked layer (CSR, BSR,
gather-scatter, 2:4; :mod:`compress_run.kernels.select`) on the layer's real input shape, keep the fastest,
fall back to the dense layer when no sparse kernel beats it.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from compress_run.hardware.measure import median_seconds
from compress_run.kernels.select import CANDIDATES, executed_layer, layer_inputs


@torch.no_grad()
def choose_kernels(net: nn.Module, sample_shape: tuple[int, ...], batch: int = 1,
                   candidates: tuple[str, ...] = CANDIDATES, gs_banks: int = 16, warmup: int = 3,
                   repeats: int = 10, min_time_s: float = 0.02) -> dict[str, dict[str, Any]]:
    """Per masked layer: ``kernel`` (the fastest, or ``dense``) and ``ms`` (every kernel that could run it)."""
    choice = {}
    for name, x in layer_inputs(net, sample_shape, batch).items():
        layer = net.get_submodule(name)
        timings = {"dense": median_seconds(partial(layer, x), warmup, repeats, min_time_s) * 1e3}
        for fmt in candidates:
            try:
                kernel = executed_layer(layer, fmt, gs_banks).eval()
            except ValueError:
                continue
            timings[fmt] = median_seconds(partial(kernel, x), warmup, repeats, min_time_s) * 1e3
        best = min(timings, key=timings.__getitem__)
        choice[name] = {"kernel": best, "ms": {k: round(v, 5) for k, v in timings.items()}}
    return choice
