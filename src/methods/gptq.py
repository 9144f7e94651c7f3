"""GPTQ weight quantization (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023), with the activations of :mod:`compress_run.methods.ptq`.

Reference code: IST-DASLab/gptq (commit 2d65066) — gptq.py: ``GPTQ.add_batch`` (H as the running mean of
2·XXᵀ over the calibration sequences), ``GPTQ.fasterquant`` (dead columns, damping, Cholesky of H⁻¹, the blocked
column loop with error propagation, groups); llama.py: ``llama_sequential`` (the decoder blocks quantized in order,
each block's calibration inputs produced by the blocks already quantized; every linear layer of a block gets its H
from one pass, embeddings and the output head stay in float).

Algorithm: the calibration windows are run up to the first decoder block and its inputs kept (the authors'
``Catcher``). Block by block: one pass of the kept inputs through the block accumulates, for each of its linear
layers, H = 2/n Σ XXᵀ (n = calibration sequences) and the statistics of its input that the activation quantizer
needs (as in PTQ: per-channel maxima, a row sample); each layer's weight W [out, in] is then quantized column by
column: with H ← H + λ·mean(diag H)·I (λ = ``percdamp``) and U the upper Cholesky factor of H⁻¹, for columns in
blocks of ``blocksize``, q_i = Q(w_i), the error e_i = (w_i − q_i) / U_ii is propagated to the block's later columns
(w_j −= e_i U_ij) and, after the block, to the columns beyond it (W −= E·U[block, rest]). Scales: one per output
channel from the weight before the loop, or with per-group weights one per ``group_size`` columns, computed when
the loop reaches the group's first column from the weight as updated so far (the authors' order). The quantized
block (weights and input rounding attached) then produces the next block's inputs.

Config keys (conf/quant/gptq_*.yaml; schema base_quant_gptq): PTQ's ``weight_bits`` (4), ``input_bits`` (8),
``granularity`` (channel | group), ``group_size`` (128), ``calibration`` (minmax), ``percentile`` (99.99),
``activations`` (static), ``calib_size``, ``calib_batch_size``, ``max_rows``, ``error_images`` (null: the task's
defaults), ``mixed_fraction`` (0.0: the layers with the largest weight outlier ratio take per-group weights),
``exclude`` (null: the output head), as in :mod:`compress_run.methods.ptq` (no smoothing keys), plus
* ``blocksize`` (128): columns per lazy-update block (the authors' default).
* ``percdamp`` (0.01): damping, as a fraction of the mean diagonal of H (the authors' default).
* ``act_order`` (false): quantize columns in order of decreasing diag(H) (the authors' ``--act-order``); per
  channel only (the authors' groups in that order need ``--static-groups``, not built here).

Deviations (ours): the weight grid is symmetric absmax, scale = max|w| / (2^(b−1) − 1) with codes in
[−2^(b−1), 2^(b−1) − 1] (PTQ's and the integer kernels' grid; the authors' scripts default to an asymmetric grid
and their ``--sym`` grid uses scale 2·max|w| / (2^b − 1) with zero point 2^(b−1)); the activations are quantized as
well (the authors' GPTQ is weight-only), so each block's inputs come from blocks whose inputs are rounded too;
smoothing is refused (it would change H); mixed granularity picks its layers by weight outliers only (the error
ranking needs every layer quantized before any is); a pruned layer keeps its mask: a masked weight is quantized to 0
and its whole value propagates as error (SparseGPT's treatment of a fixed mask; the authors' GPTQ has no masks).
Only decoder models with a list of blocks are supported (a classifier is refused with the reason).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from rich.progress import Progress
from torch import nn

from compress_run.core.config import check
from compress_run.core.errors import UserError
from compress_run.core.masks import get_mask, tied_layers
from compress_run.core.quantization import attach_quantization, qmax, weight_outlier_stats, worst_layers
from compress_run.methods.base import NotApplicable, quant_config
from compress_run.methods.calibration import calibration_batches
from compress_run.methods.ptq import PTQ, LayerInputs, LayerQuantConfig


@quant_config("gptq")
@dataclass
class GPTQConfig(LayerQuantConfig):
    weight_bits: int = 4
    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.granularity in ("channel", "group"), "quant.granularity", self.granularity, "channel or group")
        check(not (self.act_order and (self.granularity == "group" or self.mixed_fraction > 0)), "quant.act_order",
              self.act_order, "false with per-group weights (quant.granularity=group or quant.mixed_fraction > 0): "
              "groups in that order are not built")
        check(self.blocksize >= 1, "quant.blocksize", self.blocksize, "an integer >= 1")
        check(0.0 <= self.percdamp < 1.0, "quant.percdamp", self.percdamp, "a float in [0, 1)")


def symmetric_scale(columns: torch.Tensor, bits: int) -> torch.Tensor:
    """One scale per row of ``columns`` [rows, k]: max|w| / (2^(b-1) - 1) (an all-zero row keeps 1)."""
    peak = columns.abs().amax(dim=1, keepdim=True)
    return torch.where(peak > 0, peak / qmax(bits), torch.ones_like(peak))


def round_to(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    top = qmax(bits)
    return torch.clamp(torch.round(w / scale), -top - 1, top) * scale


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
                  blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [rows, cols] on its GPTQ grid, and its scales [rows, groups] (IST-DASLab/gptq,
    ``GPTQ.fasterquant``: module docstring). With ``mask`` (a pruned layer's) a masked weight is quantized to 0 and
    its whole value is the error propagated to the columns after it, so the mask still holds (as SparseGPT does
    with a fixed mask); without it the propagation would fill the pruned positions."""
    W = weight.detach().clone().float()
    H = hessian.detach().clone().float().to(W.device)
    keep = None if mask is None else mask.to(W.device).bool()
    rows, cols = W.shape
    scale = symmetric_scale(W, bits)  # per channel, from the weight before the loop (find_params)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        keep = None if keep is None else keep[:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise UserError(f"GPTQ: the layer's input Hessian is not positive definite with quant.percdamp={percdamp} "
                        "(too few calibration tokens for its width, or no damping)",
                        "raise quant.percdamp (the authors' default is 0.01) or quant.calib_size") from exc
    Q = torch.zeros_like(W)
    group_scales: list[torch.Tensor] = []
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if group_size and (i1 + i) % group_size == 0:  # read from the outer W, as the authors do
                scale = symmetric_scale(W[:, i1 + i: i1 + i + group_size], bits)
                group_scales.append(scale)
            w, d = W1[:, i], Hinv1[i, i]
            q = round_to(w.unsqueeze(1), scale, bits).flatten()
            if keep is not None:
                q = q * keep[:, i1 + i]
            Q[:, i1 + i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    scales = torch.cat(group_scales, dim=1) if group_size else scale
    return Q.to(weight.dtype), scales


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest ``nn.ModuleList`` of the model (a decoder's blocks) and its name; None if it has none."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return max(lists, key=lambda nm: len(nm[1])) if lists else None


class _Caught(Exception):
    """Raised by the hook that keeps the first block's inputs (ends the forward there)."""


class GPTQ(PTQ):
    Config = GPTQConfig
    mixed_select = "weight_outliers"  # the error ranking needs every layer quantized first
    tasks = ("causal_lm",)
    task_note = "GPTQ is built here for decoder language models (blocks quantized in order); use quant=w8a8"

    def check_applicable(self, model: nn.Module) -> None:
        super().check_applicable(model)
        found = decoder_blocks(model)
        layers = self.layers(model)
        if found is None or not all(n.startswith(found[0] + ".") for n in layers):
            raise NotApplicable("GPTQ quantizes a decoder's blocks in order, and this model's quantized layers are "
                                "not all inside one list of blocks (add the others to quant.exclude)")

    @torch.no_grad()
    def quantize(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        model.eval()
        layers = self.layers(model)
        prefix, blocks = decoder_blocks(model)
        device = next(model.parameters()).device
        calib_size, max_rows = self.setting("calib_size"), self.setting("max_rows")
        batches = calibration_batches(datamodule, "train", calib_size, self.setting("calib_batch_size"),
                                      tuple(self.input_shape), self.seed + 104729, device)
        inputs = self.first_block_inputs(model, blocks[0], batches)
        stats = {n: weight_outlier_stats(m.weight) for n, m in layers.items()}
        finer = worst_layers({n: s["outlier_ratio"] for n, s in stats.items()}, self.mixed_fraction)
        dynamic = self.activations == "dynamic"
        generator = torch.Generator().manual_seed(self.seed)
        plans: dict[str, dict[str, Any]] = {}
        with Progress(transient=True) as progress:
            task = progress.add_task("GPTQ blocks", total=len(blocks))
            for k, block in enumerate(blocks):
                names = {n: m for n, m in layers.items() if n.startswith(f"{prefix}.{k}.")}
                hessians, records = self.block_statistics(block, names, inputs, generator, max_rows / calib_size)
                for name, module in names.items():
                    plans[name] = self.quantize_layer(module, hessians.pop(name), records[name], name in finer,
                                                      dynamic)
                inputs = [((self.block_output(block(*args, **kwargs)), *args[1:]), kwargs) for args, kwargs in inputs]
                progress.advance(task)
        self.report = {
            "layers": len(plans), "per_group_layers": finer, "mixed_select": "weight_outliers",
            "mixed_fraction_selects_none": self.mixed_fraction > 0 and not finer,
            "layer_error": {n: p["error"] for n, p in plans.items()},
            "gptq_loss": {n: p["gptq_loss"] for n, p in plans.items()},
            "weight_outliers": stats, "kept_float_tied": tied_layers(model),
            "calib_images": sum(len(b) for b in batches),
            "resolved": {k: self.setting(k) for k in ("calib_size", "calib_batch_size", "max_rows", "error_images")},
        }
        return model

    def block_statistics(self, block: nn.Module, names: dict[str, nn.Module], inputs: list[tuple[tuple, dict]],
                         generator: torch.Generator, rows_per_sample: float
                         ) -> tuple[dict[str, torch.Tensor], dict[str, LayerInputs]]:
        """One pass of ``inputs`` through ``block``: each linear layer's H (``GPTQ.add_batch``: the running mean of
        2·XXᵀ, n counting sequences) and the statistics of its input the activation quantizer needs."""
        hessians = {n: torch.zeros(m.weight.shape[1], m.weight.shape[1], device=m.weight.device)
                    for n, m in names.items()}
        records = {n: LayerInputs(self.setting("max_rows"), self.setting("error_images"), generator, rows_per_sample)
                   for n in names}
        seen = dict.fromkeys(names, 0)

        def add_batch(module: nn.Module, args: tuple, name: str) -> None:
            x = args[0].detach().float()
            records[name].add(x, module)
            count = x.shape[0] if x.dim() > 2 else 1
            hessians[name] *= seen[name] / (seen[name] + count)
            seen[name] += count
            rows = (2.0 / seen[name]) ** 0.5 * x.reshape(-1, x.shape[-1])
            hessians[name] += rows.T @ rows

        hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: add_batch(mod, args, n)) for n, m in names.items()]
        try:
            for args, kwargs in inputs:
                block(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        return hessians, records

    def summary(self) -> dict[str, Any]:
        return {"kind": "gptq", "weight_bits": self.weight_bits, "input_bits": self.input_bits,
                "granularity": self.granularity, "group_size": self.group_size, "calibration": self.calibration,
                "activations": self.activations, "mixed_fraction": self.mixed_fraction, "blocksize": self.blocksize,
                "percdamp": self.percdamp, "act_order": self.act_order, **self.report}

    @staticmethod
    def block_output(out: Any) -> torch.Tensor:
        return out[0] if isinstance(out, tuple) else out

    def first_block_inputs(self, model: nn.Module, first: nn.Module,
                           batches: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
        """The positional and keyword inputs of the first block for every calibration batch."""
        kept: list[tuple[tuple, dict]] = []

        def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kept.append((tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
            raise _Caught

        hook = first.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for x in batches:
                with contextlib.suppress(_Caught):
                    model(x)
        finally:
            hook.remove()
        return kept

    def quantize_layer(self, module: nn.Module, hessian: torch.Tensor, rec: LayerInputs, per_group: bool,
                       dynamic: bool) -> dict[str, Any]:
        granularity = "group" if per_group or self.granularity == "group" else "channel"
        rows = rec.sample() if self.calibration != "minmax" else None
        scale = self.input_scale(rec, rows, None)
        inputs = torch.cat(rec.first)
        original = module.weight.detach().clone()
        quantized, scales = gptq_quantize(original, hessian, self.weight_bits,
                                          self.group_size if granularity == "group" else None, self.blocksize,
                                          self.percdamp, self.act_order, mask=get_mask(module))
        module.weight.copy_(quantized)
        attach_quantization(module, self.weight_bits, self.input_bits, scale, granularity, self.group_size,
                            on_grid=scales, dynamic=dynamic)
        reference = nn.functional.linear(inputs, original, module.bias)
        output = module(inputs)  # the quantized layer, its input rounding included
        error = float((output - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))
        delta = original - quantized
        loss = float((delta @ hessian.to(delta) * delta).sum() / 2)  # the objective GPTQ lowers, tr(ΔHΔᵀ)/2
        return {"error": error, "gptq_loss": loss, "granularity": granularity}
