"""A quantized causal LM run by integer kernels on this host, and its speed against the float model.

The quantize stage leaves every quantized linear layer's weight on its integer grid (per-channel scales) and its
input rounding as a hook that runs in float. Here a copy of the network has each such layer replaced by
:class:`Int8Linear`: the weight stored as its integer codes (int8; 4- to 8-bit codes all fit), the input divided
by the smoothing vector (if any), rounded to the layer's own input grid (its static per-tensor scale, or one scale
per token at run time) and stored as int8, the product computed by PyTorch's int8 GEMM (``torch._int_mm``: int8 x
int8 with int32 accumulation, oneDNN on x86) and rescaled by the input and weight scales. That is the arithmetic the
fake-quantized network simulates, so the integer network's perplexity is the same up to float rounding (measured on
the first windows of the test split, beside the fake-quantized network's). Layers with per-group weights stay as
they are (no per-group int8 kernel here; they are counted). Prefill and decode are timed at batch 1 for the integer
network and the float reference in alternating rounds, so both see the same host conditions.
"""

from __future__ import annotations

import copy
import math
import statistics
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from compress_run.core.quantization import DYNAMIC_BUFFER, SMOOTH_BUFFER, is_quantized, qmax
from compress_run.hardware.llm_cost import decode_ms, random_tokens
from compress_run.hardware.measure import median_seconds


class Int8Linear(nn.Module):
    """A quantized linear layer computed in integers: int8 input codes x int8 weight codes -> int32, rescaled."""

    def __init__(self, module: nn.Linear) -> None:
        super().__init__()
        scales = module.quant_weight_scale.detach().float().reshape(-1)
        weight = module.weight.detach().float()
        self.register_buffer("codes_t", torch.round(weight / scales[:, None]).to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scales.reshape(1, -1))
        self.register_buffer("bias", None if module.bias is None else module.bias.detach().float())
        smooth = module._buffers.get(SMOOTH_BUFFER)
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float())
        self.input_scale = float(module.quant_input_scale)
        self.top = qmax(int(module.quant_input_bits))
        self.dynamic = DYNAMIC_BUFFER in module._buffers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        if self.smooth is not None:
            rows = rows / self.smooth
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-5) / self.top if self.dynamic else \
            torch.tensor(self.input_scale)
        codes = torch.clamp(torch.round(rows / scale), -self.top - 1, self.top).to(torch.int8)
        out = torch._int_mm(codes, self.codes_t).float() * (scale * self.weight_scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1)


def integer_network(net: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``net`` whose per-channel quantized linear layers compute in integers, and what was replaced."""
    twin = copy.deepcopy(net).cpu().eval()
    replaced, kept = [], []
    for name, module in list(twin.named_modules()):
        if not (isinstance(module, nn.Linear) and is_quantized(module)):
            continue
        if module.quant_weight_scale.shape[1] != 1:  # per-group scales: no int8 kernel for them here
            kept.append(name)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent_name) if parent_name else twin, child, Int8Linear(module))
        replaced.append(name)
    return twin, {"int8_layers": len(replaced), "float_layers_per_group": kept}


@torch.no_grad()
def window_nll(net: nn.Module, data: Dataset, windows: int) -> tuple[float, int]:
    total, count = 0.0, 0
    for x, y in DataLoader(torch.utils.data.Subset(data, range(min(windows, len(data)))), batch_size=1):
        logp = F.log_softmax(net(x)[0].float(), dim=-1)
        total -= float(logp.gather(-1, y[0].unsqueeze(-1)).sum())
        count += y.numel()
    return total / max(1, count), count


@torch.no_grad()
def llm_int8_metrics(net: nn.Module, reference: nn.Module, test: Dataset, context: int, measure: bool = True,
                     windows: int = 4, rounds: int = 3, decode_tokens: int = 16) -> dict[str, Any]:
    """The integer network's perplexity beside the fake-quantized one's, and (with ``measure``) its prefill and
    decode speed against ``reference`` (the float model), in ``rounds`` alternating rounds at batch 1."""
    integer, info = integer_network(net)
    if not info["int8_layers"]:
        return {"int8_host/skipped": "no quantized linear layer with per-channel scales to run as int8"}
    metrics: dict[str, Any] = {"int8_host/runtime": "torch._int_mm (int8 x int8 -> int32)",
                               "int8_host/layers": info["int8_layers"],
                               "int8_host/float_layers_per_group": len(info["float_layers_per_group"])}
    nll, count = window_nll(integer, test, windows)
    fake, _ = window_nll(net.cpu().eval(), test, windows)
    metrics.update({"int8_host/test_windows_ppl": math.exp(nll), "int8_host/test_windows_tokens": count,
                    "int8_host/fake_quant_test_windows_ppl": math.exp(fake)})
    if not measure:
        return metrics
    tokens = random_tokens(context, reference.vocab_size)
    times: dict[str, dict[str, list[float]]] = {"int8": {"prefill": [], "decode": []},
                                                "float": {"prefill": [], "decode": []}}
    for _ in range(rounds):
        for label, model in (("int8", integer), ("float", reference.cpu().eval())):
            times[label]["prefill"].append(median_seconds(lambda model=model: model(tokens), warmup=1, repeats=2) * 1e3)
            times[label]["decode"].append(decode_ms(model, context, decode_tokens))
    for label in ("int8", "float"):
        for phase in ("prefill", "decode"):
            metrics[f"int8_host/{label}_{phase}_ms"] = round(statistics.median(times[label][phase]), 3)
    metrics["int8_host/decode_tokens_per_s"] = round(1e3 / metrics["int8_host/int8_decode_ms"], 2)
    metrics["int8_host/float_decode_tokens_per_s"] = round(1e3 / metrics["int8_host/float_decode_ms"], 2)
    for phase in ("prefill", "decode"):
        metrics[f"int8_host/speedup/{phase}"] = round(metrics[f"int8_host/float_{phase}_ms"]
                                                      / metrics[f"int8_host/int8_{phase}_ms"], 3)
    metrics["int8_host/threads"] = torch.get_num_threads()
    return metrics
