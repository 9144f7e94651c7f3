"""Latency simulator: the fold model, wave quantization, sparse-format choice, epilogue fusion, MAC views."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from compress_run.core.masks import attach_mask, magnitude_scores, prunable_layers, prune_by_score
from compress_run.hardware.macs import mac_report
from compress_run.hardware.profile import SparseFormatConfig, load_profile
from compress_run.hardware.simulator import Simulator, simulate, systolic_cycles, wave_efficiency
from compress_run.hardware.trace import trace_model
from compress_run.models import cifar_resnet


def test_systolic_fold_model_matches_hand_computation():
    # K=300 rows of weights over a 256-row array -> 2 folds; N=70 <= 256 columns -> 1; M=100 streamed rows.
    # Each fold: fill 2R, + C + T - 2 = 512 + 256 + 100 - 2 = 866 cycles; 2 folds = 1732.
    assert systolic_cycles((1, 100, 70, 300), 256, 256) == 1732
    profile = load_profile("systolic_asic")
    layer = nn.Linear(300, 70, bias=False)
    sim = simulate(layer, trace_model(layer, (100, 300)), profile)
    (row,) = [r for r in sim.layers if r.kind == "gemm"]
    assert row.compute_ms == pytest.approx(1732 / 0.7e9 * 1e3)
    # a 3x3 conv 16->32 on 8x8: K = 16*9 = 144 (1 fold), N = 32, T = 64 output pixels -> 2*256 + 256 + 64 - 2
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    sim = simulate(conv, trace_model(conv, (1, 16, 8, 8)), profile)
    (row,) = [r for r in sim.layers if r.kind.startswith("conv")]
    assert row.compute_ms == pytest.approx(830 / 0.7e9 * 1e3)


def test_wave_quantization():
    assert wave_efficiency((1, 128 * 108, 128, 64), 108, [128, 128]) == 1.0
    # one tile more than a full wave: a second, almost empty wave doubles the time
    assert wave_efficiency((1, 128 * 109, 128, 64), 108, [128, 128]) == pytest.approx(109 / 216)
    # a 100-wide output in a 128-wide tile wastes the rest of the tile
    assert wave_efficiency((1, 128 * 108, 100, 64), 108, [128, 128]) == pytest.approx(100 / 128)


def _masked_resnet20(sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    model = cifar_resnet.resnet20(10, 3, 32)
    layers = prunable_layers(model)
    prune_by_score(layers, magnitude_scores(layers), sparsity)
    return model


def test_90_percent_masks_effective_macs_exact_and_dense_execution_on_a100():
    model = _masked_resnet20(0.9)
    trace = trace_model(model, (1, 3, 32, 32))
    report = mac_report(model, trace)
    out_pixels = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: out_pixels.__setitem__(n, o.shape[-1] * o.shape[-2]))
             for n, m in prunable_layers(model).items()]
    model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    for name, layer in prunable_layers(model).items():
        nnz = int(layer.weight_mask.sum())
        assert report.per_module_effective[name] == pytest.approx(out_pixels[name] * nnz)  # exact MAC arithmetic
        assert report.per_module_effective[name] / report.per_module[name] == pytest.approx(0.1, abs=2e-3)
    sim = simulate(model, trace, load_profile("a100"))
    assert sim.macs("executed") == report.dense  # irregular 90%: cuSPARSE loses to dense tensor cores
    assert not sim.formats()
    assert sim.macs("effective") == pytest.approx(report.effective)


def test_sparse_format_is_chosen_only_where_it_is_faster():
    model = _masked_resnet20(0.98)
    trace = trace_model(model, (1, 3, 32, 32))
    host = load_profile("host_cpu")
    fast_csr = dataclasses.replace(host, sparse_formats={"csr": SparseFormatConfig(efficiency=1.0, fixed=0.0)})
    sim = simulate(model, trace, fast_csr)
    assert set(sim.formats().values()) == {"csr"}
    for row in sim.layers:
        if row.fmt == "csr":
            assert row.macs_executed == pytest.approx(row.macs_effective)
    slow_csr = dataclasses.replace(host, sparse_formats={"csr": SparseFormatConfig(efficiency=0.01, fixed=0.99)})
    slow = simulate(model, trace, slow_csr)
    assert not slow.formats() and slow.macs("executed") == slow.macs("dense")
    assert sim.total_ms < slow.total_ms


def test_two_four_masks_run_on_sparse_tensor_cores():
    layer = nn.Linear(512, 256, bias=False)
    groups = layer.weight.detach().abs().reshape(256, 128, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    attach_mask(layer, keep.reshape(256, 512))
    trace = trace_model(layer, (64, 512))
    sim = simulate(layer, trace, load_profile("a100"))
    assert sim.formats() == {"": "nm_2_4"} or set(sim.formats().values()) == {"nm_2_4"}
    assert sim.macs("executed") == pytest.approx(0.5 * 64 * 512 * 256)
    # an irregular mask of the same density is not 2:4 and runs dense
    attach_mask(layer, torch.rand(256, 512) < 0.5)
    assert not simulate(layer, trace_model(layer, (64, 512)), load_profile("a100")).formats()


def test_gpu_profiles_fuse_epilogues_host_does_not():
    block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    trace = trace_model(block, (1, 16, 32, 32))
    fused = simulate(block, trace, load_profile("a100"))
    assert [r.kind for r in fused.layers] == ["conv"] and len(fused.layers[0].fused) == 2
    eager = simulate(block, trace, load_profile("host_cpu"))
    assert [r.kind for r in eager.layers if r.kind != "overhead"] == ["conv_im2col", "elementwise", "elementwise"]


def test_narrower_model_is_faster_everywhere():
    wide, narrow = cifar_resnet.resnet20(10, 3, 32), cifar_resnet.resnet20(10, 3, 32, width_mult=0.5)
    for name in ("host_cpu", "a100", "jetson_orin", "mobile_a78", "systolic_asic", "h100"):
        profile = load_profile(name)
        t_wide = simulate(wide, trace_model(wide, (8, 3, 32, 32)), profile).total_ms
        t_narrow = simulate(narrow, trace_model(narrow, (8, 3, 32, 32)), profile).total_ms
        assert t_narrow < t_wide, name


def test_batch_n_costs_more_but_less_than_n_times_batch_one_on_gpu():
    model = cifar_resnet.resnet20(10, 3, 32)
    a100 = Simulator(load_profile("a100"))
    one = a100.run(trace_model(model, (1, 3, 32, 32)), {}).total_ms
    many = a100.run(trace_model(model, (32, 3, 32, 32)), {}).total_ms
    assert one < many < 32 * one


def test_memory_bound_layer_follows_bandwidth():
    profile = load_profile("jetson_orin")
    layer = nn.Linear(4096, 4096, bias=False)  # batch 1 GEMV: 64 MiB fp32 weights = 32 MiB in fp16
    sim = simulate(layer, trace_model(layer, (1, 4096)), profile)
    (row,) = [r for r in sim.layers if r.kind == "gemm"]
    assert row.memory_ms > row.compute_ms
    assert row.memory_ms == pytest.approx((4096 * 4096 * 2) / (profile.memory_gbps * 1e9) * 1e3, rel=0.01)
    assert math.isclose(row.total_ms, row.memory_ms + row.overhead_ms)


def test_depthwise_and_attention_never_get_a_sparse_format():
    layer = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
    attach_mask(layer, torch.rand(layer.weight.shape) < 0.02)
    host = load_profile("host_cpu")
    fast_csr = dataclasses.replace(host, sparse_formats={"csr": SparseFormatConfig(efficiency=4.0, fixed=0.0)})
    assert not simulate(layer, trace_model(layer, (1, 16, 32, 32)), fast_csr).formats()


def test_gather_scatter_masks_can_run_in_the_gs_format():
    from compress_run.core.compression_info import compression_info
    from compress_run.core.projections import project

    conv = nn.Conv2d(32, 64, 3, padding=1, bias=False)
    attach_mask(conv, project("gather_scatter:16", conv.weight.detach().abs(), 0.1))
    info = compression_info(conv)
    assert info["formats"]["gather_scatter"] == pytest.approx(info["density"])
    trace = trace_model(conv, (1, 32, 16, 16))
    host = load_profile("host_cpu")
    fast_gs = dataclasses.replace(host, sparse_formats={"gather_scatter": SparseFormatConfig(efficiency=1.0)})
    sim = simulate(conv, trace, fast_gs)
    assert set(sim.formats().values()) == {"gather_scatter"}
    assert sim.macs("executed") == pytest.approx(sim.macs("effective"))
    # an irregular mask of the same density is not a GS pattern
    attach_mask(conv, torch.rand(64, 32, 3, 3) < 0.1)
    assert "gather_scatter" not in compression_info(conv)["formats"]
    assert not simulate(conv, trace_model(conv, (1, 32, 16, 16)), fast_gs).formats()
