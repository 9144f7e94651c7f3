"""Post-training quantization (W8A8 and lower): per-channel or per-group weights, static per-tensor activations
calibrated on the train split, SmoothQuant smoothing (Xiao et al., "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models", ICML 2023) and the two fixes of the LLaMA3-70B W8A8
study (Qin, "The Uniqueness of LLaMA3-70B Series with Per-Channel Quantization", arXiv 2408.15301, 2024): mixed
granularity (per-group for the few layers whose quantization error is worst) and bi-smoothing (the smoothing
strength chosen per layer by the error on both sides).

Reference code: mit-han-lab/smoothquant — smoothquant/smooth.py: smooth_ln_fcs (s_j = max|X_j|^α /
max|W_:,j|^(1-α), clamped at 1e-5; the input divided by s, the weight's columns multiplied by s) and
smoothquant/fake_quant.py: quantize_weight_per_channel_absmax (symmetric absmax scales, round to nearest).
We found no released code of the study; bi-smoothing appears in its v2, of which only the abstract was
reachable ("balances quantization errors between weights and activations while maintaining per-channel
quantization"), which we implement as a per-layer α search (ours).

Algorithm: one pass over ``calib_size`` calibration samples (train images of a classifier; windows of the
calibration works of a causal LM) records, for every conv/linear layer, the per-channel maximum of its input, a
random sample of input rows (one row = one token / pixel across the input channels) and the inputs of the first
``error_images`` samples. Per layer: (1) smoothing of linear layers (none /
``smoothquant`` with one α / ``bi``: the α of ``alphas`` with the least output error of the quantized product
on the sampled rows, scored with the quantizer that will be applied: weights at ``weight_bits`` and
``granularity``, inputs at ``input_bits`` with this run's ``calibration`` of X/s, or per token), s from the
calibration set's per-channel maximum as above (the float product is unchanged); (2) the input's per-tensor scale
from ``calibration`` (minmax: exact over the whole calibration set; percentile / mse on the sampled rows), or with
``activations: dynamic`` one scale per token computed at every call (SmoothQuant's
``quantize_activation_per_token_absmax``, smoothquant/fake_quant.py: |x| max over the channels, clamped at 1e-5,
/ 127; with no smoothing and minmax, nothing reads the calibration set's statistics, so only the batches that hold
the first ``error_images`` samples run, and the per-tensor scale kept in the layer is theirs and unused); (3) the
layer's output error ‖y_q − y‖² / ‖y‖² on the first samples' inputs with weights at ``granularity``; (4) the weight's
outlier statistics (:func:`weight_outlier_stats`: max|w|; the largest, over output channels, of
max|w_row| / std(w_row); excess kurtosis). The ``mixed_fraction`` of layers ranked worst by
``mixed_select`` take per-group weights (``group_size``) instead — ``weight_outliers``: the largest outlier ratio,
a weight statistic as the study chose its layers; ``error``: the largest measured output error — and
``weight_outliers.png`` plots the ratio across the network with the chosen layers marked. Then every layer's weight
is rounded to its grid and its input is rounded at every call (fake quantization: the arithmetic of an int8 kernel
with symmetric scales, run in float). A layer whose weight is another module's too (a causal LM's head tied to the
token embedding) is kept in float (``kept_float_tied``): rounding it would round the embedding. Masks, compacted
shapes and factorized layers stay as they are: each of their conv/linear layers is quantized like any other (a
pruned weight stays exactly zero).

Config keys (conf/quant/*.yaml; schema base_quant_ptq):
* ``weight_bits`` (8), ``input_bits`` (8): integer widths, 2..8.
* ``granularity`` (channel): channel | group | tensor — the weights' scales.
* ``group_size`` (128): columns of the matrix view (input channel fastest) per group.
* ``calibration`` (minmax): minmax | percentile | mse — the input scale; ``percentile`` (99.99).
* ``activations`` (static): static (one per-tensor scale, calibrated) | dynamic (one scale per token, at run time).
* ``calib_size`` (null: 512 images / 128 windows), ``calib_batch_size`` (null: 128 images / 4 windows):
  calibration samples (seeded, no augmentation); null keys take the task's default (:data:`TASK_DEFAULTS`).
* ``smoothing`` (none): none | smoothquant | bi; ``alpha`` (0.5, smoothquant); ``alphas`` (0, 0.1, ..., 1; bi).
* ``mixed_fraction`` (0.0): fraction of the quantized layers moved to per-group weights (the study: fewer than 3%),
  ranked by ``mixed_select`` (error | weight_outliers; error); rounded down to whole layers (a fraction that
  selects no layer warns and says so in the summary, ``mixed_fraction_selects_none``).
* ``exclude`` (null: none for a classifier, the output head ``classifier`` for a causal LM, as SmoothQuant's and
  GPTQ's LLaMA scripts leave lm_head in float): layers kept in float (globs or the aliases first_conv / classifier).
* ``max_rows`` (null: 4096 / 512), ``error_images`` (null: 8 images / 1 window): sampled input rows per layer;
  samples whose layer inputs measure the error. A causal LM keeps its rows in one buffer per layer, an equal
  share from every batch.

Deviations (all ours): bi-smoothing as a grid search of α on the quantized product's output error (the study's
method section was unreachable); smoothing applies to linear layers only, one vector per layer, applied by
dividing the layer's input (SmoothQuant folds s into the preceding LayerNorm and shares one s, built from the
largest weight maximum, across the layers that read it); inputs take one static per-tensor scale calibrated
once (SmoothQuant's released fake quantizer also offers dynamic per-token / per-tensor scales); the maxima are
clamped at 1e-8 before the power (SmoothQuant: the weight's at 1e-5; only channels below 1e-5 differ); the
study's abstract names the weight distribution of a few layers as the cause but its statistic was unreachable:
the outlier ratio above is ours, and ``mixed_select: error`` (measured output error) is our alternative; a layer
moved to per-group weights keeps the α its per-channel search chose; the quantized
model runs in float with values on the integer grids (the int8 kernels that would execute it are priced by the
simulator).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from compress_run.core.config import check
from compress_run.core.masks import tied_layers
from compress_run.core.quantization import (
    CALIBRATIONS,
    GRANULARITIES,
    MAX_BITS,
    MIN_BITS,
    activation_scale,
    attach_quantization,
    best_alpha,
    fake_quantize,
    fake_quantize_per_token,
    fake_quantize_weight,
    qmax,
    smoothing_scales,
    weight_outlier_stats,
    worst_layers,
)
from compress_run.methods.base import LayerQuantizer, MethodConfig, NotApplicable, quant_config
from compress_run.methods.calibration import calibration_batches

SMOOTHINGS = ("none", "smoothquant", "bi")
ACTIVATIONS = ("static", "dynamic")
MIXED_SELECTS = ("error", "weight_outliers")
# the defaults of the keys left null, per task: an image is one calibration sample of a classifier, a window of
# seq_len tokens one of a causal LM (GPTQ and SmoothQuant calibrate LLMs on 128-512 windows; a 49k-vocabulary
# forward of 128 windows at once would need ~13 GB of logits, hence the small batches; rows are kept per layer, so
# fewer of them for a model of 200 layers)
TASK_DEFAULTS = {"classification": {"calib_size": 512, "calib_batch_size": 128, "max_rows": 4096, "error_images": 8},
                 "causal_lm": {"calib_size": 128, "calib_batch_size": 4, "max_rows": 512, "error_images": 1}}


@dataclass
class LayerQuantConfig(MethodConfig):
    """The keys every layer quantizer calibrated on samples has (PTQ's, GPTQ's): widths, weight grid, input grid,
    calibration sample, mixed granularity, excluded layers."""
    weight_bits: int = 8
    input_bits: int = 8
    granularity: str = "channel"
    group_size: int = 128
    calibration: str = "minmax"
    percentile: float = 99.99
    activations: str = "static"
    calib_size: int | None = None
    calib_batch_size: int | None = None
    mixed_fraction: float = 0.0
    exclude: list[str] | None = None  # null: nothing for a classifier; a causal LM's output head (the alias classifier)
    max_rows: int | None = None
    error_images: int | None = None

    def __post_init__(self) -> None:
        for key in ("weight_bits", "input_bits"):
            value = getattr(self, key)
            check(MIN_BITS <= value <= MAX_BITS, f"quant.{key}", value, f"an integer in {MIN_BITS}..{MAX_BITS}")
        check(self.granularity in GRANULARITIES, "quant.granularity", self.granularity, " | ".join(GRANULARITIES))
        check(self.group_size >= 1, "quant.group_size", self.group_size, "an integer >= 1")
        check(self.calibration in CALIBRATIONS, "quant.calibration", self.calibration, " | ".join(CALIBRATIONS))
        check(0.0 < self.percentile <= 100.0, "quant.percentile", self.percentile, "a float in (0, 100]")
        check(self.activations in ACTIVATIONS, "quant.activations", self.activations, " | ".join(ACTIVATIONS))
        for key in ("calib_size", "calib_batch_size", "error_images"):
            value = getattr(self, key)
            check(value is None or value >= 1, f"quant.{key}", value, "an integer >= 1, or null (the task's default)")
        check(0.0 <= self.mixed_fraction <= 1.0, "quant.mixed_fraction", self.mixed_fraction, "a float in [0, 1]")
        check(self.max_rows is None or self.max_rows >= 16, "quant.max_rows", self.max_rows,
              "an integer >= 16, or null (the task's default)")


@quant_config("ptq")
@dataclass
class PTQConfig(LayerQuantConfig):
    smoothing: str = "none"
    alpha: float = 0.5
    alphas: list[float] = field(default_factory=lambda: [round(0.1 * k, 1) for k in range(11)])
    mixed_select: str = "error"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.mixed_select in MIXED_SELECTS, "quant.mixed_select", self.mixed_select, " | ".join(MIXED_SELECTS))
        check(self.smoothing in SMOOTHINGS, "quant.smoothing", self.smoothing, " | ".join(SMOOTHINGS))
        check(0.0 <= self.alpha <= 1.0, "quant.alpha", self.alpha, "a float in [0, 1]")
        check(len(self.alphas) >= 1 and all(0.0 <= a <= 1.0 for a in self.alphas), "quant.alphas", self.alphas,
              "a non-empty list of floats in [0, 1]")


def input_rows(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A layer input as rows over its input channels: [tokens, in] for linear, [pixels, C_in] for conv."""
    if isinstance(module, nn.Conv2d):
        return x.transpose(0, 1).reshape(x.shape[1], -1).T
    return x.reshape(-1, x.shape[-1])


class LayerInputs:
    """What one calibration pass records about a layer's input."""

    def __init__(self, max_rows: int, error_images: int, generator: torch.Generator,
                 rows_per_sample: float | None = None) -> None:
        self.absmax: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []
        self.first: list[torch.Tensor] = []
        self.seen_images = 0
        self.max_rows, self.error_images, self.generator = max_rows, error_images, generator
        # rows kept per calibration sample of a batch (None: up to max_rows per batch); a causal LM's many small
        # batches of long windows keep their share of max_rows each, so memory stays at max_rows rows per layer
        self.rows_per_sample = rows_per_sample

    def add(self, x: torch.Tensor, module: nn.Module) -> None:
        x = x.detach().float()
        rows = input_rows(x, module)
        low, high = torch.aminmax(rows, dim=0)  # no |rows| temporary: a causal LM's are large and many
        peak = torch.maximum(high, -low)
        self.absmax = peak if self.absmax is None else torch.maximum(self.absmax, peak)
        order = torch.randperm(len(rows), generator=self.generator)
        if self.rows_per_sample is None:
            self.rows.append(rows[order[: min(len(rows), self.max_rows)]].cpu())
        else:  # one buffer per layer, filled in place: many small kept slices between large temporaries fragment
            # the heap (a 135 M-parameter LM's calibration grew by 0.4 GB per batch that way)
            if not self.rows:
                self.rows.append(torch.empty(self.max_rows, rows.shape[1]))
                self.filled = 0
            take = min(len(rows), math.ceil(self.rows_per_sample * len(x)), self.max_rows - self.filled)
            self.rows[0][self.filled: self.filled + take] = rows[order[:take]]
            self.filled += take
        if self.seen_images < self.error_images:
            self.first.append(x[: self.error_images - self.seen_images].clone())
            self.seen_images += len(self.first[-1])

    def sample(self) -> torch.Tensor:
        rows = torch.cat(self.rows) if self.rows_per_sample is None else self.rows[0][: self.filled]
        keep = torch.randperm(len(rows), generator=self.generator)[: self.max_rows]
        return rows[keep]


def batches_holding(batches: list[torch.Tensor], samples: int) -> list[torch.Tensor]:
    """The leading batches that hold the first ``samples`` samples (at least one batch)."""
    kept, seen = [], 0
    for batch in batches:
        if kept and seen >= samples:
            break
        kept.append(batch)
        seen += len(batch)
    return kept


def record_inputs(model: nn.Module, layers: dict[str, nn.Module], batches: list[torch.Tensor], max_rows: int,
                  error_images: int, seed: int, rows_per_sample: float | None = None) -> dict[str, LayerInputs]:
    generator = torch.Generator().manual_seed(seed)
    records = {n: LayerInputs(max_rows, error_images, generator, rows_per_sample) for n in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: records[n].add(args[0], mod))
             for n, m in layers.items()]
    try:
        with torch.no_grad(), Progress(transient=True) as progress:
            task = progress.add_task("PTQ calibration", total=len(batches))
            for x in batches:
                model(x)
                progress.advance(task)
    finally:
        for h in hooks:
            h.remove()
    return records


def output_error(module: nn.Module, inputs: torch.Tensor, smooth: torch.Tensor | None, input_scale: torch.Tensor,
                 weight_bits: int, input_bits: int, granularity: str, group_size: int, dynamic: bool = False) -> float:
    """‖y_q − y‖² / ‖y‖² of ``module`` on ``inputs`` quantized as given (``module`` itself is not changed)."""
    weight = module.weight.detach()
    shape = (1, -1, *([1] * (weight.dim() - 2)))
    x = inputs if smooth is None else inputs / (smooth.view(shape) if isinstance(module, nn.Conv2d) else smooth)
    w = weight if smooth is None else weight * smooth.view(shape)
    if dynamic:
        xq = fake_quantize_per_token(x, input_bits, 1 if isinstance(module, nn.Conv2d) else -1)
    else:
        xq = fake_quantize(x, input_scale, input_bits)
    wq = fake_quantize_weight(w, weight_bits, granularity, group_size)
    if isinstance(module, nn.Conv2d):
        def run(a, b):
            return F.conv2d(a, b, module.bias, module.stride, module.padding, module.dilation, module.groups)
    else:
        def run(a, b):
            return F.linear(a, b, module.bias)
    with torch.no_grad():
        reference, quantized = run(inputs, weight), run(xq, wq)
    return float((quantized - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))


class PTQ(LayerQuantizer):
    Config = PTQConfig
    tasks = ("classification", "causal_lm")

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        self.report: dict[str, Any] = {}
        self.seed = torch.initial_seed()

    def setting(self, key: str) -> int:
        """A key left null takes the task's default (:data:`TASK_DEFAULTS`)."""
        value = getattr(self, key)
        return int(TASK_DEFAULTS[self.task][key] if value is None else value)

    def check_data(self, train_size: int) -> None:
        size = self.setting("calib_size")
        if size > train_size:
            split = "calibration split" if self.task == "causal_lm" else "train split"
            unit = "windows" if self.task == "causal_lm" else "images"
            raise NotApplicable(f"quant.calib_size={size} is larger than the {split} ({train_size} {unit}); "
                                f"set quant.calib_size <= {train_size}")

    def quantize(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        model.eval()
        layers = self.layers(model)
        device = next(model.parameters()).device
        calib_size, max_rows = self.setting("calib_size"), self.setting("max_rows")
        dynamic = self.activations == "dynamic"
        batches = calibration_batches(datamodule, "train", calib_size, self.setting("calib_batch_size"),
                                      tuple(self.input_shape), self.seed + 104729, device)
        statistics_read = not dynamic or self.smoothing != "none" or self.calibration != "minmax"
        if not statistics_read:  # only the output-error report reads the inputs: its first samples are enough
            batches = batches_holding(batches, self.setting("error_images"))
        records = record_inputs(model, layers, batches, max_rows, self.setting("error_images"), self.seed,
                                rows_per_sample=max_rows / calib_size if self.task == "causal_lm" else None)
        plans: dict[str, dict[str, Any]] = {}
        with Progress(transient=True) as progress:
            task = progress.add_task("PTQ layers", total=len(layers))
            for name, module in layers.items():
                plans[name] = self.plan(name, module, records[name], device, dynamic)
                progress.advance(task)
        outliers = {n: p["weight"]["outlier_ratio"] for n, p in plans.items()}
        ranked = outliers if self.mixed_select == "weight_outliers" else {n: p["error"] for n, p in plans.items()}
        finer = worst_layers(ranked, self.mixed_fraction)
        if self.mixed_fraction > 0 and not finer:
            warnings.warn(f"quant.mixed_fraction={self.mixed_fraction} of {len(plans)} layers rounds down to no layer: "
                          f"every layer keeps granularity={self.granularity}; quant.mixed_fraction >= "
                          f"{1 / len(plans):.3f} moves the worst layer to per-group weights", stacklevel=1)
        for name in finer:
            p = plans[name]
            p["error_before"] = p["error"]
            p["error"] = output_error(layers[name], p["inputs"], p["smooth"], p["scale"], self.weight_bits,
                                      self.input_bits, "group", self.group_size, dynamic)
        for name, p in plans.items():
            attach_quantization(layers[name], self.weight_bits, self.input_bits, p["scale"],
                                "group" if name in finer else self.granularity, self.group_size, p["smooth"],
                                dynamic=dynamic)
        self.report = {
            "layers": len(plans), "per_group_layers": finer, "mixed_select": self.mixed_select,
            "mixed_fraction_selects_none": self.mixed_fraction > 0 and not finer,
            "layer_error": {n: p["error"] for n, p in plans.items()},
            "per_group_error_before": {n: plans[n]["error_before"] for n in finer},
            "alpha": {n: p["alpha"] for n, p in plans.items() if p["alpha"] is not None},
            "weight_outliers": {n: p["weight"] for n, p in plans.items()},
            "kept_float_tied": tied_layers(model),
            "calib_images": sum(len(b) for b in batches),
            "calibration_statistics": "recorded" if statistics_read else
            "not needed (per-token inputs, no smoothing): only the error report's first samples ran",
            "resolved": {k: self.setting(k) for k in TASK_DEFAULTS[self.task]},
        }
        return model

    def plan(self, name: str, module: nn.Module, rec: LayerInputs, device: torch.device,
             dynamic: bool) -> dict[str, Any]:
        """One layer's smoothing, input scale, output error and weight statistics."""
        smoothed = self.smoothing != "none" and isinstance(module, nn.Linear)
        rows = rec.sample() if (smoothed and self.smoothing == "bi") or self.calibration != "minmax" else None
        smooth, alpha = None, None
        if smoothed:
            weight = module.weight.detach().float().cpu()
            absmax = rec.absmax.cpu()
            if self.smoothing == "bi":
                alpha, _ = best_alpha(rows, weight, self.alphas, weight_bits=self.weight_bits,
                                      input_bits=self.input_bits, granularity=self.granularity,
                                      group_size=self.group_size, absmax=absmax,
                                      input_scale=lambda s, rec=rec, rows=rows: self.input_scale(rec, rows, s),
                                      dynamic=dynamic)
            else:
                alpha = self.alpha
            smooth = smoothing_scales(absmax, weight, alpha).to(device)
        scale = self.input_scale(rec, rows, smooth)
        inputs = torch.cat(rec.first)
        error = output_error(module, inputs, smooth, scale, self.weight_bits, self.input_bits,
                             self.granularity, self.group_size, dynamic)
        return {"smooth": smooth, "alpha": alpha, "scale": scale, "error": error, "inputs": inputs,
                "weight": weight_outlier_stats(module.weight)}

    def artifacts(self) -> dict[str, bytes]:
        """weight_outliers.png: each layer's outlier ratio across the network, the per-group layers marked."""
        stats = self.report.get("weight_outliers")
        return {"weight_outliers.png": outlier_plot(stats, self.report["per_group_layers"], self.mixed_select)} \
            if stats else {}

    def input_scale(self, rec: LayerInputs, rows: torch.Tensor | None, smooth: torch.Tensor | None) -> torch.Tensor:
        """The input's per-tensor scale once divided by ``smooth``: minmax exact over the calibration set,
        percentile / mse on the sampled ``rows`` (computed where ``smooth`` lives)."""
        device = rec.absmax.device if smooth is None else smooth.device
        if self.calibration == "minmax":
            peak = rec.absmax.to(device)
            peak = (peak if smooth is None else peak / smooth).max()
            return torch.clamp(peak / qmax(self.input_bits), min=1e-12)
        assert rows is not None
        rows = rows.to(device)
        return activation_scale(rows if smooth is None else rows / smooth, self.input_bits, self.calibration,
                                self.percentile)

    def summary(self) -> dict[str, Any]:
        return {"kind": "ptq", "weight_bits": self.weight_bits, "input_bits": self.input_bits,
                "granularity": self.granularity, "group_size": self.group_size, "calibration": self.calibration,
                "activations": self.activations, "smoothing": self.smoothing, "mixed_fraction": self.mixed_fraction,
                **self.report}


def outlier_plot(stats: dict[str, dict[str, float]], selected: list[str], how: str) -> bytes:
    """A PNG of each quantized layer's outlier ratio (max|w|/std of its worst row) in network order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats)
    values = [stats[n]["outlier_ratio"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, len(names) * 0.06), 3.2))
    ax.plot(range(len(names)), values, lw=0.8, color="tab:blue", marker=".", ms=3)
    for k, name in enumerate(names):
        if name in selected:
            ax.plot(k, values[k], "o", color="tab:red", ms=6)
            ax.annotate(name, (k, values[k]), fontsize=6, rotation=30, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("quantized layer (network order)")
    ax.set_ylabel("max over rows of max|w| / std")
    ax.set_title(f"weight outliers per layer; red: per-group layers (chosen by {how})", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
