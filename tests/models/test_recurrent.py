"""Row-sequential RNN/LSTM classifiers compute what torch.nn.RNN/LSTM compute, and count every step's MACs; the
MLP's shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress_run.hardware.macs import count_macs
from compress_run.models.mlp import mlp
from compress_run.models.recurrent import recurrent


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_layers_match_torch_recurrent_modules(cell):
    torch.manual_seed(0)
    model = recurrent(10, 1, 12, cell=cell, hidden_size=16, num_layers=2)
    reference = (nn.LSTM if cell == "lstm" else nn.RNN)(12, 16, num_layers=2, batch_first=True)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            getattr(reference, f"weight_ih_l{i}").copy_(layer.input.weight)
            getattr(reference, f"bias_ih_l{i}").copy_(layer.input.bias)
            getattr(reference, f"weight_hh_l{i}").copy_(layer.recurrent.weight)
            getattr(reference, f"bias_hh_l{i}").zero_()
    x = torch.randn(3, 1, 12, 12)
    sequence = x[:, 0]  # one channel: row t is step t
    states, _ = reference(sequence)
    torch.testing.assert_close(model(x), model.fc(states[:, -1]))


@pytest.mark.parametrize(("cell", "gates"), [("rnn", 1), ("lstm", 4)])
def test_macs_count_both_products_at_every_step(cell, gates):
    model = recurrent(10, 1, 28, cell=cell, hidden_size=32)
    macs = count_macs(model, (1, 1, 28, 28)).dense
    assert macs == 28 * gates * 32 * (28 + 32) + 32 * 10


def test_multichannel_rows_are_one_step_each_and_width_scales_the_hidden_units():
    model = recurrent(10, 3, 8, cell="lstm", hidden_size=20, width_mult=0.5)
    assert model.layers[0].input.in_features == 24 and model.layers[0].hidden_size == 10
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_mlp_flattens_the_image_and_scales_its_hidden_widths():
    model = mlp(10, 1, 28, width_mult=0.5, hidden=[512, 256])
    assert [layer.out_features for layer in model.hidden] == [256, 128]
    assert count_macs(model, (1, 1, 28, 28)).dense == 784 * 256 + 256 * 128 + 128 * 10
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)


def test_the_language_model_decodes_step_by_step_what_it_computes_at_once():
    from compress_run.models.recurrent import recurrent_lm

    torch.manual_seed(0)
    lm = recurrent_lm("lstm", hidden_size=24, num_layers=2, embed_dim=8).eval()
    tokens = torch.randint(0, 256, (2, 12))
    full = lm(tokens)
    cache = lm.prefill(tokens[:, :-1])
    step = lm.decode_step(tokens[:, -1:], cache)
    torch.testing.assert_close(step[:, -1], full[:, -1])
    assert full.shape == (2, 12, 256) and lm.describe()["layers"] == 2
