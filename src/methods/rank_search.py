"""What the differentiable rank searches (COMCAT, HALOC) share: a Gumbel-softmax temperature annealed
geometrically, and a loss that penalises an expected cost above its budget.

Both searches keep one categorical distribution per layer over candidate ranks, sample a gate with
``F.gumbel_softmax(logits, tau)`` and differentiate the expected cost (parameters for COMCAT, latency for
HALOC) through the softmax. Above the budget the loss is ``ce * (expected / budget) ** exponent``
(HALOC's latency-aware loss; COMCAT uses the same form for parameters); at or below it, plain ``ce``.
"""

from __future__ import annotations

import torch


def annealed_tau(start: float, end: float, fraction: float) -> float:
    """The temperature ``fraction`` of the way from ``start`` to ``end`` on a geometric schedule."""
    return start * (end / start) ** min(1.0, max(0.0, fraction))


def budget_loss(ce: torch.Tensor, expected: torch.Tensor, budget: float, exponent: float) -> torch.Tensor:
    """``ce`` scaled by ``(expected / budget) ** exponent`` while ``expected`` is over ``budget``."""
    ratio = expected / budget
    return ce * ratio**exponent if ratio.item() > 1 else ce
