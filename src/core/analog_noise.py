"""Noisy analog computation of a network's matrix products: additive Gaussian noise at a signal-to-noise
power ratio, device noise on the weights, and ADC/DAC quantization around each product.

The model follows what the sources state (Qin & Vucinic, arXiv 1811.10649 and 1807.06555: analog matrix-vector
products in memory arrays are noisy, the noise strength is a signal-to-noise *power* ratio in dB; Ma et al.,
arXiv 2002.10636 and US 11,074,318 B2: DACs on a crossbar's inputs, an ADC on every product's output, ADC noise
before or after the conversion, noise on the stored weights). The papers' method sections and code were not
reachable (docs/fidelity.md, noise_injection), so every detail below that they leave open is ours:

* **Where**: ``site=output`` (default) adds the noise to each covered layer's output, bias included (the sensed
  product); ``site=input`` adds it to the layer's input instead (US 11,403,529 B2, claim 13: noise on a layer's
  input voltages), which reaches the output through the weights.
* **How strong**: per sample, over all elements of the tensor the noise is added to, noise variance = mean(t^2)
  / 10^(snr_db / 10) (total power: means and the bias count as signal); the signal power is measured on the fly
  and carries no gradient. Each covered product draws its own noise (a recurrent layer's input and recurrent
  products at every step; the two factors of a factorized layer); products that are not conv/linear modules
  (a ViT's attention products) stay exact.
* **Weights**: ``weight_noise`` is the std of Gaussian noise on each stored weight relative to the layer's max
  |w|, drawn afresh for every forward pass and shared by the samples of a batch (one array read); a weight its
  mask prunes is not programmed into the array and gets none (a weight that is zero without a mask does). Layers
  whose forward transforms the weight (fake-quantized QAT layers, standardized or padded convs) are refused.
* **Converters**: ``dac_bits`` / ``adc_bits`` quantize the layer input / output uniformly and symmetrically to
  2^(b-1) - 1 levels per sign over the sample's max |t| (a dynamic range, ours: a real converter has a fixed,
  calibrated range, so these bit widths are the optimistic case); the output noise enters before the ADC;
  rounding passes gradients straight through.

Order in one covered layer: DAC(x) [+ input noise] -> W x (+ weight-noise term) [+ output noise] -> ADC.
The layers covered are conv/linear modules selected by ``include`` / ``exclude`` (fnmatch globs over module names
plus the aliases ``first_conv`` and ``classifier``); an entry that matches nothing is an error.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress_run.core.config import check
from compress_run.core.masks import get_mask

SITES = ("output", "input")
NOISY_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class NoiseSpec:
    """What is noisy in a network's matrix products (see the module docstring)."""
    snr_db: float | None = None        # additive Gaussian noise at this SNR (dB); null: none
    site: str = "output"               # output: on the product's output; input: on its input
    weight_noise: float = 0.0          # std of weight noise relative to the layer's max |w| (0: none)
    dac_bits: int | None = None        # input quantization bits (null: none)
    adc_bits: int | None = None        # output quantization bits (null: none)
    include: list[str] = field(default_factory=list)  # covered layers (empty: every conv/linear layer)
    exclude: list[str] = field(default_factory=list)  # layers left exact

    def __post_init__(self) -> None:
        check_noise_fields(self, "noise")

    def active(self) -> bool:
        """True when the spec changes anything at all."""
        return (self.snr_db is not None and not math.isinf(self.snr_db)) or self.weight_noise > 0 \
            or self.dac_bits is not None or self.adc_bits is not None

    def random(self) -> bool:
        """True when two passes of the same input can differ (noise, not only quantization)."""
        return (self.snr_db is not None and not math.isinf(self.snr_db)) or self.weight_noise > 0


def check_noise_fields(spec: Any, prefix: str) -> None:
    """Range checks shared by every config holding the noise fields (``prefix``: its key path)."""
    snr = spec.snr_db
    check(snr is None or (isinstance(snr, int | float) and not isinstance(snr, bool) and not math.isnan(snr)
                          and snr != -math.inf),
          f"{prefix}.snr_db", snr, "null (no additive noise), inf, or a number of dB (0 = noise as strong as signal)")
    check(spec.site in SITES, f"{prefix}.site", spec.site, ", ".join(SITES))
    check(isinstance(spec.weight_noise, int | float) and math.isfinite(spec.weight_noise) and spec.weight_noise >= 0,
          f"{prefix}.weight_noise", spec.weight_noise, "a float >= 0 (std relative to the layer's max |w|)")
    for key in ("dac_bits", "adc_bits"):
        bits = getattr(spec, key)
        check(bits is None or (isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 16),
              f"{prefix}.{key}", bits, "null (no converter) or an integer from 2 to 16")


def spec_from(config: Any) -> NoiseSpec:
    """The :class:`NoiseSpec` of a config that holds its fields (a method's, the ``noise`` group's)."""
    return NoiseSpec(**{f.name: getattr(config, f.name) for f in fields(NoiseSpec)})


def noise_std(signal: torch.Tensor, snr_db: float) -> torch.Tensor:
    """Per-sample noise std for ``signal`` (batch first) at ``snr_db``, shaped to broadcast; no gradient."""
    power = signal.detach().float().pow(2).flatten(1).mean(1)
    std = (power / 10.0 ** (snr_db / 10.0)).sqrt()
    return std.view(-1, *([1] * (signal.dim() - 1))).to(signal.dtype)


def add_noise(signal: torch.Tensor, snr_db: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``signal`` plus Gaussian noise at ``snr_db`` per sample (see :func:`noise_std`)."""
    noise = torch.randn(signal.shape, generator=generator, dtype=signal.dtype, device=signal.device)
    return signal + noise * noise_std(signal, snr_db)


def converter(signal: torch.Tensor, bits: int) -> torch.Tensor:
    """Uniform symmetric quantization to 2^(bits-1) - 1 levels per sign over each sample's max |t|; the rounding
    passes gradients straight through."""
    levels = 2 ** (bits - 1) - 1
    scale = signal.detach().abs().flatten(1).amax(1).clamp_min(1e-12) / levels
    scale = scale.view(-1, *([1] * (signal.dim() - 1)))
    quantized = torch.round(signal / scale).clamp(-levels, levels) * scale
    return signal + (quantized - signal).detach()


def covered_layers(model: nn.Module, include: list[str], exclude: list[str]) -> dict[str, nn.Module]:
    """The conv/linear layers a spec covers, in registration order. A pattern covers a layer when it matches the
    layer's name or the name of a module holding it (``fc`` covers ``fc.first`` and ``fc.second`` once a method
    has factorized ``fc``: each factor is its own product, so each is noisy). An include/exclude entry that
    matches no layer raises ValueError naming it and a few layer names."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NOISY_TYPES)}
    convs = [n for n, m in layers.items() if not isinstance(m, nn.Linear)]
    linears = [n for n, m in layers.items() if isinstance(m, nn.Linear)]

    def within(name: str, pattern: str) -> bool:
        parts = name.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))

    def hits(pattern: str, key: str) -> list[str]:
        found = convs[:1] if pattern == "first_conv" else linears[-1:] if pattern == "classifier" else \
            [n for n in layers if within(n, pattern)]
        if not found:
            shown = ", ".join(list(layers)[:6]) + (" ..." if len(layers) > 6 else "")
            raise ValueError(f"{key} entry {pattern!r} matches no conv/linear layer of this model (its layers: "
                             f"{shown or 'none'}; aliases: first_conv, classifier)")
        return found

    chosen = {n for p in include for n in hits(p, "include")} if include else set(layers)
    dropped = {n for p in exclude for n in hits(p, "exclude")}
    return {n: m for n, m in layers.items() if n in chosen - dropped}


def _weight_noise_term(module: nn.Module, x: torch.Tensor, relative_std: float,
                       generator: torch.Generator | None) -> torch.Tensor:
    """The output change that Gaussian noise on the layer's stored weights causes for input ``x`` (a product is
    linear in the weights, so (W + dW) x = W x + dW x); a weight its mask prunes is not stored and gets none."""
    weight = module.weight.detach()
    scale = weight.abs().amax().clamp_min(1e-12) * relative_std
    delta = torch.randn(weight.shape, generator=generator, dtype=weight.dtype, device=weight.device) * scale
    mask = get_mask(module)
    if mask is not None:
        delta = delta * mask.to(delta.dtype)
    if isinstance(module, nn.Linear):
        return F.linear(x, delta)
    return module._conv_forward(x, delta, None)


class NoisyComputation:
    """Hooks that make the covered layers of ``model`` compute as ``spec`` says, until :meth:`remove`."""

    def __init__(self, model: nn.Module, spec: NoiseSpec, generator: torch.Generator | None = None) -> None:
        self.spec = spec
        self.generator = generator
        self.layers = covered_layers(model, list(spec.include), list(spec.exclude))
        if spec.weight_noise > 0:
            other = [n for n, m in self.layers.items() if type(m) not in NOISY_TYPES]
            if other:  # their forward transforms the weight (standardizes, fake-quantizes, pads): dW x would be wrong
                raise ValueError(f"weight_noise cannot act on {len(other)} layer(s) whose forward changes the weight "
                                 f"or the product ({', '.join(other[:3])}: {type(self.layers[other[0]]).__name__}); "
                                 "exclude them or set weight_noise=0")
        self.handles: list[Any] = []
        if spec.active():
            for module in self.layers.values():
                self.handles.append(module.register_forward_pre_hook(self._before))
                self.handles.append(module.register_forward_hook(self._after))

    def _before(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if self.spec.dac_bits is not None:
            x = converter(x, self.spec.dac_bits)
        if self.spec.site == "input" and self.spec.snr_db is not None and not math.isinf(self.spec.snr_db):
            x = add_noise(x, self.spec.snr_db, self.generator)
        return (x, *args[1:])

    def _after(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if self.spec.weight_noise > 0:
            output = output + _weight_noise_term(module, args[0], self.spec.weight_noise, self.generator)
        if self.spec.site == "output" and self.spec.snr_db is not None and not math.isinf(self.spec.snr_db):
            output = add_noise(output, self.spec.snr_db, self.generator)
        if self.spec.adc_bits is not None:
            output = converter(output, self.spec.adc_bits)
        return output

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@contextmanager
def noisy(model: nn.Module, spec: NoiseSpec, generator: torch.Generator | None = None) -> Iterator[NoisyComputation]:
    """Run ``model`` with noisy computation inside the block."""
    hooks = NoisyComputation(model, spec, generator)
    try:
        yield hooks
    finally:
        hooks.remove()


def at_snr(spec: NoiseSpec, snr_db: float) -> NoiseSpec:
    """``spec`` with its additive noise at ``snr_db`` (inf: none)."""
    return replace(spec, snr_db=snr_db)
