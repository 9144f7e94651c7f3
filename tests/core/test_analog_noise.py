"""The noisy analog computation model: noise at the stated SNR, where it enters, weight noise, converters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compress_run.core.analog_noise import NoiseSpec, converter, covered_layers, noisy
from compress_run.core.masks import attach_mask


def _measured_snr_db(clean: torch.Tensor, noisy_out: torch.Tensor) -> torch.Tensor:
    """Per-sample SNR of ``noisy_out`` against ``clean`` (dB)."""
    signal = clean.flatten(1).pow(2).mean(1)
    noise = (noisy_out - clean).flatten(1).pow(2).mean(1)
    return 10 * torch.log10(signal / noise)


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0, -5.0])
def test_output_noise_is_measured_at_the_stated_snr(snr_db):
    torch.manual_seed(0)
    layer = nn.Linear(64, 4096)
    x = torch.randn(32, 64) * 3
    clean = layer(x)
    with noisy(layer, NoiseSpec(snr_db=snr_db), torch.Generator().manual_seed(1)):
        out = layer(x)
    measured = _measured_snr_db(clean, out)
    assert measured.mean().item() == pytest.approx(snr_db, abs=0.1)
    assert (measured - snr_db).abs().max().item() < 0.35  # per sample, 4,096 elements each


def test_input_noise_is_at_the_snr_of_the_input_and_reaches_the_output_through_the_weights():
    torch.manual_seed(0)
    layer = nn.Linear(2048, 2048, bias=False)
    nn.init.eye_(layer.weight)  # the output is the (noisy) input
    x = torch.randn(8, 2048)
    with noisy(layer, NoiseSpec(snr_db=10.0, site="input"), torch.Generator().manual_seed(2)):
        out = layer(x)
    assert _measured_snr_db(x, out).mean().item() == pytest.approx(10.0, abs=0.15)
    layer.weight.data *= 3.0  # input noise scales with the weights; output noise would not
    with noisy(layer, NoiseSpec(snr_db=10.0, site="input"), torch.Generator().manual_seed(2)):
        scaled = layer(x)
    torch.testing.assert_close(scaled, 3.0 * out)


def test_conv_output_noise_is_per_sample_over_all_elements():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 3, padding=1)
    x = torch.cat([torch.randn(4, 3, 16, 16), 100 * torch.randn(4, 3, 16, 16)])  # two signal levels
    clean = conv(x)
    with noisy(conv, NoiseSpec(snr_db=5.0), torch.Generator().manual_seed(0)):
        out = conv(x)
    measured = _measured_snr_db(clean, out)
    assert torch.allclose(measured, torch.full_like(measured, 5.0), atol=0.3)


def test_the_snr_is_per_sample_not_per_channel():
    """One sample whose channels differ 100x in power: the noise is set by the sample's power, so the weak channel
    gets the same noise as the strong one (a per-channel SNR would give both 10 dB)."""
    conv = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[10.0]], [[0.0]]], [[[0.0]], [[1.0]]]]))
    x = torch.randn(1, 2, 64, 64)
    clean = conv(x)
    with noisy(conv, NoiseSpec(snr_db=10.0), torch.Generator().manual_seed(0)):
        out = conv(x)
    noise = (out - clean)[0].flatten(1).pow(2).mean(1)
    assert noise[0].item() == pytest.approx(noise[1].item(), rel=0.1)
    assert _measured_snr_db(clean, out).item() == pytest.approx(10.0, abs=0.2)


def test_output_noise_enters_before_the_adc_and_hooks_go_on_an_error():
    layer = nn.Linear(8, 64)
    x = torch.randn(4, 8)
    with noisy(layer, NoiseSpec(snr_db=0.0, adc_bits=3), torch.Generator().manual_seed(0)):
        out = layer(x)
    step = out.abs().amax(1, keepdim=True) / 3
    torch.testing.assert_close(out / step, torch.round(out / step))  # on the ADC's grid: quantized last
    with pytest.raises(RuntimeError, match="boom"), noisy(layer, NoiseSpec(snr_db=0.0)):
        raise RuntimeError("boom")
    assert not layer._forward_hooks and not layer._forward_pre_hooks


def test_weight_noise_has_the_stated_std_and_spares_pruned_weights():
    torch.manual_seed(0)
    layer = nn.Linear(256, 64, bias=False)
    mask = torch.ones(64, 256, dtype=torch.bool)
    mask[:8] = False  # eight pruned output rows
    layer.weight.data[~mask] = 0.0
    attach_mask(layer, mask)
    x = torch.randn(1, 256).expand(4000, 256).contiguous()  # one input, read 4,000 times
    relative = 0.05
    diffs = []
    for seed in range(4000 // 200):
        with noisy(layer, NoiseSpec(weight_noise=relative), torch.Generator().manual_seed(seed)):
            diffs.append(layer(x[:200]) - layer.weight @ x[0])
    diff = torch.cat(diffs)
    assert diff[:, :8].abs().max().item() == 0.0
    sigma = relative * layer.weight.abs().max().item()
    expected_std = sigma * x[0].norm().item()  # sum of 256 independent N(0, sigma^2) w_ij x_j
    # one weight draw per forward pass (per batch of 200): the draws' spread over 20 passes
    per_pass = torch.stack([d[0, 8:] for d in diffs])
    assert per_pass.std().item() == pytest.approx(expected_std, rel=0.1)
    assert all(torch.equal(d[0], d[-1]) for d in diffs)  # the samples of a batch share the weight draw


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_converters_give_at_most_the_levels_of_their_bits(bits):
    torch.manual_seed(0)
    x = torch.randn(3, 1000)
    q = converter(x, bits)
    for row in q:
        assert len(torch.unique(row)) <= 2 ** bits - 1
    levels = 2 ** (bits - 1) - 1
    step = x.abs().amax(1) / levels
    assert ((q - x).abs() <= step[:, None] / 2 + 1e-6).all()
    x.requires_grad_(True)
    converter(x, bits).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight through


def test_adc_quantizes_each_covered_output_and_dac_each_input():
    layer = nn.Linear(16, 32)
    x = torch.randn(5, 16)
    with noisy(layer, NoiseSpec(adc_bits=3, dac_bits=4)):
        out = layer(x)
    assert all(len(torch.unique(row)) <= 7 for row in out)
    torch.testing.assert_close(out, converter(layer(converter(x, 4)), 3))


def test_output_noise_keeps_the_gradient_of_the_clean_product():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    x = torch.randn(6, 8)
    layer(x).sum().backward()
    clean_grad = layer.weight.grad.clone()
    layer.zero_grad()
    with noisy(layer, NoiseSpec(snr_db=0.0)):
        layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, clean_grad)


def test_hooks_are_removed_after_the_block_and_seeded_noise_repeats():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(2, 1, 8, 8)
    clean = net(x)
    with noisy(net, NoiseSpec(snr_db=0.0), torch.Generator().manual_seed(7)):
        first = net(x)
    with noisy(net, NoiseSpec(snr_db=0.0), torch.Generator().manual_seed(7)):
        second = net(x)
    assert not torch.allclose(first, clean)
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(net(x), clean)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_snr_inf_or_null_changes_nothing():
    net = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(3, 4)
    for spec in (NoiseSpec(snr_db=math.inf), NoiseSpec()):
        assert not spec.active()
        with noisy(net, spec):
            torch.testing.assert_close(net(x), net[0](x))


def test_layer_selection_with_globs_and_aliases_and_refusal_of_a_missing_name():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 2))
    assert list(covered_layers(net, [], [])) == ["0", "1", "3", "4"]
    assert list(covered_layers(net, [], ["first_conv", "classifier"])) == ["1", "3"]
    assert list(covered_layers(net, ["3", "4"], ["classifier"])) == ["3"]
    factorized = nn.Sequential(nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 4)), nn.Linear(4, 2))
    assert list(covered_layers(factorized, ["0"], [])) == ["0.0", "0.1"]  # a factorized layer: both factors
    with pytest.raises(ValueError, match="include entry 'fc' matches no conv/linear layer"):
        covered_layers(net, ["fc"], [])
    x = torch.randn(1, 1, 6, 6)
    with noisy(net, NoiseSpec(snr_db=0.0, include=["classifier"]), torch.Generator().manual_seed(0)):
        out = net(x)
    hidden = net[:4](x)
    assert not torch.allclose(out, net[4](hidden))  # only the classifier is noisy: its input is exact
    with noisy(net, NoiseSpec(snr_db=0.0, include=["classifier"]), torch.Generator().manual_seed(0)):
        torch.testing.assert_close(net[4](hidden), out)


def test_weight_noise_refuses_layers_whose_forward_changes_the_weight():
    class Standardized(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, self.weight / self.weight.std(), self.bias)

    net = nn.Sequential(Standardized(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="weight_noise cannot act on 1 layer.*Standardized"):
        noisy(net, NoiseSpec(weight_noise=0.1)).__enter__()
    with noisy(net, NoiseSpec(snr_db=0.0)):  # output noise does not read the weight: fine
        net(torch.randn(1, 1, 4, 4))


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("snr_db", float("nan"), "noise.snr_db=nan"),
    ("snr_db", -math.inf, "noise.snr_db=-inf"),
    ("site", "gate", "output, input"),
    ("weight_noise", -0.1, "a float >= 0"),
    ("adc_bits", -1, "noise.adc_bits=-1"),
    ("dac_bits", 1, "from 2 to 16"),
])
def test_bad_noise_settings_are_refused(key, value, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[")):
        NoiseSpec(**{key: value})
