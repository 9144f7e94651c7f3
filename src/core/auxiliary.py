"""Loss terms that a network's own modules add to the training loss.

A module that trains toward a goal of its own (SPViT's token selectors toward their keep ratios) records the term
during its training-mode forward and hands it over through ``pop_auxiliary_losses() -> {name: scalar tensor}``;
the training step adds every term to the task loss and logs it by name, so no method has to reach into the
training loop. A term is handed over once: ``pop`` clears it, and a module keeps only its latest forward's term.
"""

from __future__ import annotations

import torch
from torch import nn


def auxiliary_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """The terms the modules of ``model`` recorded in their latest training forward, summed by name."""
    terms: dict[str, torch.Tensor] = {}
    for module in model.modules():
        pop = getattr(module, "pop_auxiliary_losses", None)
        if callable(pop):
            for name, value in pop().items():
                terms[name] = terms[name] + value if name in terms else value
    return terms
