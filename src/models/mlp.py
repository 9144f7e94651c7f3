"""A multilayer perceptron over the flattened image: Linear + ReLU per hidden layer, then the classifier."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, num_classes: int, in_features: int, hidden: list[int]) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.fc(x)


def mlp(num_classes: int, in_channels: int, image_size: int, width_mult: float = 1.0,
        hidden: list[int] | tuple[int, ...] = (512, 256)) -> MLP:
    """An MLP for ``in_channels`` x ``image_size``² images, hidden widths scaled by ``width_mult``."""
    return MLP(num_classes, in_channels * image_size * image_size, [max(1, round(h * width_mult)) for h in hidden])
