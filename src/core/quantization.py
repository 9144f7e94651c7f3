"""Uniform integer quantization of weights and activations: the numerics every quantization method shares.

Symmetric, round-to-nearest: q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1), x ≈ s·q. A weight is quantized on
its matrix view (rows = outputs, columns = the reduction, input channel fastest; :func:`as_matrix`) with one
scale per tensor, per output channel (row), or per group of ``group_size`` consecutive columns of a row
(finer: an outlier only widens the step of its own group).

Activations are calibrated per tensor from samples: ``minmax`` (the largest magnitude), ``percentile`` (that
percentile of the magnitudes: outliers clip) or ``mse`` (the clipping range minimising the mean squared
quantization error, searched over a grid of fractions of the largest magnitude).

Smoothing (SmoothQuant, Xiao et al., ICML 2023) moves activation outliers into the weights: with
s_j = max|X_j|^α / max|W_:,j|^(1-α) per input channel j, X' = X·diag(s)^-1 and W' = W·diag(s) give the same
product X'W'ᵀ = XWᵀ, and both sides are quantized with per-channel/per-tensor scales (the form of SmoothQuant's
released code: mit-han-lab/smoothquant — smoothquant/smooth.py: smooth_ln_fcs). :func:`best_alpha` picks α per
layer by the error on both sides (the weight's and the activation's quantization together: the output error of
the quantized product, each side at its own bit width), our reading of the bi-smoothing of the LLaMA3-70B study
(Qin 2024, whose method section and code we could not reach).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compress_run.core.weight_matrix import as_matrix, from_matrix

GRANULARITIES = ("tensor", "channel", "group")
CALIBRATIONS = ("minmax", "percentile", "mse")
MIN_BITS, MAX_BITS = 2, 8


def qmax(bits: int) -> int:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{bits}-bit integers are not supported (use {MIN_BITS}..{MAX_BITS})")
    return 2 ** (bits - 1) - 1


def quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``x`` at ``scale`` (broadcast), in [-2^(b-1), 2^(b-1) - 1]."""
    top = qmax(bits)
    return torch.clamp(torch.round(x / scale), -top - 1, top)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` rounded to its quantization grid (dequantized codes), same dtype and shape."""
    return quantize(x, scale, bits) * scale


def fake_quantize_per_token(x: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """``x`` rounded with one scale per token (per row along ``dim``, the channel dimension): its largest magnitude
    / (2^(b-1) - 1), computed at every call (dynamic), as SmoothQuant's ``quantize_activation_per_token_absmax``
    (mit-han-lab/smoothquant, smoothquant/fake_quant.py: scales clamped at 1e-5 before dividing by q_max)."""
    rows = x.float()  # the rounding in fp32 whatever the model's dtype (a bfloat16 mantissa misplaces codes)
    scale = rows.detach().abs().amax(dim=dim, keepdim=True).clamp_min(1e-5) / qmax(bits)
    return fake_quantize(rows, scale, bits).to(x.dtype)


def stochastic_fake_quantize(x: torch.Tensor, bits: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` on a ``bits``-integer grid with one scale per tensor (its largest magnitude / (2^(b-1) - 1)) and
    stochastic rounding: a value goes to the grid point above with probability equal to its distance from the
    one below (in steps), so the expectation of the result is ``x`` itself (unbiased, unlike round-to-nearest)."""
    scale = _safe(x.detach().abs().amax() / qmax(bits))
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    top = qmax(bits)
    return torch.clamp(torch.floor(x / scale + noise), -top - 1, top) * scale


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row/group keeps scale 1


def weight_scales(matrix: torch.Tensor, bits: int, granularity: str, group_size: int = 128) -> torch.Tensor:
    """Scales broadcastable to ``matrix`` viewed [rows, groups, group_size] (tensor: [1, 1, 1], channel: [rows, 1,
    1], group: [rows, ceil(cols / group_size), 1]); the last group of a row may be short."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    grouped = _grouped(matrix.abs(), group_size if granularity == "group" else matrix.shape[1])
    peak = grouped.amax().reshape(1, 1, 1) if granularity == "tensor" else grouped.amax(dim=2, keepdim=True)
    return _safe(peak / qmax(bits))


def _grouped(matrix: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = matrix.shape
    pad = (-cols) % group_size
    return torch.nn.functional.pad(matrix, (0, pad)).reshape(rows, -1, group_size)


def fake_quantize_weight(weight: torch.Tensor, bits: int, granularity: str, group_size: int = 128) -> torch.Tensor:
    """``weight`` (any conv/linear shape) rounded to its grid at ``granularity``."""
    matrix = as_matrix(weight)
    rows, cols = matrix.shape
    size = group_size if granularity == "group" else cols
    grouped = _grouped(matrix, size)
    scales = weight_scales(matrix, bits, granularity, group_size)
    out = fake_quantize(grouped, scales, bits).reshape(rows, -1)[:, :cols]
    return from_matrix(out, weight.shape)


def weight_error(weight: torch.Tensor, bits: int, granularity: str, group_size: int = 128) -> float:
    """Relative squared error ‖W - Q(W)‖² / ‖W‖² of quantizing ``weight``."""
    q = fake_quantize_weight(weight, bits, granularity, group_size)
    return float((weight - q).pow(2).sum() / weight.pow(2).sum().clamp_min(1e-30))


def activation_scale(samples: torch.Tensor, bits: int, method: str = "minmax", percentile: float = 99.99,
                     grid: int = 100) -> torch.Tensor:
    """One symmetric per-tensor scale for activations like ``samples`` (a 0-d tensor)."""
    if method not in CALIBRATIONS:
        raise ValueError(f"calibration {method!r} is not one of {', '.join(CALIBRATIONS)}")
    magnitudes = samples.detach().abs().flatten().float()
    peak = magnitudes.max()
    if method == "minmax":
        return _safe(peak / qmax(bits))
    if method == "percentile":
        sample = magnitudes if magnitudes.numel() <= 2**24 else magnitudes[torch.randperm(magnitudes.numel())[:2**24]]
        return _safe(torch.quantile(sample, percentile / 100.0) / qmax(bits))
    best, best_error = peak / qmax(bits), float("inf")
    for k in range(1, grid + 1):  # clip at k/grid of the peak: the range with the least squared error
        scale = _safe(peak * k / grid / qmax(bits))
        error = float((fake_quantize(magnitudes, scale, bits) - magnitudes).pow(2).mean())
        if error < best_error:
            best, best_error = scale, error
    return _safe(best)


def smoothing_scales(activation_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^α / max|W_:,j|^(1-α) per input channel of a linear ``weight`` [out, in]."""
    w_absmax = weight.detach().abs().amax(dim=0)
    s = activation_absmax.clamp_min(1e-8).pow(alpha) / w_absmax.clamp_min(1e-8).pow(1.0 - alpha)
    return s.clamp_min(1e-5)


def product_error(x: torch.Tensor, weight: torch.Tensor, *, weight_bits: int, input_bits: int,
                  granularity: str = "channel", group_size: int = 128, scales: torch.Tensor | None = None,
                  input_scale: torch.Tensor | None = None, dynamic: bool = False) -> float:
    """Relative squared error of the quantized product Q(X/s)·Q(W·s)ᵀ against X·Wᵀ (``x`` [N, in], ``weight``
    [out, in]; s = 1 without ``scales``): the input at ``input_bits`` with one per-tensor scale (``input_scale``;
    by default the largest magnitude of X/s), the weight at ``weight_bits`` with scales at ``granularity``."""
    s = torch.ones(weight.shape[1], dtype=x.dtype, device=x.device) if scales is None else scales
    xs, ws = x / s, weight * s
    if dynamic:  # one scale per row (token), at run time
        xq = fake_quantize_per_token(xs, input_bits)
    else:
        scale = activation_scale(xs, input_bits) if input_scale is None else input_scale
        xq = fake_quantize(xs, scale, input_bits)
    wq = fake_quantize_weight(ws, weight_bits, granularity, group_size)
    reference = x @ weight.T
    return float((xq @ wq.T - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))


def best_alpha(x: torch.Tensor, weight: torch.Tensor, alphas: Sequence[float], *, weight_bits: int,
               input_bits: int, granularity: str = "channel", group_size: int = 128,
               absmax: torch.Tensor | None = None,
               input_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
               dynamic: bool = False) -> tuple[float, dict[float, float]]:
    """Bi-smoothing: the α of ``alphas`` whose smoothing gives the least output error of the quantized product on
    the rows ``x`` — the weight at ``weight_bits`` and ``granularity``, the input at ``input_bits`` — and the
    error of every α. ``absmax`` is the per-channel input maximum the smoothing vector is built from (default:
    that of ``x``); ``input_scale`` maps a smoothing vector s to the input's per-tensor scale after dividing by s
    (default: the largest magnitude of X/s), so the search scores the quantizer that will be applied; with
    ``dynamic`` the input takes one scale per row (token) instead."""
    peak = x.detach().abs().amax(dim=0) if absmax is None else absmax
    errors = {}
    for a in alphas:
        s = smoothing_scales(peak, weight, a)
        errors[float(a)] = product_error(x, weight, weight_bits=weight_bits, input_bits=input_bits,
                                         granularity=granularity, group_size=group_size, scales=s,
                                         input_scale=None if input_scale is None or dynamic else input_scale(s),
                                         dynamic=dynamic)
    return min(errors, key=errors.__getitem__), errors


def weight_outlier_stats(weight: torch.Tensor) -> dict[str, float]:
    """How far a weight's largest entries stand out, per output channel (a row of its matrix view): the largest
    |w| over the weight; ``outlier_ratio`` = the largest, over rows, of max|w_row| / std(w_row) (what sets the
    rounding step of every other weight of that row under per-channel scales); ``kurtosis`` = the weight's excess
    kurtosis over all its entries (0 for a Gaussian)."""
    matrix = as_matrix(weight.detach()).float()
    std = matrix.std(dim=1).clamp_min(1e-12)
    flat = matrix.flatten()
    centred = flat - flat.mean()
    variance = centred.pow(2).mean().clamp_min(1e-30)
    return {"max_abs": float(matrix.abs().max()),
            "outlier_ratio": float((matrix.abs().amax(dim=1) / std).max()),
            "kurtosis": float(centred.pow(4).mean() / variance.pow(2) - 3.0)}


def worst_layers(errors: dict[str, float], fraction: float) -> list[str]:
    """Mixed granularity: the layers with the largest quantization error, at most ``fraction`` of all layers
    (rounded down; none when the fraction is below one layer)."""
    count = int(fraction * len(errors) + 1e-9)
    return sorted(errors, key=errors.__getitem__, reverse=True)[:count]


# --------------------------------------------------------------------------- quantized layers (state)
# A quantized conv/linear layer carries its quantization as buffers (so every checkpoint holds it and
# :func:`attach_quantization_from_state_dict` rebuilds it): the weight itself already sits on its integer grid
# (W·diag(s) with smoothing), ``quant_weight_scale`` [rows, groups] and the bit widths say which grid, and a
# forward pre-hook rounds the input to its static per-tensor grid (after dividing by the smoothing vector).
QUANT_BUFFERS = ("quant_weight_scale", "quant_weight_bits", "quant_group_size", "quant_input_scale",
                 "quant_input_bits")
SMOOTH_BUFFER = "quant_input_smooth"
DYNAMIC_BUFFER = "quant_input_dynamic"  # present (True): the input takes one scale per token at every call


_rounding = threading.local()


def in_fake_quantization() -> bool:
    """True while a quantized layer rounds its input (the MAC/latency trace leaves those ops out)."""
    return getattr(_rounding, "depth", 0) > 0


class inputs_unrounded:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Within this context quantized layers only divide their input by its smoothing vector and skip the
    rounding: the float graph an integer runtime re-quantizes with the layers' own scales (int8 export)."""

    def __enter__(self) -> None:
        _rounding.unrounded = getattr(_rounding, "unrounded", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _rounding.unrounded -= 1


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    _rounding.depth = getattr(_rounding, "depth", 0) + 1
    try:
        x = args[0]
        smooth = module._buffers.get(SMOOTH_BUFFER)
        if smooth is not None:
            x = x / (smooth.view(1, -1, *([1] * (x.dim() - 2))) if isinstance(module, nn.Conv2d) else smooth)
        if getattr(_rounding, "unrounded", 0):
            return (x, *args[1:])
        if DYNAMIC_BUFFER in module._buffers:
            dim = 1 if isinstance(module, nn.Conv2d) else -1
            return (fake_quantize_per_token(x, int(module.quant_input_bits), dim), *args[1:])
        rounded = fake_quantize(x.float(), module.quant_input_scale.float(), int(module.quant_input_bits))
        return (rounded.to(x.dtype), *args[1:])
    finally:
        _rounding.depth -= 1


def _register(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for name, value in buffers.items():
        if name in module._buffers:
            module._buffers[name] = value
        else:
            module.register_buffer(name, value)
    if not getattr(module, "_quant_hooked", False):
        module.register_forward_pre_hook(_quantize_input)
        module._quant_hooked = True


def is_quantized(module: nn.Module) -> bool:
    return "quant_weight_bits" in module._buffers


@torch.no_grad()
def attach_quantization(module: nn.Module, weight_bits: int, input_bits: int, input_scale: torch.Tensor,
                        granularity: str, group_size: int = 128, smooth: torch.Tensor | None = None,
                        dynamic: bool = False, on_grid: torch.Tensor | None = None) -> None:
    """Quantize ``module`` (conv/linear) in place: the weight (times ``smooth`` per input channel, if given) is
    rounded to its grid at ``granularity``, the input is rounded at every call to ``input_scale`` (after
    dividing by ``smooth``), or with ``dynamic`` to one scale per token computed at that call. ``on_grid``: the
    weight already sits on a grid of these scales ([rows, groups], e.g. GPTQ's), kept as it is."""
    weight = module.weight
    if smooth is not None:
        shape = (1, -1, *([1] * (weight.dim() - 2)))
        weight.mul_(smooth.to(weight).view(shape))
    matrix = as_matrix(weight)
    size = group_size if granularity == "group" else matrix.shape[1]
    if on_grid is not None:
        scales = on_grid.to(weight).reshape(matrix.shape[0], -1, 1)
    else:
        scales = weight_scales(matrix, weight_bits, granularity, group_size)
        weight.copy_(fake_quantize_weight(weight, weight_bits, granularity, group_size))
    device = weight.device
    buffers = {"quant_weight_scale": scales.reshape(scales.shape[0], -1).expand(matrix.shape[0], -1).clone(),
               "quant_weight_bits": torch.tensor(weight_bits, device=device),
               "quant_group_size": torch.tensor(size, device=device),
               "quant_input_scale": input_scale.detach().reshape(()).to(device).clone(),
               "quant_input_bits": torch.tensor(input_bits, device=device)}
    if smooth is not None:
        buffers[SMOOTH_BUFFER] = smooth.detach().to(device).clone()
    if dynamic:
        buffers[DYNAMIC_BUFFER] = torch.tensor(True, device=device)
    _register(module, buffers)


def attach_quantization_from_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                                        prefix: str = "") -> int:
    """Give every layer the quantization buffers (and input hook) ``state_dict`` has for it, before
    ``load_state_dict`` fills them; returns how many layers."""
    modules = dict(model.named_modules())
    count = 0
    for key in state_dict:
        if not key.startswith(prefix) or not key.endswith(".quant_weight_bits"):
            continue
        name = key[len(prefix):].rpartition(".")[0]
        module = modules.get(name)
        if module is None:
            continue
        names = [*QUANT_BUFFERS, SMOOTH_BUFFER, DYNAMIC_BUFFER]
        found = {b: state_dict[f"{prefix}{name}.{b}"].clone() for b in names if f"{prefix}{name}.{b}" in state_dict}
        _register(module, found)
        count += 1
    return count


def quantization_report(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per quantized layer: weight and input bits, the weight's group size (its row length when per channel)
    and whether the input is smoothed."""
    return {name: {"weight_bits": int(m.quant_weight_bits), "input_bits": int(m.quant_input_bits),
                   "group_size": int(m.quant_group_size), "smoothed": SMOOTH_BUFFER in m._buffers,
                   "input_scale": "per token" if DYNAMIC_BUFFER in m._buffers else "per tensor"}
            for name, m in model.named_modules() if is_quantized(m)}


def model_bytes(model: nn.Module) -> dict[str, float]:
    """Bytes of the model's parameters as stored: a quantized weight at its bits plus its fp32 scales; a masked
    weight in the smaller of dense and CSR form (values + 16-bit column indices + 32-bit row pointers); every
    other parameter and buffer that holds state at fp32 (masks and quantization bookkeeping excluded)."""
    from compress_run.core.masks import MASK_SUFFIX

    total = weights = 0.0
    counted: set[int] = set()  # a tied parameter (an LM head sharing its embedding's matrix) is stored once
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in counted:
                continue
            counted.add(id(param))
            bits = int(module.quant_weight_bits) if name == "weight" and is_quantized(module) \
                else param.element_size() * 8  # a bfloat16 model's float weights at 16 bits
            dense = param.numel() * bits / 8
            mask = module._buffers.get(name + MASK_SUFFIX)
            if mask is not None:
                rows = param.shape[0]
                dense = min(dense, float(mask.sum()) * (bits / 8 + 2) + (rows + 1) * 4)
            if name == "weight" and is_quantized(module):
                dense += module.quant_weight_scale.numel() * 4
            total += dense
            weights += dense if name == "weight" else 0.0
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and not name.endswith(MASK_SUFFIX) and not name.startswith("quant_") \
                    and buf.is_floating_point():
                total += buf.numel() * buf.element_size()
    return {"model/bytes": total, "model/weight_bytes": weights}
