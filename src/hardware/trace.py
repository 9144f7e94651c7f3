"""One forward pass recorded at the ATen dispatch level, op by op, with the innermost module of each op.

This is the single source of truth for MAC counting and latency simulation. Every ATen op a forward
pass dispatches becomes an :class:`OpRecord` holding

* ``kind`` — ``conv`` / ``conv_im2col`` / ``conv_dw`` (depthwise) / ``gemm`` (mm, addmm, bmm, baddbmm) /
  ``attention`` (fused scaled-dot-product attention) / ``pool`` / ``select`` (top-k and k-th value along a
  dimension) / ``sort`` / ``elementwise`` (everything else that touches memory: norms, activations, adds,
  copies) / ``view`` (aliases and allocations: no traffic).
  ``conv_im2col`` marks the float32 CPU convolutions PyTorch sends to its unfold+GEMM kernel instead of
  oneDNN (its ``use_mkldnn`` rule: batch 1, kernel <= 3x3, input <= 20480 values); other devices treat
  it as ``conv``;
* ``work`` — elementary operations of a non-MAC op (output elements; x window size for pools; input elements
  for a selection, x log2 of the sorted length for a sort: a selection's time grows with what it reads, not with
  the k it returns);
* ``macs`` — from torch's own FLOP formulas (``torch.utils.flop_counter``) / 2, plus a formula for the
  CPU flash-attention kernel, which that registry lacks (it would count DeiT attention as zero);
* ``gemms`` — the (batch, M, N, K) products a compute op performs (for tile/wave and systolic models);
* bytes read from parameters/buffers, bytes of other inputs (activations), bytes written.

The trace disables PyTorch's fused multi-head-attention fast path (eval mode would otherwise run one
unpriced kernel per attention block); an op that does MAC work with no formula is listed in
``ModelTrace.unpriced_ops`` rather than silently counted as free. The rounding arithmetic of fake-quantized
layers (:mod:`compress_run.core.quantization`) is not recorded: an integer kernel takes its input on the grid.

Ops are attributed to the innermost module whose ``forward`` is running (module forward hooks), so
conv/linear layers own their GEMMs and attention modules their QK^T / AV products.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from compress_run.core.quantization import in_fake_quantization
from compress_run.core.tokens import gathered_links

aten = torch.ops.aten
CONV_OPS = {aten.convolution, aten._convolution, aten.convolution_backward}
GEMM_OPS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}
ATTENTION_OPS = {aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
                 aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention}
POOL_OPS = {aten.max_pool2d_with_indices, aten.max_pool2d, aten.avg_pool2d, aten.adaptive_avg_pool2d,
            aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d, aten.max_pool1d, aten.avg_pool1d}
SELECT_OPS = {aten.topk, aten.kthvalue}
SORT_OPS = {aten.sort}
# metadata queries that never reach a kernel
ALLOC_OPS = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
             aten._unsafe_view, aten.alias, aten.detach, aten.lift_fresh}
# op names that do multiply-accumulate work: one of these with no MAC formula is reported as unpriced
MAC_LIKE = ("conv", "mm", "matmul", "linear", "attention", "einsum", "bilinear", "addmv", "dot")
IGNORED_OPS = {aten.size, aten.stride, aten.numel, aten.dim, aten.is_contiguous, aten.sym_size,
               aten.sym_stride, aten.sym_numel, aten.storage_offset, aten.sym_storage_offset}


@dataclass
class OpRecord:
    module: str                      # innermost module name ("" = the root / functional code)
    op: str
    kind: str
    macs: int = 0
    work: int = 0
    gemms: list[tuple[int, int, int, int]] = field(default_factory=list)  # (batch, M, N, K)
    weight_bytes: int = 0
    in_bytes: int = 0
    out_bytes: int = 0
    dtype: str = "fp32"
    inputs: tuple[int, ...] = ()     # storage ids of activation inputs (for epilogue fusion)
    output: int = 0                  # storage id of the (first) output


@dataclass
class ModelTrace:
    ops: list[OpRecord]
    module_calls: int                # forward calls of modules (each costs Python time in eager mode)
    input_shape: tuple[int, ...]

    def macs_by_module(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in self.ops:
            if op.macs:
                out[op.module] = out.get(op.module, 0) + op.macs
        return out

    @property
    def macs(self) -> int:
        return sum(op.macs for op in self.ops)

    @property
    def unpriced_ops(self) -> list[str]:
        """Ops that do multiply-accumulate work but that no MAC formula covers (counted as 0: report them)."""
        return sorted({op.op.split(".")[0] for op in self.ops
                       if op.kind != "view" and not op.macs and any(k in op.op for k in MAC_LIKE)})


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(t)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "int8",
               torch.float64: "fp64"}


def _gemms(func: Any, args: tuple, out: Any) -> list[tuple[int, int, int, int]]:
    packet = func._overloadpacket
    if packet in (aten.mm, aten.addmm):
        a, b = args[-2], args[-1]
        return [(1, a.shape[0], b.shape[1], a.shape[1])]
    if packet in (aten.bmm, aten.baddbmm):
        a, b = args[-2], args[-1]
        return [(a.shape[0], a.shape[1], b.shape[2], a.shape[2])]
    if packet in CONV_OPS:
        x, w = args[0], args[1]
        groups = args[8] if len(args) > 8 else 1
        o = out[0] if isinstance(out, (tuple, list)) else out
        spatial = math.prod(o.shape[2:])
        k = w.shape[1] * math.prod(w.shape[2:])
        return [(groups, x.shape[0] * spatial, w.shape[0] // groups, k)]
    if packet in ATTENTION_OPS:
        q, k, v = args[0], args[1], args[2]
        heads = math.prod(q.shape[:-2])
        return [(heads, q.shape[-2], k.shape[-2], q.shape[-1]), (heads, q.shape[-2], v.shape[-1], k.shape[-2])]
    return []


def _conv_kind(args: tuple) -> str:
    x, w = args[0], args[1]
    stride, dilation, transposed = args[3], args[5], args[6]
    groups = args[8] if len(args) > 8 else 1
    if groups > 1 and groups == x.shape[1]:
        return "conv_dw"
    if x.device.type != "cpu" or x.dtype != torch.float32 or transposed or w.dim() != 4:
        return "conv"
    # PyTorch's ConvParams::use_mkldnn for float32 CPU inputs
    strided, dilated = any(s != 1 for s in stride), any(d != 1 for d in dilation)
    threads_ok = (strided or dilated or x.shape[0] >= 16 or w.shape[-1] != 1 or w.shape[-2] != 1
                  or torch.get_num_threads() > 1)
    size_ok = groups > 1 or (w.shape[-1] > 3 and w.shape[-2] > 3) or x.shape[0] > 1 or x.numel() > 20480
    return "conv" if threads_ok and size_ok and torch.backends.mkldnn.is_available() else "conv_im2col"


def _pool_window(packet, args: tuple) -> int:
    if packet in (aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d):
        x, size = args[0], args[1]
        return max(1, math.prod(x.shape[-2:]) // max(1, math.prod(size)))
    kernel = args[1] if len(args) > 1 else 1
    return math.prod(kernel) if isinstance(kernel, list | tuple) else int(kernel) ** 2


def _select_work(packet, args: tuple, kwargs: dict) -> int:
    """Input elements a selection reads; for a sort, times log2 of the length it sorts along."""
    x = args[0]
    if packet not in SORT_OPS or x.dim() == 0:
        return x.numel()
    dim = kwargs.get("dim", args[1] if len(args) > 1 and isinstance(args[1], int) else -1)
    return round(x.numel() * max(1.0, math.log2(max(2, x.shape[dim]))))


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


class _Recorder(TorchDispatchMode):
    def __init__(self, stack: list[str], param_storages: set[int]) -> None:
        super().__init__()
        self.stack = stack
        self.params = param_storages
        self.ops: list[OpRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in IGNORED_OPS or in_fake_quantization():  # an int8 kernel does not run the rounding
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if func.is_view or packet in ALLOC_OPS:
            kind = "view"
        elif packet in CONV_OPS:
            kind = _conv_kind(args)
        elif packet in GEMM_OPS:
            kind = "gemm"
        elif packet in ATTENTION_OPS:
            kind = "attention"
        elif packet in POOL_OPS:
            kind = "pool"
        elif packet in SELECT_OPS:
            kind = "select"
        elif packet in SORT_OPS:
            kind = "sort"
        else:
            kind = "elementwise"
        macs = 0
        if packet in ATTENTION_OPS and packet not in flop_registry:
            macs = _sdpa_flops(args[0].shape, args[1].shape, args[2].shape) // 2
        elif packet in flop_registry:
            macs = int(flop_registry[packet](*args, **kwargs, out_val=out)) // 2
        record = OpRecord(module=self.stack[-1], op=str(packet).removeprefix("aten."), kind=kind, macs=macs,
                          dtype=DTYPE_NAMES.get(ins[0].dtype, str(ins[0].dtype)) if ins else "fp32")
        if kind != "view":
            seen: set[int] = set()
            for t in ins:
                s = _storage(t)
                if s in seen:
                    continue
                seen.add(s)
                if s in self.params:
                    record.weight_bytes += _nbytes(t)
                else:
                    record.in_bytes += _nbytes(t)
            record.out_bytes = sum(_nbytes(t) for t in outs)
            if kind in ("select", "sort"):
                record.work = _select_work(packet, args, kwargs)
            elif not macs and outs:
                record.work = outs[0].numel() * (_pool_window(packet, args) if kind == "pool" else 1)
            record.gemms = _gemms(func, args, out)
        record.inputs = tuple(s for s in (_storage(t) for t in ins) if s not in self.params)
        record.output = _storage(outs[0]) if outs else 0
        self.ops.append(record)
        return out


@torch.no_grad()
def trace_model(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                gathered: bool = True) -> ModelTrace:
    """Run ``model`` once in eval mode on a zero batch of ``input_shape`` (batch included) and record it.
    Sparse attention runs in its gather form (the kept links alone, the work the MAC count reports), or with
    ``gathered=False`` in its masked form (every link computed, the others masked out of the softmax)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.zeros(input_shape, device=device, dtype=dtype)
    return trace_call(model, lambda: model(x), input_shape, gathered)


@torch.no_grad()
def trace_call(model: nn.Module, call: Callable[[], Any], input_shape: tuple[int, ...],
               gathered: bool = True) -> ModelTrace:
    """Record ``call()`` — a forward of ``model`` or of a part of it, e.g. one decode step of a causal LM
    against its KV cache — with ``model``'s modules named as in :func:`trace_model`."""
    was_training = model.training
    model.eval()
    stack = [""]
    calls = [0]
    params = {_storage(t) for t in [*model.parameters(), *model.buffers()]}

    def push(name: str):
        def hook(module, args):
            stack.append(name)
            calls[0] += 1
        return hook

    def pop(module, args, output):
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(push(name)))
            handles.append(module.register_forward_hook(pop))
    recorder = _Recorder(stack, params)
    # nn.MultiheadAttention / TransformerEncoderLayer take a fused eval-mode kernel that no MAC formula prices
    # (torchvision's vit_b_16 counted 11.3 of its 17.6 GMACs); trace the path training takes, op by op
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with recorder, gathered_links(gathered):
            call()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
        model.train(was_training)
    return ModelTrace(ops=recorder.ops, module_calls=calls[0] + 1, input_shape=tuple(input_shape))
