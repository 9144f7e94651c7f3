"""The quantized network executed in int8 by ONNX Runtime: integer kernels on the network's own grids (input
scales and weight codes, through a batch norm the exporter folds), the same predictions as the evaluated
network on real data, and what cannot be represented named instead of silently changed."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
import onnxruntime  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from compress_run.hardware.int8_host import (  # noqa: E402
    export_float,
    int8_host_metrics,
    quantize_graph,
    u8s8_saturates,
)
from compress_run.methods.ptq import PTQ  # noqa: E402


class Calibration:
    def __init__(self, x: torch.Tensor) -> None:
        self.train_set = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))

    def on_after_batch_transfer(self, batch, index):
        return batch


def trained_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8 - 1
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for _ in range(4):
        for idx in train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))].split(64):
            optimizer.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            optimizer.step()
    return net.eval(), x[train], x[test], y[test], y[train]


def quantized(net: nn.Module, calib: torch.Tensor, **keys) -> nn.Module:
    ptq = PTQ(_target_="x", calib_size=256, calib_batch_size=128, **keys)
    ptq.input_shape = (1, 8, 8)
    return ptq.quantize(net, Calibration(calib))


def test_the_int8_graph_runs_integer_kernels_on_the_networks_own_grids():
    net, train_x, *_ = trained_cnn()
    quantized(net, train_x, weight_bits=4)
    with tempfile.TemporaryDirectory() as tmp:
        float_path, int8_path = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        export_float(net, (1, 8, 8), float_path)
        report = quantize_graph(float_path, int8_path, net, [train_x[:128]])
        assert report == {"requantized": [], "float": [], "shared_inputs": 0, "input_scale_mismatch": []}
        graph = onnx.load(str(int8_path)).graph
        consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        dequant = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
        layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
        assert len(layers) == 3
        modules = [net[0], net[3], net[8]]
        for node, module in zip(layers, modules, strict=True):
            x_dq, w_dq = dequant[node.input[0]], dequant[node.input[1]]
            assert float(consts[x_dq.input[1]]) == pytest.approx(float(module.quant_input_scale), rel=1e-6)
            codes = consts[w_dq.input[0]].astype(np.int64).reshape(len(module.weight), -1)
            ours = torch.round(module.weight.detach().reshape(len(module.weight), -1)
                               / module.quant_weight_scale[:, :1]).numpy()
            # a folded batch norm may flip a row's sign, never its codes' magnitudes; 4-bit codes stay within ±7
            assert np.array_equal(np.abs(codes), np.abs(ours)) and np.abs(codes).max() == 7
        session = onnxruntime.SessionOptions()
        session.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        onnxruntime.InferenceSession(str(int8_path), session, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(str(Path(tmp) / "optimized.onnx")).graph.node)
        assert ops["QLinearConv"] == 2 and "Conv" not in ops  # executed as integer kernels


def test_the_int8_graph_predicts_what_the_evaluated_network_predicts():
    net, train_x, test_x, test_y, _ = trained_cnn()
    with torch.no_grad():
        float_acc = float((net(test_x).argmax(1) == test_y).float().mean())
    quantized(net, train_x)
    with torch.no_grad():
        fake_acc = float((net(test_x).argmax(1) == test_y).float().mean())
    metrics = int8_host_metrics(net, (1, 8, 8), [train_x[:128], train_x[128:256]], [(test_x, test_y)], batch=8,
                                warmup=1, repeats=3)
    assert float_acc > 0.85
    assert metrics["int8_host/test_images"] == len(test_y)
    assert metrics["int8_host/agreement"] >= 0.97
    assert abs(metrics["int8_host/test/acc"] - fake_acc) <= 0.02
    assert metrics["int8_host/latency_ms/b1"] > 0 and metrics["int8_host/float_latency_ms/b8"] > 0


def test_what_int8_kernels_cannot_hold_is_named_not_changed():
    net, train_x, *_ = trained_cnn()
    quantized(net, train_x, granularity="group", group_size=8, exclude=["classifier"])
    with tempfile.TemporaryDirectory() as tmp:
        float_path, int8_path = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        export_float(net, (1, 8, 8), float_path)
        report = quantize_graph(float_path, int8_path, net, [train_x[:128]])
        graph = onnx.load(str(int8_path)).graph
    assert report["requantized"] == ["0", "3"]  # per-group weights: re-quantized per channel, and said so
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert producers.get(gemm.input[1]) != "DequantizeLinear"  # the float classifier stays float


class TokenMLP(nn.Module):
    """Linear layers on token sequences: the exporter stores their weights transposed under generated names."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(len(x), 8, 8)
        return self.head(self.fc2(torch.relu(self.fc1(tokens))).mean(1))


def test_linear_layers_on_token_sequences_are_found_by_their_weights():
    torch.manual_seed(0)
    net, x = TokenMLP().eval(), torch.randn(256, 1, 8, 8)
    quantized(net, x)
    with tempfile.TemporaryDirectory() as tmp:
        float_path, int8_path = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        export_float(net, (1, 8, 8), float_path)
        names = {i.name for i in onnx.load(str(float_path)).graph.initializer}
        assert "fc1.weight" not in names  # stored transposed under a generated name
        report = quantize_graph(float_path, int8_path, net, [x[:128]])
    assert report["float"] == [] and report["input_scale_mismatch"] == []


def test_saturating_int8_kernels_are_told_from_the_cpu_flags():
    assert u8s8_saturates("fpu sse2 avx2 fma", "x86_64")  # AVX2 alone: VPMADDUBSW adds products in int16
    assert not u8s8_saturates("fpu sse2 avx2 avx512f avx512_vnni", "x86_64")
    assert not u8s8_saturates("fpu avx2 avx_vnni", "x86_64")
    assert not u8s8_saturates("fp asimd asimddp", "aarch64")


def layer_outputs(net: nn.Module, x: torch.Tensor, weight_codes: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        float_path, int8_path = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        export_float(net, (1, 8, 8), float_path)
        quantize_graph(float_path, int8_path, net, [x], weight_codes=weight_codes)
        run = onnxruntime.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
        return run.run(None, {run.get_inputs()[0].name: x.numpy()})[0]


def test_uint8_weight_codes_give_the_exact_integer_sum_where_int8_codes_saturate():
    # inputs near the top of their range and weights at +-127 codes of one sign per output: every pair of uint8 x
    # int8 products exceeds int16, which is where x86 kernels without VNNI clip
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 4, bias=False)).eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None].expand(4, 64))
    x = 0.9 + 0.1 * torch.rand(128, 1, 8, 8)
    quantized(net, torch.cat([x, -x]))
    x = x[:16]
    with torch.no_grad():
        evaluated = net(x).numpy()
    exact = np.abs(layer_outputs(net, x, "uint8") - evaluated).max()
    clipped = np.abs(layer_outputs(net, x, "int8") - evaluated).max()
    assert exact <= 1e-3 * np.abs(evaluated).max()
    if u8s8_saturates():
        assert clipped > 0.05 * np.abs(evaluated).max()  # this host's int8 kernels clip: the reason for uint8
    else:
        assert clipped <= 1e-3 * np.abs(evaluated).max()


def test_per_token_inputs_skip_the_static_int8_graph_with_the_reason(tmp_path):
    from tests.conftest import run_pipeline

    results = run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "method=dense", "quant=w8a8",
                            "quant.activations=dynamic", "quant.calib_size=64", "evaluate.measure_latency=false"],
                           tmp_path / "run")
    assert "per-token inputs" in results["metrics"]["int8_host/skipped"]
    assert "int8_host/test/acc" not in results["metrics"]
