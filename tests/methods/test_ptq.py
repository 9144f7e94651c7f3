"""Post-training quantization (quant=w8a8*): weights on their integer grids, inputs rounded at their static
scale, smoothing and mixed granularity where they help, the quantize stage in the pipeline (resumable,
composable with any method), the simulator pricing int8 where a profile has it, and bad input refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from compress_run.core.masks import attach_mask, get_mask
from compress_run.core.quantization import (
    activation_scale,
    is_quantized,
    model_bytes,
    product_error,
    smoothing_scales,
)
from compress_run.core.restore import restore_compression
from compress_run.hardware.profile import load_profile
from compress_run.hardware.simulator import Simulator, layer_bits
from compress_run.hardware.trace import trace_model
from compress_run.methods.ptq import PTQ, PTQConfig
from tests.conftest import run_pipeline

# tests/methods/test_config_keys.py flips every quant key in a run with quant=w8a8 (digits smoke)
CONFIG_FLIPS = {
    "weight_bits": ("4", []), "input_bits": ("4", []), "granularity": ("group", []),
    "group_size": ("4", ["quant.granularity=group"]), "calibration": ("mse", []),
    "percentile": ("90.0", ["quant.calibration=percentile"]), "calib_size": ("8", []),
    "calib_batch_size": ("4", ["quant.calibration=mse", "quant.max_rows=16"]),
    "smoothing": ("smoothquant", []), "alpha": ("0.9", ["quant.smoothing=smoothquant"]),
    "alphas": ("[0.0,1.0]", ["quant.smoothing=bi"]), "mixed_fraction": ("0.5", ["quant.group_size=4"]),
    "exclude": ("[classifier]", []), "max_rows": ("16", ["quant.calibration=mse"]), "error_images": ("1", []),
    "activations": ("dynamic", []),
    "mixed_select": ("weight_outliers", ["quant.mixed_fraction=0.5", "quant.group_size=4"]),
}


class Calibration:
    def __init__(self, x: torch.Tensor) -> None:
        self.train_set = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))

    def on_after_batch_transfer(self, batch, index):
        return batch


def net_and_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.ReLU(),
                        nn.Linear(32, 10)).eval()
    x = torch.randn(64, 1, 6, 6)
    return net, x


def ptq(**keys) -> PTQ:
    quantizer = PTQ(_target_="x", **{"calib_size": 32, "calib_batch_size": 16, **keys})
    quantizer.input_shape = (1, 6, 6)
    return quantizer


def test_weights_sit_on_their_grid_and_inputs_are_rounded_at_their_scale():
    net, x = net_and_data()
    attach_mask(net[3], torch.rand(net[3].weight.shape) > 0.7)
    quantizer = ptq(weight_bits=4, input_bits=6)
    quantizer.quantize(net, Calibration(x))
    for layer in (net[0], net[3], net[5]):
        assert is_quantized(layer)
        codes = layer.weight.reshape(layer.weight.shape[0], -1) / layer.quant_weight_scale
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 8
    assert torch.all(net[3].weight[~get_mask(net[3])] == 0)  # pruned weights stay zero
    seen = {}

    def record(module, args, out):
        seen["x"] = args[0]

    net[3].register_forward_hook(record)
    net(x[:4])
    # the hook runs after the rounding pre-hook: the layer computes on its input grid
    codes = seen["x"] / net[3].quant_input_scale
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 32


def test_a_quantized_checkpoint_reloads_to_the_same_outputs():
    net, x = net_and_data()
    ptq(smoothing="bi").quantize(net, Calibration(x))
    state = net.state_dict()
    fresh, _ = net_and_data(seed=1)
    restored = restore_compression(fresh, state)
    fresh.load_state_dict(state)
    assert restored["quantized"] == 3
    torch.testing.assert_close(fresh(x), net(x))


def test_per_token_inputs_without_smoothing_run_only_the_samples_the_error_report_reads(monkeypatch):
    import compress_run.methods.ptq as ptq_module

    net, x = net_and_data()
    quick = ptq(activations="dynamic", error_images=4)
    quick.quantize(net, Calibration(x))
    assert quick.report["calib_images"] == 16  # one batch of 16 holds the 4 samples, not all 32
    assert quick.report["calibration_statistics"].startswith("not needed")
    monkeypatch.setattr(ptq_module, "batches_holding", lambda batches, samples: batches)
    full_net, _ = net_and_data()
    full = ptq(activations="dynamic", error_images=4)
    full.quantize(full_net, Calibration(x))
    assert full.report["calib_images"] == 32
    torch.testing.assert_close(net(x), full_net(x), rtol=0, atol=0)  # the same network either way
    assert quick.report["layer_error"] == full.report["layer_error"]
    static = ptq(error_images=4)
    static.quantize(net_and_data()[0], Calibration(x))
    assert static.report["calib_images"] == 32 and static.report["calibration_statistics"] == "recorded"


def test_smoothing_and_mixed_granularity_cut_the_error_where_it_is():
    net, x = net_and_data()
    with torch.no_grad():
        net[5].weight[3, 7] = 40.0  # one extreme weight: per channel, row 3 loses its small weights
    plain = ptq()
    plain.quantize(net_and_data()[0], Calibration(x))
    mixed = ptq(mixed_fraction=0.34, group_size=4)  # one of three layers
    mixed.quantize(net, Calibration(x))
    assert mixed.report["per_group_layers"] == ["5"]
    assert mixed.report["layer_error"]["5"] < mixed.report["per_group_error_before"]["5"] * 0.6

    with pytest.warns(UserWarning, match="rounds down to no layer"):  # 3% of 3 layers: none, said out loud
        small = ptq(mixed_fraction=0.03)
        small.quantize(net_and_data()[0], Calibration(x))
    assert small.report["per_group_layers"] == [] and small.report["mixed_fraction_selects_none"]

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(16, 16)).eval()
    inputs = torch.randn(256, 16)
    inputs[:, 2] *= 100.0  # an outlier input channel, as in transformer activations
    errors = {}
    for smoothing in ("none", "bi"):
        net = nn.Sequential(nn.Linear(16, 16)).eval()
        net.load_state_dict(lin.state_dict())
        q = PTQ(_target_="x", calib_size=256, calib_batch_size=64, smoothing=smoothing)
        q.input_shape = (16,)
        q.quantize(net, Calibration(inputs))
        errors[smoothing] = q.report["layer_error"]["0"]
    assert errors["bi"] < errors["none"] / 2


def test_bi_smoothing_picks_the_alpha_best_for_the_run_s_own_widths_and_calibration():
    from tests.core.test_quantization import w4a8_error

    alphas = [round(0.1 * k, 1) for k in range(11)]

    def quantized(x: torch.Tensor, w: torch.Tensor, **keys) -> tuple[nn.Module, PTQ]:
        net = nn.Sequential(nn.Linear(64, 32)).eval()
        with torch.no_grad():
            net[0].weight.copy_(w), net[0].bias.zero_()
        q = PTQ(_target_="x", calib_size=512, calib_batch_size=128, smoothing="bi", **keys)
        q.input_shape = (64,)
        q.quantize(net, Calibration(x))
        return net, q

    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 64, generator=g)
    x[:, :4] *= 20.0  # activation outlier channels
    w = torch.randn(32, 64, generator=g) * 0.05
    w4a8 = {a: w4a8_error(x, w, a) for a in alphas}  # all 512 rows calibrate and score (max_rows 4096)
    net, q = quantized(x, w, weight_bits=4)
    chosen = q.report["alpha"]["0"]
    assert chosen == min(w4a8, key=w4a8.__getitem__) == 0.3
    w8a8 = {a: w4a8_error(x, w, a, weight_bits=8) for a in alphas}
    assert w4a8[min(w8a8, key=w8a8.__getitem__)] > 2 * w4a8[chosen]  # the α of W8A8, which the old search chose
    s = (x.abs().amax(0) ** chosen / w.abs().amax(0) ** (1 - chosen)).clamp_min(1e-5)
    torch.testing.assert_close(net[0].quant_input_smooth, s)
    torch.testing.assert_close(net[0].quant_input_scale, (x / s).abs().max() / 127)

    # the search scores the input at the run's calibration: with mse on a heavy tail at W4A4, another α
    g = torch.Generator().manual_seed(0)
    u = torch.rand(512, 64, generator=g) - 0.5
    x = -u.sign() * torch.log1p(-2 * u.abs())  # Laplace rows
    x[:, :4] *= 20.0
    w = torch.randn(32, 64, generator=g) * 0.05

    def errors(calibration: str) -> dict[float, float]:
        out = {}
        for a in alphas:
            s = smoothing_scales(x.abs().amax(0), w, a)
            out[a] = product_error(x, w, weight_bits=4, input_bits=4, scales=s,
                                   input_scale=activation_scale(x / s, 4, calibration))
        return out

    mse, minmax = errors("mse"), errors("minmax")
    assert min(mse, key=mse.__getitem__) != min(minmax, key=minmax.__getitem__)
    _, q = quantized(x, w, weight_bits=4, input_bits=4, calibration="mse")
    assert q.report["alpha"]["0"] == min(mse, key=mse.__getitem__)


def test_int8_is_priced_where_the_profile_has_it():
    net, x = net_and_data()
    ptq().quantize(net, Calibration(x))
    trace = trace_model(net, (1, 1, 6, 6))
    plain, _ = net_and_data()
    assert [op.op for op in trace.ops] == [op.op for op in trace_model(plain, (1, 1, 6, 6)).ops]  # no rounding ops
    bits = layer_bits(net)
    assert bits == {"0": (8, 8), "3": (8, 8), "5": (8, 8)}
    a100 = Simulator(load_profile("a100"))
    int8, float_ = a100.run(trace, {}, bits), a100.run(trace, {})
    assert sum(r.memory_ms for r in int8.layers) < sum(r.memory_ms for r in float_.layers)
    assert int8.total_ms <= float_.total_ms
    host = Simulator(load_profile("host_cpu"))  # no int8 peaks: the layers run dequantized, priced as before
    assert host.run(trace, {}, bits).total_ms == pytest.approx(host.run(trace, {}).total_ms)


def test_model_bytes_count_bits_scales_and_sparse_storage():
    net, x = net_and_data()
    fp32 = model_bytes(net)["model/weight_bytes"]
    assert fp32 == sum(m.weight.numel() * 4 for m in (net[0], net[3], net[5]))
    ptq(weight_bits=4).quantize(net, Calibration(x))
    q4 = model_bytes(net)["model/weight_bytes"]
    scales = sum(m.quant_weight_scale.numel() * 4 for m in (net[0], net[3], net[5]))
    assert q4 == pytest.approx(fp32 / 8 + scales)


def test_bad_quant_settings_are_refused():
    for bad in ({"weight_bits": 16}, {"input_bits": 1}, {"granularity": "row"}, {"calibration": "kl"},
                {"smoothing": "yes"}, {"mixed_fraction": 1.5}):
        with pytest.raises(ValueError, match="quant."):
            PTQConfig(_target_="x", **bad)


@pytest.mark.slow
def test_quantize_stage_runs_after_any_method_and_resumes(tmp_path):
    common = ["dataset=digits", "debug=smoke", "logger=none", "evaluate.measure_latency=false", "quant=w8a8",
              "evaluate.hardware=[a100]"]
    results = run_pipeline([*common, "method=magnitude"], tmp_path / "run")
    assert results["stages"]["quantize"]["status"] == "done"
    assert results["stages"]["evaluate"]["evaluated"].endswith("quantize.ckpt")
    metrics = results["metrics"]
    assert metrics["quant/weight_bits"] == 8 and metrics["quant/layers"] == len(results["quant"]["bits_per_layer"])
    assert abs(metrics["model/prunable_sparsity"] - 0.9) < 0.01  # the masks survive quantization
    # the int8 graph through ONNX Runtime, on the test batches test/acc used (smoke: 2 batches of 64)
    assert metrics["int8_host/test_images"] == 128 and metrics["int8_host/input_scale_mismatch"] == []
    assert metrics["int8_host/agreement"] >= 0.8
    plain = run_pipeline([*common[:-2], "evaluate.hardware=[a100]", "method=magnitude"], tmp_path / "plain")
    assert plain["stages"]["quantize"]["status"] == "skipped" and plain["quant"] == {}
    # CSR at 90% sparsity: 1 + 2 index bytes per int8 weight against 4 + 2 per float one
    assert metrics["model/weight_bytes"] < plain["metrics"]["model/weight_bytes"] * 0.6
    assert metrics["latency_sim_ms/a100"] < plain["metrics"]["latency_sim_ms/a100"]
    (tmp_path / "run" / "stages" / "evaluate.json").unlink()  # resume: evaluate again from quantize.ckpt
    again = run_pipeline([*common, "method=magnitude"], tmp_path / "run")
    assert again["metrics"]["test/acc"] == metrics["test/acc"]
    assert again["quant"]["bits_per_layer"] == results["quant"]["bits_per_layer"]
