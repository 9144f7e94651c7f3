"""Recurrent classifiers that read an image row by row: a stacked vanilla RNN (tanh) or LSTM.

An image of C x H x W is a sequence of H steps of C * W values (row-sequential Fashion-MNIST: 28 steps of 28;
digits: 8 of 8). Each layer's two products are plain :class:`torch.nn.Linear` modules called once per step —
``input`` (W x_t, with the bias) and ``recurrent`` (U h_{t-1}) — so masks, quantizers, the noise model and the MAC
counter see every gate product at every step (an LSTM's four gates are one product of 4 x hidden outputs, in
PyTorch's i, f, g, o order). The classifier reads the last layer's final hidden state.
"""

from __future__ import annotations

import torch
from torch import nn

CELLS = ("rnn", "lstm")


class RecurrentLayer(nn.Module):
    def __init__(self, cell: str, in_features: int, hidden_size: int) -> None:
        super().__init__()
        gates = 4 if cell == "lstm" else 1
        self.cell = cell
        self.hidden_size = hidden_size
        self.input = nn.Linear(in_features, gates * hidden_size)
        self.recurrent = nn.Linear(hidden_size, gates * hidden_size, bias=False)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        """(N, T, F) -> (N, T, hidden): the hidden state after every step."""
        n, steps, _ = sequence.shape
        h = sequence.new_zeros(n, self.hidden_size)
        c = sequence.new_zeros(n, self.hidden_size)
        states = []
        for t in range(steps):
            pre = self.input(sequence[:, t]) + self.recurrent(h)
            if self.cell == "lstm":
                i, f, g, o = pre.chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                h = torch.tanh(pre)
            states.append(h)
        return torch.stack(states, dim=1)


class RecurrentClassifier(nn.Module):
    def __init__(self, cell: str, num_classes: int, in_channels: int, image_size: int, hidden_size: int,
                 num_layers: int) -> None:
        super().__init__()
        features = in_channels * image_size
        self.layers = nn.ModuleList(RecurrentLayer(cell, features if i == 0 else hidden_size, hidden_size)
                                    for i in range(num_layers))
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequence = x.permute(0, 2, 1, 3).flatten(2)  # (N, C, H, W) -> (N, H, C * W): one row per step
        for layer in self.layers:
            sequence = layer(sequence)
        return self.fc(sequence[:, -1])


def recurrent(num_classes: int, in_channels: int, image_size: int, width_mult: float = 1.0, cell: str = "lstm",
              hidden_size: int = 128, num_layers: int = 1) -> RecurrentClassifier:
    """A row-sequential ``cell`` classifier with ``num_layers`` layers of ``hidden_size`` x ``width_mult`` units."""
    return RecurrentClassifier(cell, num_classes, in_channels, image_size, max(1, round(hidden_size * width_mult)),
                               num_layers)
