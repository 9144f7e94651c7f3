"""Integer quantization numerics: grids and ranges, granularity, activation calibration, smoothing."""

from __future__ import annotations

import pytest
import torch

from compress_run.core.quantization import (
    activation_scale,
    best_alpha,
    fake_quantize,
    fake_quantize_weight,
    product_error,
    quantize,
    smoothing_scales,
    weight_error,
    weight_scales,
    worst_layers,
)


def outlier_weight(seed: int = 0) -> torch.Tensor:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[5, 17] = 2.0  # one extreme weight, as in the few LLaMA3-70B layers
    return w


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_stay_in_range_and_grid_values_round_trip(bits):
    scale = torch.tensor(0.1)
    codes = quantize(torch.linspace(-100, 100, 1001), scale, bits)
    assert codes.min() == -(2 ** (bits - 1)) and codes.max() == 2 ** (bits - 1) - 1
    on_grid = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1)) * scale
    torch.testing.assert_close(fake_quantize(on_grid, scale, bits), on_grid)
    with pytest.raises(ValueError, match="not supported"):
        quantize(on_grid, scale, 16)


def test_finer_granularity_has_less_error_and_contains_the_outlier():
    w = outlier_weight()
    tensor, channel, group = (weight_error(w, 8, g, 32) for g in ("tensor", "channel", "group"))
    assert group < channel < tensor
    # per channel, the outlier widens the step of its own row only
    q = fake_quantize_weight(w, 8, "channel")
    assert (q[0] - w[0]).abs().max() < 0.02 / 50 and (q[5] - w[5]).abs().max() > 0.003
    scales = weight_scales(w, 8, "group", 32)
    assert scales.shape == (64, 8, 1)
    assert torch.isclose(scales[5, 0, 0], torch.tensor(2.0 / 127))  # columns 0-31 hold the outlier
    assert scales[5, 1, 0] < scales[5, 0, 0] / 10


def test_conv_weights_group_along_the_reduction_with_a_short_last_group():
    w = torch.randn(8, 3, 3, 3)  # reduction 27: groups of 8, the last of 3
    q = fake_quantize_weight(w, 4, "group", 8)
    assert q.shape == w.shape
    assert weight_error(w, 4, "group", 8) < weight_error(w, 4, "channel")
    assert len(torch.unique(q[0])) <= 4 * 16  # at most 16 levels per group, 4 groups per row


def test_mse_and_percentile_calibration_clip_the_tail_minmax_keeps_it():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))  # activations with an exponential tail
    minmax, pct, mse = (activation_scale(x, 4, m) for m in ("minmax", "percentile", "mse"))
    assert minmax == pytest.approx(x.abs().max() / 7)
    assert pct < minmax and mse < minmax / 1.5  # at 4 bits the MSE-optimal clip of a Laplace is ~5 scales

    def error(s):
        return float((fake_quantize(x, s, 4) - x).pow(2).mean())

    assert error(mse) < error(minmax) / 2 and error(mse) <= error(pct)


def test_smoothing_keeps_the_product_and_balances_the_ranges():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=g)
    x[:, 3] *= 60.0  # an activation outlier channel
    w = torch.randn(32, 64, generator=g) * 0.05
    s = smoothing_scales(x.abs().amax(0), w, 0.5)
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-4)
    smoothed = (x / s).abs().amax(0)
    assert smoothed.max() / smoothed.median() < x.abs().amax(0).max() / x.abs().amax(0).median() / 5
    alpha, errors = best_alpha(x, w, [0.0, 0.25, 0.5, 0.75, 1.0], weight_bits=8, input_bits=8)
    assert errors[alpha] < product_error(x, w, weight_bits=8, input_bits=8) / 2  # halves the W8A8 error at least
    assert 0.0 < alpha < 1.0  # both sides matter: neither extreme is best


def w4a8_error(x: torch.Tensor, w: torch.Tensor, alpha: float, weight_bits: int = 4, input_bits: int = 8) -> float:
    """The quantized product's relative error, written out independently: SmoothQuant's s (maxima clamped as in
    smoothing_scales), X/s at ``input_bits`` with its absmax scale, W·s at ``weight_bits`` per output row."""
    s = (x.abs().amax(0).clamp_min(1e-8) ** alpha / w.abs().amax(0).clamp_min(1e-8) ** (1 - alpha)).clamp_min(1e-5)
    xs, ws = x / s, w * s
    top_x, top_w = 2 ** (input_bits - 1) - 1, 2 ** (weight_bits - 1) - 1
    step_x = xs.abs().max() / top_x
    step_w = ws.abs().amax(1, keepdim=True) / top_w
    xq = (xs / step_x).round().clamp(-top_x - 1, top_x) * step_x
    wq = (ws / step_w).round().clamp(-top_w - 1, top_w) * step_w
    ref = x @ w.T
    return float((xq @ wq.T - ref).pow(2).sum() / ref.pow(2).sum())


def test_bi_smoothing_scores_each_side_at_its_own_width():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 64, generator=g)
    x[:, :4] *= 20.0  # activation outlier channels: at W8A8 most of the range moves into the weights
    w = torch.randn(32, 64, generator=g) * 0.05
    alphas = [round(0.1 * k, 1) for k in range(11)]
    w4a8 = {a: w4a8_error(x, w, a) for a in alphas}
    w8a8 = {a: w4a8_error(x, w, a, weight_bits=8) for a in alphas}
    alpha, errors = best_alpha(x, w, alphas, weight_bits=4, input_bits=8)
    assert alpha == min(w4a8, key=w4a8.__getitem__)
    assert errors == pytest.approx(w4a8, rel=1e-4)
    # int4 weights cannot take the outliers W8A8 would move into them: a smaller α, and the W8A8 choice (what
    # the search picked when it quantized the weights at the input width) has over twice the W4A8 error
    w8a8_alpha = min(w8a8, key=w8a8.__getitem__)
    assert best_alpha(x, w, alphas, weight_bits=8, input_bits=8)[0] == w8a8_alpha
    assert alpha <= w8a8_alpha - 0.3 and w4a8[w8a8_alpha] > 2 * w4a8[alpha]
    # and the other way round: 8-bit weights with 6-bit inputs favour moving more into the weights
    assert best_alpha(x, w, alphas, weight_bits=8, input_bits=6)[0] > best_alpha(x, w, alphas, weight_bits=6,
                                                                                   input_bits=6)[0]


def test_mixed_granularity_picks_the_worst_layers_within_the_budget():
    errors = {f"layer{i}": e for i, e in enumerate([0.01, 0.5, 0.02, 0.03, 0.9] + [0.01] * 95)}
    assert worst_layers(errors, 0.03) == ["layer4", "layer1", "layer3"]
    assert worst_layers(errors, 0.005) == []


def test_per_token_inputs_follow_smoothquants_absmax_formula():
    """mit-han-lab/smoothquant, smoothquant/fake_quant.py: quantize_activation_per_token_absmax — per token,
    scale = max|x| over the channels, clamped at 1e-5, / 127; round(x / scale) * scale."""
    from compress_run.core.quantization import fake_quantize_per_token

    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    x[0, 1] = 0.0  # an all-zero token keeps the 1e-5 floor
    scales = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 127
    torch.testing.assert_close(fake_quantize_per_token(x, 8), (x / scales).round() * scales)
    assert torch.all(fake_quantize_per_token(x, 8)[0, 1] == 0)


def test_weight_outlier_stats_find_the_planted_outlier_row():
    from compress_run.core.quantization import weight_outlier_stats

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    plain = weight_outlier_stats(w)
    w[7, 3] = 40.0
    planted = weight_outlier_stats(w)
    assert planted["max_abs"] == 40.0 and planted["outlier_ratio"] > 2 * plain["outlier_ratio"]
    assert planted["kurtosis"] > 10 > abs(plain["kurtosis"])
