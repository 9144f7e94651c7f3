"""MAC counting with per-module attribution, in the dense and effective views.

MACs are the primary unit (the compression literature's CNN "FLOPs"); FLOPs = 2 x MACs. Counted at the
dispatch level (:mod:`compress_run.hardware.trace`): convolutions, linear/matmul/bmm and attention —
including fused ``scaled_dot_product_attention``, which torch's FlopCounterMode counts as zero on CPU.
Each module's *own* MACs are reported (an attention module holds its QK^T and AV products, each
conv/linear layer its GEMM); BatchNorm/activations are never mixed in.

Views (see :mod:`compress_run.core.compression_info`):
* ``dense`` — the uncompressed model's MACs, from shapes;
* ``effective`` — what the compression state still needs (mask density, kept blocks, new shapes, ranks);
* ``executed`` — what a given hardware profile runs; it depends on the device's sparse support and is
  produced by the latency simulator (:func:`compress_run.hardware.simulator.simulate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from compress_run.core.compression_info import compression_infos, info_for
from compress_run.hardware.trace import ModelTrace, trace_model


@dataclass
class MacReport:
    per_module: dict[str, float] = field(default_factory=dict)            # module -> own dense MACs
    per_module_effective: dict[str, float] = field(default_factory=dict)

    @property
    def dense(self) -> int:
        return round(sum(self.per_module.values()))

    @property
    def effective(self) -> float:
        return sum(self.per_module_effective.values())


def mac_report(model: nn.Module, trace: ModelTrace, infos: dict[str, dict] | None = None) -> MacReport:
    """Per-module dense and effective MACs of ``trace`` (``infos``: precomputed ``compression_infos``)."""
    infos = compression_infos(model) if infos is None else infos
    report = MacReport()
    for name, macs in trace.macs_by_module().items():
        info = info_for(infos, name)
        masked = info is not None and info.get("kind") == "mask"
        dense = macs if (info is None or masked) else macs / max(info["density"], 1e-12)
        report.per_module[name] = report.per_module.get(name, 0) + dense
        effective = macs * info["density"] if masked else macs
        report.per_module_effective[name] = report.per_module_effective.get(name, 0) + effective
    return report


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> MacReport:
    """MACs of one forward pass of ``model`` on a zero batch of ``input_shape`` (batch included)."""
    return mac_report(model, trace_model(model, input_shape))
