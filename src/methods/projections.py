"""Pattern projections: scores of one weight tensor + a target density -> a boolean keep-mask.

Every pruning method takes ``pattern=`` and calls :func:`project`; later patterns (N:M, block,
gather-scatter, channel) register here beside ``irregular``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Projection = Callable[[torch.Tensor, float], torch.Tensor]


def keep_count(numel: int, density: float) -> int:
    """Number of entries kept at ``density`` (rounded to nearest, within [0, numel])."""
    return min(numel, max(0, int(round(density * numel))))


def irregular(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Unstructured: keep the ``round(density * numel)`` highest-scoring entries."""
    k = keep_count(scores.numel(), density)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.topk(scores.flatten().float(), k, sorted=False).indices] = True
    return mask.view_as(scores)


PATTERNS: dict[str, Projection] = {"irregular": irregular}


def project(pattern: str, scores: torch.Tensor, density: float) -> torch.Tensor:
    try:
        return PATTERNS[pattern](scores, density)
    except KeyError:
        raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}") from None
