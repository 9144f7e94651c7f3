"""Sparsity distribution over layers: ``uniform``, ``global`` (one magnitude threshold) and ``erk``.

Each function maps per-layer scores to a per-layer density (fraction of weights kept).
"""

from __future__ import annotations

import math

import torch


def uniform(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, float]:
    return {name: 1.0 - sparsity for name in scores}


def global_threshold(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, float]:
    """Keep the top ``round((1 - sparsity) * N)`` scores over all layers; densities follow from it."""
    total = sum(s.numel() for s in scores.values())
    keep = int(round((1.0 - sparsity) * total))
    if keep == 0:
        return {name: 0.0 for name in scores}
    flat = torch.cat([s.flatten().float() for s in scores.values()])
    top = torch.topk(flat, keep, sorted=False).indices
    counts = torch.zeros(flat.numel(), dtype=torch.bool)
    counts[top] = True
    densities, offset = {}, 0
    for name, s in scores.items():
        densities[name] = counts[offset: offset + s.numel()].sum().item() / s.numel()
        offset += s.numel()
    return densities


def erk(scores: dict[str, torch.Tensor], sparsity: float, power_scale: float = 1.0) -> dict[str, float]:
    """Erdos-Renyi-Kernel (Evci et al. 2020): density proportional to sum(shape)/prod(shape),
    scaled so the total non-zero count matches; layers that would exceed density 1 are kept dense."""
    shapes = {name: tuple(s.shape) for name, s in scores.items()}
    dense: set[str] = set()
    while True:
        budget, divisor, raw = 0.0, 0.0, {}
        for name, shape in shapes.items():
            n = math.prod(shape)
            if name in dense:
                budget -= n * sparsity
            else:
                budget += n * (1.0 - sparsity)
                raw[name] = (sum(shape) / n) ** power_scale
                divisor += raw[name] * n
        if not raw:
            break
        eps = budget / divisor
        top = max(raw.values())
        if top * eps <= 1.0:
            break
        dense.update(name for name, r in raw.items() if r == top)
    return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}


DISTRIBUTIONS = {"uniform": uniform, "global": global_threshold, "erk": erk}


def allocate(scores: dict[str, torch.Tensor], sparsity: float, distribution: str) -> dict[str, float]:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; known: {', '.join(DISTRIBUTIONS)}")
    return DISTRIBUTIONS[distribution](scores, sparsity)
