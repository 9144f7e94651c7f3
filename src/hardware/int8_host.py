"""A quantized network executed in int8 on the host: ONNX Runtime's QDQ graph on the network's own grids.

The quantized network (PTQ or QAT state) is exported in float (its inputs' smoothing kept, the rounding left out:
its weights already lie on their grids) and ``onnxruntime.quantization.quantize_static`` writes the QDQ graph with
the network's scales as overrides: each quantized layer's input at its static scale (uint8 codes with zero point
128: the grid of the symmetric int8 codes, shifted), its weight at its per-channel scale (codes within ±(2^(b-1) -
1) of its bits, stored as int8; a batch norm the exporter folded into the weight scales its row and the override
follows it). ONNX Runtime then runs the layers as integer kernels (QLinearConv, QLinearMatMul, ...). On an x86
host without VNNI those kernels add each pair of uint8 x int8 products in int16 with saturation, which clipped the
small ViT's W8A8 graph to 82.5% top-1 where the evaluated network has 85.8% (ONNX Runtime's quantization guide names
this and the uint8 x uint8 kernels as the remedy); there the weight codes are stored as uint8 with a zero point of
128, the same grid, and ``int8_host/weight_codes`` says which form ran.

What is not the evaluated network's arithmetic, and is therefore measured rather than assumed: the integer kernels
produce int8 outputs, so every tensor ORT quantizes besides the layers' inputs (the layers' outputs, residual sums)
gets ORT's min-max range over the calibration images; a per-group weight has no per-group form in these operators
and is re-quantized per channel at 8 bits (``int8_host/requantized_layers``); a quantized layer whose weight is
found neither by name nor by value (a linear layer's weight the exporter stored transposed under a generated name
is matched by value) stays float (``int8_host/float_layers``); a layer input the runtime would quantize at another
tensor's scale (ORT gives reshapes and pools their input's scale) keeps its own scale by leaving that op float, and
any input whose written scale still differs from the layer's is named (``int8_host/input_scale_mismatch``). Linear
layers return float outputs (QGemm / MatMulIntegerToFloat), as the evaluated network computes them. The int8
graph's test accuracy is reported beside the evaluated network's (``int8_host/test/acc``), and its latency beside
the float graph's through the same runtime, in the same run.
"""

from __future__ import annotations

import copy
import platform
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress_run.core.quantization import is_quantized
from compress_run.hardware.deploy import export_float, latency_ms, session

LAYER_OPS = {"Conv": 0, "Gemm": None, "MatMul": 1}  # op -> output-channel axis of its weight (Gemm: by transB)
# ops whose output ORT quantizes with their input's scale: one feeding a layer is left float, so the layer's input
# is quantized at the layer's own scale rather than inheriting the one before the op
SHARED_SCALE_OPS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "AveragePool", "GlobalAveragePool",
                    "MaxPool", "Resize", "Gather", "Slice", "Split", "Concat", "Pad", "Identity"}


def weight_axis(node: Any) -> int:
    if node.op_type != "Gemm":
        return LAYER_OPS[node.op_type]
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return 0 if trans_b else 1


def channel_scales(onnx_weight: np.ndarray, axis: int, module: nn.Module) -> list[float] | None:
    """Per-output-channel scales putting ``onnx_weight`` (the layer's weight, maybe scaled per channel by a folded
    batch norm) on the module's grid; None when the module's weight is not per-channel or does not match."""
    groups = module.quant_weight_scale.shape[1]
    if groups != 1:
        return None
    rows = np.moveaxis(onnx_weight, axis, 0).reshape(onnx_weight.shape[axis], -1).astype(np.float64)
    ours = module.weight.detach().double().reshape(module.weight.shape[0], -1).numpy()
    if rows.shape != ours.shape:
        return None
    scales = []
    for row, own, step in zip(rows, ours, module.quant_weight_scale[:, 0].double().tolist(), strict=True):
        norm = float(own @ own)
        factor = float(row @ own) / norm if norm > 0 else 1.0
        if norm > 0 and np.abs(row - factor * own).max() > 1e-5 * max(1.0, np.abs(row).max()):
            return None  # not a per-channel rescaling of our weight
        scales.append(abs(factor) * step if norm > 0 and factor != 0 else 1.0)
    return scales


def owner_of(weight: str, node: Any, initializers: dict[str, Any], quantized: dict[str, nn.Module]) -> str | None:
    """The quantized layer whose weight ``node`` multiplies: by the initializer's name (``<layer>.weight``), or, for
    a weight the exporter stored transposed under a generated name (a linear layer on token sequences), by value."""
    import onnx

    if weight.removesuffix(".weight") in quantized:
        return weight.removesuffix(".weight")
    if node.op_type not in ("MatMul", "Gemm"):
        return None
    rows = np.moveaxis(onnx.numpy_helper.to_array(initializers[weight]), weight_axis(node), 0)
    for name, module in quantized.items():
        if isinstance(module, nn.Linear) and tuple(module.weight.shape) == rows.shape \
                and np.array_equal(module.weight.detach().cpu().numpy(), rows):
            return name
    return None


def u8s8_saturates(cpu_flags: str | None = None, machine: str | None = None) -> bool:
    """Whether ONNX Runtime's int8 kernels with uint8 inputs and int8 weights may saturate on this host.

    On x86 without VNNI they multiply with VPMADDUBSW, which adds each pair of uint8 x int8 products into int16
    with saturation (2 x 255 x 127 > 32767), so a layer with large input and weight codes computes a clipped sum;
    VNNI's VPDPBUSD accumulates in int32 and ARM's kernels do not saturate. Unknown x86 flags count as saturating.
    """
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    if cpu_flags is None:
        try:
            cpu_flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    return "vnni" not in cpu_flags.lower()


def quantize_graph(float_path: Path, int8_path: Path, net: nn.Module, calib: list[torch.Tensor],
                   weight_codes: str = "int8") -> dict[str, Any]:
    """Write the QDQ graph with the network's scales; returns what was matched, re-quantized or left float.

    ``weight_codes``: ``int8`` (zero point 0) or ``uint8`` (the same codes shifted by a zero point of 128, for
    hosts where ONNX Runtime's uint8 x int8 kernels saturate: its uint8 x uint8 kernels do not)."""
    if weight_codes not in ("int8", "uint8"):
        raise ValueError(f"weight_codes={weight_codes!r}: use int8 or uint8")
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(float_path))
    initializers = {i.name: i for i in model.graph.initializer}
    input_name = model.graph.input[0].name
    quantized = {name: m for name, m in net.named_modules() if is_quantized(m)}
    producer = {out: node for node in model.graph.node for out in node.output}
    weight_type = QuantType.QInt8 if weight_codes == "int8" else QuantType.QUInt8
    weight_zero = np.array(0, dtype=np.int8) if weight_codes == "int8" else np.array(128, dtype=np.uint8)
    overrides: dict[str, list[dict[str, Any]]] = {}
    matched, requantized, excluded, shared = set(), [], [], 0
    for node in model.graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2:
            continue
        weight = node.input[1]
        owner = owner_of(weight, node, initializers, quantized) if weight in initializers else None
        if owner is None:
            excluded.append(node.name)  # a float layer of ours (or a weight we cannot find) runs in float
            continue
        module = quantized[owner]
        matched.add(owner)
        scale = float(module.quant_input_scale)
        previous = overrides.get(node.input[0])
        if previous is not None and float(previous[0]["scale"]) != scale:
            shared += 1
            scale = max(scale, float(previous[0]["scale"]))  # one tensor, one grid: the wider range clips nothing
        source = producer.get(node.input[0])
        zero = 0 if source is not None and source.op_type == "Relu" else 128  # a ReLU output: the grid's upper half
        if source is not None and source.op_type in SHARED_SCALE_OPS:
            excluded.append(source.name)
        overrides[node.input[0]] = [{"quant_type": QuantType.QUInt8, "scale": np.array(scale, dtype=np.float32),
                                     "zero_point": np.array(zero, dtype=np.uint8)}]
        axis = weight_axis(node)
        scales = channel_scales(onnx.numpy_helper.to_array(initializers[weight]), axis, module)
        if scales is None:
            requantized.append(owner)
        else:
            overrides[weight] = [{"quant_type": weight_type, "axis": axis, "scale": np.array(s, dtype=np.float32),
                                  "zero_point": weight_zero} for s in scales]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{input_name: x.cpu().numpy()} for x in calib])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(str(float_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=weight_type, nodes_to_exclude=excluded,
                    extra_options={"TensorQuantOverrides": overrides, "QDQDisableWeightAdjustForInt32Bias": True,
                                   "WeightSymmetric": True,
                                   "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]})
    return {"requantized": sorted(requantized), "float": sorted(set(quantized) - matched), "shared_inputs": shared,
            "input_scale_mismatch": input_scale_mismatches(int8_path, overrides)}


def input_scale_mismatches(int8_path: Path, overrides: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Layer inputs whose quantization in the written graph is not at the override's scale and zero point."""
    import onnx

    graph = onnx.load(str(int8_path)).graph
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    quantizers = {n.input[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
    wrong = []
    for tensor, rows in overrides.items():
        if "axis" in rows[0]:
            continue  # a weight
        q = quantizers.get(tensor)
        if q is None or not np.isclose(float(consts[q.input[1]]), float(rows[0]["scale"]), rtol=1e-6) \
                or int(consts[q.input[2]]) != int(rows[0]["zero_point"]):
            wrong.append(tensor)
    return sorted(wrong)


def int8_host_metrics(net: nn.Module, sample_shape: tuple[int, ...], calib: list[torch.Tensor],
                      test_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], batch: int, warmup: int = 5,
                      repeats: int = 20, measure: bool = True) -> dict[str, Any]:
    """Test accuracy of the int8 graph, the fraction of test images where it predicts what ``net`` predicts, and,
    with ``measure``, its latency and the float graph's at batch 1 and ``batch`` (ONNX Runtime, CPU, as many
    threads as torch uses)."""
    net = copy.deepcopy(net).cpu().eval()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        float_path, int8_path = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        export_float(net, sample_shape, float_path)
        codes = "uint8" if u8s8_saturates() else "int8"
        report = quantize_graph(float_path, int8_path, net, calib, weight_codes=codes)
        int8 = session(int8_path, threads)
        name = int8.get_inputs()[0].name
        correct = agree = total = 0
        for x, y in test_batches:
            predicted = int8.run(None, {name: x.cpu().numpy()})[0].argmax(1)
            with torch.no_grad():
                evaluated = net(x.cpu()).argmax(1).numpy()
            correct += int((predicted == y.cpu().numpy()).sum())
            agree += int((predicted == evaluated).sum())
            total += len(y)
        metrics: dict[str, Any] = {
            "int8_host/runtime": "onnxruntime QDQ (CPUExecutionProvider)",
            "int8_host/weight_codes": codes if codes == "int8" else "uint8 (zero point 128: x86 without VNNI)",
            "int8_host/test/acc": correct / max(1, total),
            "int8_host/agreement": agree / max(1, total),  # same class as the evaluated (fake-quant) network
            "int8_host/test_images": total,
            "int8_host/requantized_layers": report["requantized"], "int8_host/float_layers": report["float"],
            "int8_host/shared_input_scales": report["shared_inputs"],
            "int8_host/input_scale_mismatch": report["input_scale_mismatch"],
        }
        if measure:
            plain = session(float_path, threads)
            for b in sorted({1, batch}):
                shape = (b, *sample_shape)
                metrics[f"int8_host/latency_ms/b{b}"] = round(latency_ms(int8, shape, warmup, repeats), 4)
                metrics[f"int8_host/float_latency_ms/b{b}"] = round(latency_ms(plain, shape, warmup, repeats), 4)
                metrics[f"int8_host/speedup/b{b}"] = round(metrics[f"int8_host/float_latency_ms/b{b}"]
                                                           / metrics[f"int8_host/latency_ms/b{b}"], 3)
            metrics["int8_host/threads"] = threads
    return metrics
