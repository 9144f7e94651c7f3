"""Recurrent classifiers that read an image row by row: a stacked vanilla RNN (tanh) or LSTM.

An image of C x H x W is a sequence of H steps of C * W values (row-sequential Fashion-MNIST: 28 steps of 28;
digits: 8 of 8). Each layer's two products are plain :class:`torch.nn.Linear` modules called once per step —
``input`` (W x_t, with the bias) and ``recurrent`` (U h_{t-1}) — so masks, quantizers, the noise model and the MAC
counter see every gate product at every step (an LSTM's four gates are one product of 4 x hidden outputs, in
PyTorch's i, f, g, o order). The classifier reads the last layer's final hidden state.

:class:`RecurrentLM` (``model=lstm_lm``) is the same stack as a character-level causal language model over UTF-8
bytes, run by the pipeline like the other causal LMs (models/causal_lm.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress_run.models.causal_lm import ByteTokenizer, CausalLM

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
        return self.scan(sequence, None)[0]

    def scan(self, sequence: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The hidden states of every step from ``state`` (h, c; None: zeros), and the final (h, c)."""
        n, steps, _ = sequence.shape
        if state is None:
            h = sequence.new_zeros(n, self.hidden_size)
            c = sequence.new_zeros(n, self.hidden_size)
        else:
            h, c = state
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
        return torch.stack(states, dim=1), (h, c)


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


class RecurrentLM(CausalLM):
    """A character-level (UTF-8 byte) language model: token embedding, stacked recurrent layers, a linear head over
    the 256 byte ids. The pipeline runs it like the other causal LMs (``forward(tokens [B, T]) -> logits [B, T, V]``);
    its decode cache is each layer's (h, c) state, so a decode step costs one step of every layer."""

    def __init__(self, cell: str, hidden_size: int, num_layers: int, embed_dim: int) -> None:
        nn.Module.__init__(self)
        self.tokenizer = ByteTokenizer()
        self.pretrained = False
        self.vocab_size = self.tokenizer.vocab_size
        self.context_length = 0  # no limit: the state carries any length
        self.source = f"{cell}_lm({hidden_size}x{num_layers})"
        self.cell = cell
        self.embed = nn.Embedding(self.vocab_size, embed_dim)
        self.layers = nn.ModuleList(RecurrentLayer(cell, embed_dim if i == 0 else hidden_size, hidden_size)
                                    for i in range(num_layers))
        self.head = nn.Linear(hidden_size, self.vocab_size)

    def run(self, tokens: torch.Tensor, state: list[tuple[torch.Tensor, torch.Tensor]] | None
            ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        sequence = self.embed(tokens.long())
        final = []
        for i, layer in enumerate(self.layers):
            sequence, h_c = layer.scan(sequence, None if state is None else state[i])
            final.append(h_c)
        return self.head(sequence), final

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.run(tokens, None)[0]

    def prefill(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.run(tokens, None)[1]

    def decode_step(self, token: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        logits, state = self.run(token, cache)
        cache[:] = state
        return logits

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "architecture": f"{self.cell.upper()} language model",
                "layers": len(self.layers), "hidden_size": self.layers[0].hidden_size, "vocab": self.vocab_size,
                "context_length": None, "tokenizer": self.tokenizer.name, "tied_embeddings": False,
                "params": sum(p.numel() for p in self.parameters())}


def recurrent_lm(cell: str = "lstm", hidden_size: int = 256, num_layers: int = 2, embed_dim: int = 64) -> RecurrentLM:
    """A character-level ``cell`` language model over UTF-8 bytes."""
    return RecurrentLM(cell, hidden_size, num_layers, embed_dim)
