"""Dispatch-level MAC counting with per-module attribution (torch.utils.flop_counter.FlopCounterMode).

MACs are the primary unit (the compression literature's CNN "FLOPs"); FLOPs = 2 x MACs. Counted ops:
convolutions, linear/matmul/bmm, and attention -- including fused ``scaled_dot_product_attention``,
whose CPU kernel FlopCounterMode would otherwise count as zero. Each module's *own* MACs (its total
minus its children's) are reported, so an attention module holds its QK^T and AV products and each
conv/linear layer its GEMM.

Views:
* ``dense`` — from shapes only.
* ``effective`` — each layer's dense MACs times the density its ``compression_info()`` reports
  (mask density for masked layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from compress_run.hardware.compression_info import compression_info


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# attention kernels FlopCounterMode has no formula for (it counts them as 0)
EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


@dataclass
class MacReport:
    per_module: dict[str, int] = field(default_factory=dict)            # module name -> own dense MACs
    per_module_effective: dict[str, float] = field(default_factory=dict)

    @property
    def dense(self) -> int:
        return sum(self.per_module.values())

    @property
    def effective(self) -> float:
        return sum(self.per_module_effective.values())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> MacReport:
    """MACs of one forward pass of ``model`` on a zero batch of ``input_shape`` (batch included)."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
            model(torch.zeros(input_shape, device=device))
    finally:
        model.train(was_training)
    totals = {name: sum(ops.values()) // 2 for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    report = MacReport()
    for name, module in model.named_modules():
        key = f"{root}.{name}" if name else root
        children = sum(totals.get(f"{key}.{child}", 0) for child, _ in module.named_children())
        own = totals.get(key, 0) - children
        if own > 0:
            report.per_module[name] = own
            info = compression_info(module)
            report.per_module_effective[name] = own * (info["density"] if info else 1.0)
    unattributed = totals.get("Global", 0) - totals.get(root, 0)
    if unattributed > 0:  # ops outside any module (functional code around the model)
        report.per_module["<functional>"] = report.per_module_effective["<functional>"] = unattributed
    return report
