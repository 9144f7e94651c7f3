"""Which kernels can execute a masked layer, and the network with every layer run by its chosen kernel. The
choice by measurement is :mod:`compress_run.hardware.kernel_choice`.

Candidates: ``csr`` and ``bsr_<b>`` (torch.sparse, :mod:`compress_run.kernels.sparse`) and ``gather_scatter`` (the
gather-scatter kernel, :mod:`compress_run.kernels.gather_scatter`, only for masks that are valid GS patterns
with ``gs_banks`` banks) and ``nm_2_4`` (2:4 masks on sparse tensor cores,
:mod:`compress_run.kernels.semi_structured`; only for layers on a CUDA device of compute capability >= 8.0).
A layer none of them can run (grouped conv, string padding) stays dense.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from compress_run.core.gs_pattern import gs_tile_of
from compress_run.core.masks import get_mask
from compress_run.core.projections import as_matrix

HOST_CANDIDATES = ("csr", "bsr_4", "bsr_16", "bsr_32", "gather_scatter")  # kernels that run on the CPU
CANDIDATES = (*HOST_CANDIDATES, "nm_2_4")


def executed_layer(module: nn.Module, fmt: str, gs_banks: int = 16) -> nn.Module:
    """``module`` run by kernel ``fmt`` (ValueError if that kernel cannot run it)."""
    from compress_run.kernels.gather_scatter import GSConv2d, GSLinear
    from compress_run.kernels.sparse import sparse_module

    if fmt == "dense":
        return module
    if fmt == "nm_2_4":
        from compress_run.kernels import semi_structured

        if not (semi_structured.available() and module.weight.is_cuda):
            raise ValueError("2:4 kernels run on a CUDA device with sparse tensor cores (compute capability >= 8.0)")
        return semi_structured.semi_structured_module(module)
    if fmt != "gather_scatter":
        return sparse_module(module, fmt)
    mask = get_mask(module)
    if mask is None or gs_tile_of(as_matrix(mask), gs_banks, 1) is None:
        raise ValueError("the mask is not a gather-scatter pattern")
    if isinstance(module, nn.Linear):
        return GSLinear(module, gs_banks)
    if isinstance(module, nn.Conv2d) and module.groups == 1 and isinstance(module.padding, tuple) \
            and module.padding_mode == "zeros":
        return GSConv2d(module, gs_banks)
    raise ValueError(f"no gather-scatter kernel for {module!r}")


def layer_inputs(net: nn.Module, sample_shape: tuple[int, ...], batch: int) -> dict[str, torch.Tensor]:
    """The input of every masked conv/linear layer on one random batch."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: inputs.setdefault(name, args[0].detach()))
             for name, m in net.named_modules()
             if isinstance(m, nn.Conv2d | nn.Linear) and get_mask(m) is not None]
    try:
        with torch.no_grad():
            net.eval()(torch.randn(batch, *sample_shape, generator=torch.Generator().manual_seed(0)))
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def to_fastest(net: nn.Module, choice: dict[str, dict[str, Any]], gs_banks: int = 16) -> nn.Module:
    """A copy of ``net`` with every layer replaced by its chosen kernel (a layer the kernel cannot run stays
    dense: a simulator's pick may name a format no kernel here executes for that layer)."""
    executed = copy.deepcopy(net)
    for name, row in choice.items():
        if row["kernel"] == "dense":
            continue
        parent_name, _, child = name.rpartition(".")
        parent = executed.get_submodule(parent_name) if parent_name else executed
        try:
            setattr(parent, child, executed_layer(getattr(parent, child), row["kernel"], gs_banks))
        except ValueError:
            continue
    return executed.eval()
