"""Latency simulator: per fused layer ``max(compute time, memory time) + overhead``, summed.

Input is a :class:`~compress_run.hardware.trace.ModelTrace` (every ATen op of one forward pass) and each
layer's ``compression_info()``. For every compute op (conv, depthwise conv, GEMM, attention) the
simulator picks the execution the device would use — dense, or one of the profile's sparse formats
when the layer's mask fits that format and the format is faster at its density — and charges

* compute: executed FLOPs / (op-class peak x shape efficiency x format efficiency). Shape efficiency
  is tile/wave quantization on GPUs (``ceil`` over SMs x output tiles), 1 on CPUs; the systolic array
  uses the weight-stationary fold model instead (:func:`systolic_cycles`);
* memory: weights in the executed format (values + index metadata) + activations in and out, at DRAM
  bandwidth — activations of a layer whose in+out fits in on-chip memory, and the whole model's weights
  when they fit, move at on-chip bandwidth;
* overhead: per kernel (+ per op class), per alias op and per module call for eager frameworks; eager
  CPU frameworks also pay a per-call weight re-layout (``weight_prep_gbps``) on the dense path and
  operand packing / im2col (``operand_gbps``), both fitted by the host calibration.

With ``fuse_epilogue`` (GPU/accelerator deployment stacks) an elementwise op that consumes the output
of the layer before it (BN, activation, residual add) runs inside that layer's kernel: no launch, no
extra round trip through memory, only its extra inputs are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from compress_run.core.compression_info import compression_infos, info_for
from compress_run.core.quantization import quantization_report
from compress_run.hardware.profile import FALLBACK_CLASS, HardwareConfig, SparseFormatConfig
from compress_run.hardware.trace import ModelTrace, OpRecord

COMPUTE_KINDS = ("conv", "conv_im2col", "conv_dw", "gemm", "attention")
SPARSE_KINDS = ("conv", "conv_im2col", "gemm")  # ops a masked weight can run in a sparse format


@dataclass
class LayerTime:
    module: str
    kind: str
    fmt: str = "dense"
    macs_dense: float = 0.0
    macs_effective: float = 0.0
    macs_executed: float = 0.0
    bytes: float = 0.0
    compute_ms: float = 0.0
    memory_ms: float = 0.0
    overhead_ms: float = 0.0
    fused: list[str] = field(default_factory=list)

    context: float = 1.0

    @property
    def total_ms(self) -> float:
        return (max(self.compute_ms, self.memory_ms) + self.overhead_ms) * self.context


@dataclass
class Simulation:
    profile: str
    batch: int
    layers: list[LayerTime]

    @property
    def total_ms(self) -> float:
        return sum(layer.total_ms for layer in self.layers)

    def macs(self, view: str) -> float:
        return sum(getattr(layer, f"macs_{view}") for layer in self.layers)

    def formats(self) -> dict[str, str]:
        return {layer.module: layer.fmt for layer in self.layers if layer.fmt != "dense"}

    def by_module(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for layer in self.layers:
            out[layer.module] = out.get(layer.module, 0.0) + layer.total_ms
        return out


def systolic_cycles(gemm: tuple[int, int, int, int], rows: int, cols: int) -> int:
    """Weight-stationary fold model (SCALE-Sim first order) of one (batch, M, N, K) GEMM.

    The K x N weight matrix is cut into ceil(K/R) x ceil(N/C) folds of at most R x C; each fold is
    loaded and streams the M input rows through the array in ``2R + C + M - 2`` cycles (fill R,
    stream M, drain R + C - 2).
    """
    batch, m, n, k = gemm
    folds = math.ceil(k / rows) * math.ceil(n / cols)
    return batch * folds * (2 * rows + cols + m - 2)


def wave_efficiency(gemm: tuple[int, int, int, int], sms: int, tile: list[int]) -> float:
    """Useful fraction of the work a GPU issues for one GEMM: partial tiles and the last partial wave."""
    batch, m, n, _ = gemm
    tm, tn = tile
    tiles = batch * math.ceil(m / tm) * math.ceil(n / tn)
    waves = math.ceil(tiles / sms)
    return (batch * m * n) / (waves * sms * tm * tn)


def operand_bytes(op: OpRecord) -> int:
    """Activation-side operands of a compute op's GEMMs (input panels / im2col matrix and output), fp32."""
    return sum(batch * (m * k + m * n) * 4 for batch, m, n, k in op.gemms)


def _per_class(table: dict[str, float], kind: str) -> float:
    return table.get(kind, table.get(FALLBACK_CLASS.get(kind, ""), 0.0))


class Simulator:
    def __init__(self, profile: HardwareConfig) -> None:
        self.hw = profile
        self.bpe = profile.bytes_per_element()

    # ------------------------------------------------------------------ pieces of one layer's time
    def mac_seconds(self, op: OpRecord, dtype: str | None = None) -> float:
        """Time of the multiply-accumulates alone at the op class's peak (GPU: after wave quantization)."""
        hw = self.hw
        seconds = 2 * op.macs / hw.peak(op.kind, dtype)
        if hw.kind == "gpu" and hw.sms and op.gemms and op.macs:
            work = sum(g[0] * g[1] * g[2] * g[3] for g in op.gemms)
            eff = sum(g[0] * g[1] * g[2] * g[3] * wave_efficiency(g, hw.sms, hw.tile) for g in op.gemms) / work
            seconds /= eff
        return seconds

    def compute_seconds(self, op: OpRecord, dtype: str | None = None) -> float:
        """Dense execution time of one op in ``dtype`` (default the profile's), memory traffic aside."""
        hw = self.hw
        bpe = hw.bytes_per_element(dtype)
        if op.kind not in COMPUTE_KINDS:
            return op.work / hw.peak(op.kind, dtype)
        if hw.kind == "systolic":
            cycles = sum(systolic_cycles(g, hw.systolic.rows, hw.systolic.cols) for g in op.gemms)
            return cycles / (hw.systolic.clock_ghz * 1e9)
        seconds = self.mac_seconds(op, dtype)
        prep = _per_class(hw.weight_prep_gbps, op.kind)
        if prep:  # eager CPU kernels re-lay out a dense weight on every call
            seconds += op.weight_bytes / 4 * bpe / (prep * 1e9)
        packing = _per_class(hw.operand_gbps, op.kind)
        if packing:
            seconds += operand_bytes(op) / 4 * bpe / (packing * 1e9)
        return seconds

    def sparse_seconds(self, op: OpRecord, dense_seconds: float, spec: SparseFormatConfig, density: float,
                       dtype: str | None = None) -> float:
        """``fixed * dense + density * MAC time / efficiency + operand bytes / operand_gbps``."""
        seconds = spec.fixed * dense_seconds + density * self.mac_seconds(op, dtype) / spec.efficiency
        if spec.operand_gbps:
            seconds += operand_bytes(op) / 4 * self.hw.bytes_per_element(dtype) / (spec.operand_gbps * 1e9)
        return seconds

    def weight_bytes(self, op: OpRecord, fmt: str, density: float, info: dict[str, Any] | None,
                     bpe: float | None = None) -> float:
        """Bytes of the op's weights in ``fmt`` at ``bpe`` bytes per value (default the profile's dtype)."""
        bpe = self.bpe if bpe is None else bpe
        dense = op.weight_bytes / 4 * bpe
        if fmt == "dense" or info is None:
            return dense
        spec = self.hw.sparse_formats[fmt]
        numel = math.prod(info["shape"])
        stored = density * numel
        if fmt.startswith("bsr_"):
            block = int(fmt.split("_")[1])
            return stored * bpe + stored / block**2 * spec.index_bits / 8 + dense - numel * bpe
        return stored * (bpe + spec.index_bits / 8) + dense - numel * bpe

    def quantized_dtype(self, bits: int | None) -> str | None:
        """The dtype an integer layer of ``bits`` runs in here: int8 where the profile has int8 peaks (a
        narrower weight is unpacked to int8), else None (the profile's own dtype: it runs dequantized)."""
        return "int8" if bits is not None and bits <= 8 and "int8" in self.hw.peak_tflops else None

    def bandwidth(self, nbytes: float) -> float:
        hw = self.hw
        if hw.onchip_gbps and nbytes <= hw.onchip_mb * 2**20:
            return hw.onchip_gbps * 1e9
        return hw.memory_gbps * 1e9

    def op_class(self, kind: str) -> str:
        """The profile's class for a traced kind (conv_im2col is a host-only class; elsewhere it is conv)."""
        classes = self.hw.peak_tflops[self.hw.dtype]
        return kind if kind in classes or kind not in FALLBACK_CLASS else FALLBACK_CLASS[kind]

    def overhead_us(self, kind: str) -> float:
        return self.hw.kernel_overhead_us + _per_class(self.hw.class_overhead_us, kind)

    # ---------------------------------------------------------------------------- whole layers
    def layer(self, op: OpRecord, info: dict[str, Any] | None, weights_on_chip: bool,
              bits: tuple[int, int] | None = None) -> LayerTime:
        """One op's row; ``bits`` = (weight bits, input bits) of a quantized layer."""
        row = LayerTime(module=op.module, kind=self.op_class(op.kind), context=self.hw.context_factor)
        dtype = self.quantized_dtype(bits[0] if bits else None) if op.kind in COMPUTE_KINDS else None
        weight_bpe = bits[0] / 8 if dtype else self.bpe
        act_bpe = bits[1] / 8 if dtype else self.bpe
        masked = info is not None and info.get("kind") == "mask"
        row.macs_dense = op.macs if (masked or info is None) else op.macs / max(info["density"], 1e-12)
        row.macs_effective = op.macs * info["density"] if masked else op.macs
        activations = (op.in_bytes * act_bpe + op.out_bytes * self.bpe) / 4
        act_seconds = activations / self.bandwidth(activations)
        weight_bw = self.hw.onchip_gbps * 1e9 if weights_on_chip else self.hw.memory_gbps * 1e9
        dense_compute = self.compute_seconds(op, dtype)
        candidates = [("dense", 1.0, dense_compute)]
        if masked and op.kind in SPARSE_KINDS and self.hw.kind != "systolic":
            for fmt, density in (info.get("formats") or {}).items():
                if fmt in self.hw.sparse_formats and density is not None:
                    spec = self.hw.sparse_formats[fmt]
                    candidates.append((fmt, density, self.sparse_seconds(op, dense_compute, spec, density, dtype)))
        best = None
        for fmt, density, compute in candidates:
            wbytes = self.weight_bytes(op, fmt, density, info, weight_bpe)
            memory = act_seconds + wbytes / weight_bw
            if best is None or max(compute, memory) < max(best[3], best[4]):
                best = (fmt, density, wbytes, compute, memory)
        fmt, density, wbytes, compute, memory = best
        row.fmt = fmt
        row.macs_executed = op.macs * density
        row.bytes = wbytes + activations
        row.compute_ms, row.memory_ms = compute * 1e3, memory * 1e3
        row.overhead_ms = self.overhead_us(op.kind) * 1e-3
        return row

    def fuse(self, row: LayerTime, op: OpRecord, consumed: int) -> None:
        extra = max(op.in_bytes - consumed, 0) / 4 * self.bpe
        row.bytes += extra
        row.memory_ms += extra / self.bandwidth(extra) * 1e3
        row.compute_ms += self.compute_seconds(op) * 1e3
        row.fused.append(op.op)

    def run(self, trace: ModelTrace, infos: dict[str, dict[str, Any]],
            bits: dict[str, tuple[int, int]] | None = None) -> Simulation:
        """Simulate ``trace``; ``infos`` from compression_infos, ``bits`` (weight, input) per quantized layer."""
        hw = self.hw
        bits = bits or {}
        total_weights = sum(op.weight_bytes for op in trace.ops) / 4 * self.bpe
        weights_on_chip = bool(hw.onchip_gbps) and total_weights <= hw.onchip_mb * 2**20 / 2
        layers: list[LayerTime] = []
        open_row: LayerTime | None = None
        open_output, open_out_bytes = None, 0
        views = 0
        for op in trace.ops:
            if op.kind == "view":
                views += 1
                continue
            if (hw.fuse_epilogue and open_row is not None and op.kind == "elementwise"
                    and open_output in op.inputs):
                self.fuse(open_row, op, open_out_bytes)
                open_output, open_out_bytes = op.output, op.out_bytes
                continue
            row = self.layer(op, info_for(infos, op.module), weights_on_chip, bits.get(op.module))
            layers.append(row)
            open_row = row
            open_output, open_out_bytes = op.output, op.out_bytes
        framework = views * hw.view_overhead_us + trace.module_calls * hw.module_overhead_us
        if framework:
            layers.append(LayerTime(module="(framework: module calls, views)", kind="overhead",
                                    overhead_ms=framework * 1e-3, context=hw.context_factor))
        return Simulation(profile=hw.name, batch=trace.input_shape[0], layers=layers)


def layer_bits(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(weight bits, input bits) of every quantized layer (:mod:`compress_run.core.quantization`)."""
    return {name: (row["weight_bits"], row["input_bits"]) for name, row in quantization_report(model).items()}


def simulate(model: nn.Module, trace: ModelTrace, profile: HardwareConfig) -> Simulation:
    return Simulator(profile).run(trace, compression_infos(model), layer_bits(model))
