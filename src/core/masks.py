"""The mask mechanism shared by every method.

A mask is a boolean buffer ``<param>_mask`` registered on the module that owns the parameter, so it is
part of ``state_dict`` and every checkpoint carries it. The parameter itself stays a plain tensor:
masked entries are held at exactly zero by re-applying the mask after every optimizer step, and their
gradients are zeroed before the step (``mask_grads``) so optimizer state of pruned weights stays zero.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from compress_run.core.allocation import allocate
from compress_run.core.projections import project

MASK_SUFFIX = "_mask"
PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
ALIASES = ("first_conv", "classifier")


# ------------------------------------------------------------------------------------ buffers
def attach_mask(module: nn.Module, mask: torch.Tensor, param: str = "weight") -> None:
    weight = getattr(module, param)
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != {param} shape {tuple(weight.shape)}")
    mask = mask.to(device=weight.device, dtype=torch.bool)
    name = param + MASK_SUFFIX
    if name in module._buffers:
        module._buffers[name].copy_(mask)
    else:
        module.register_buffer(name, mask.clone())  # never alias the caller's tensor (or an expanded view)
    with torch.no_grad():
        weight.mul_(mask)


def get_mask(module: nn.Module, param: str = "weight") -> torch.Tensor | None:
    return module._buffers.get(param + MASK_SUFFIX)


def remove_masks(model: nn.Module) -> None:
    for module in model.modules():
        for name in [b for b in module._buffers if b.endswith(MASK_SUFFIX)]:
            del module._buffers[name]


def masked_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
    """(qualified parameter name, parameter, mask) for every masked parameter."""
    for module_name, module in model.named_modules():
        for buffer_name, mask in module._buffers.items():
            if buffer_name.endswith(MASK_SUFFIX) and mask is not None:
                param = buffer_name[: -len(MASK_SUFFIX)]
                qual = f"{module_name}.{param}" if module_name else param
                yield qual, getattr(module, param), mask


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    for _, param, mask in masked_parameters(model):
        param.mul_(mask)


@torch.no_grad()
def mask_gradients(model: nn.Module) -> None:
    for _, param, mask in masked_parameters(model):
        if param.grad is not None:
            param.grad.mul_(mask)


def attach_masks_from_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                                 prefix: str = "") -> int:
    """Register mask buffers for the ``*_mask`` entries of a state dict (before ``load_state_dict``)."""
    modules = dict(model.named_modules())
    count = 0
    for key, value in state_dict.items():
        if not key.startswith(prefix) or not key.endswith(MASK_SUFFIX):
            continue
        module_name, _, buffer_name = key[len(prefix):].rpartition(".")
        module = modules.get(module_name)
        param = buffer_name[: -len(MASK_SUFFIX)]
        if module is not None and isinstance(getattr(module, param, None), nn.Parameter):
            if value.shape != getattr(module, param).shape:
                continue  # leave it to load_state_dict to report the shape mismatch
            attach_mask(module, value, param)
            count += 1
    return count


# ----------------------------------------------------------------------------- layer selection
def prunable_layers(model: nn.Module, exclude: list[str] | tuple[str, ...] = ALIASES) -> dict[str, nn.Module]:
    """Conv/linear layers to prune, in registration order, minus ``exclude``.

    ``exclude`` holds fnmatch globs over module names plus two aliases: ``first_conv`` (the first
    conv layer registered, i.e. the stem; nothing in a model without conv layers, such as a language model) and
    ``classifier`` (the last linear layer registered). An exclude entry that matches nothing is an error (a typo
    would silently prune too much). A layer whose weight is another module's too (a language model's output
    head tied to its token embedding: :func:`tied_layers`) is never returned: changing it would change that
    module as well.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    convs = [n for n, m in layers.items() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)]
    linears = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
    excluded: set[str] = set(tied_layers(model))
    for pattern in exclude:
        if pattern == "first_conv":
            hits = convs[:1]
            if not convs:
                continue
        elif pattern == "classifier":
            hits = linears[-1:]
        else:
            hits = [n for n in layers if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise LayerSelectionError(f"exclude pattern {pattern!r} matches no conv/linear layer", layers)
        excluded.update(hits)
    return {n: m for n, m in layers.items() if n not in excluded}


def tied_layers(model: nn.Module) -> list[str]:
    """Conv/linear layers whose weight is also a parameter of another module (tied weights)."""
    holders: dict[int, set[int]] = {}
    for module in model.modules():  # each module object once, under whatever names it is registered
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(id(module))
    return [n for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)
            and len(holders.get(id(m.weight), ())) > 1]


class LayerSelectionError(ValueError):
    def __init__(self, message: str, layers: Mapping[str, nn.Module]) -> None:
        names = list(layers)
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        super().__init__(f"{message}; the model's conv/linear layers are: {shown or 'none'}")


# ------------------------------------------------------------------------------------ pruning
@torch.no_grad()
def prune_by_score(layers: Mapping[str, nn.Module], scores: Mapping[str, torch.Tensor], sparsity: float,
                   distribution: str = "uniform", pattern: str = "irregular",
                   densities: Mapping[str, float] | None = None) -> dict[str, float]:
    """Mask every layer to the density that ``distribution`` allocates (or the given ``densities``),
    with ``pattern``'s projection. Returns the achieved sparsity per layer (counted from the masks)."""
    densities = densities if densities is not None else allocate(dict(scores), sparsity, distribution)
    achieved = {}
    for name, module in layers.items():
        mask = project(pattern, scores[name], densities[name])
        attach_mask(module, mask)
        achieved[name] = 1.0 - mask.sum().item() / mask.numel()
    return achieved


def magnitude_scores(layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """|w| with already-masked entries scored 0 (so they stay pruned when density only shrinks)."""
    scores = {}
    for name, module in layers.items():
        score = module.weight.detach().abs()
        mask = get_mask(module)
        scores[name] = score * mask if mask is not None else score
    return scores


# -------------------------------------------------------------------------------------- stats
@dataclass
class SparsityReport:
    per_layer: dict[str, float]      # qualified parameter name -> fraction of zeros
    prunable_sparsity: float         # zeros / numel over the masked parameters
    params_dense: int                # every parameter of the model
    params_nonzero: int              # every parameter minus masked-out entries
    model_sparsity: float            # 1 - params_nonzero / params_dense


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    per_layer, zeros, masked_numel, masked_out = {}, 0, 0, 0
    for name, param, mask in masked_parameters(model):
        layer_zeros = int((param == 0).sum().item())
        per_layer[name] = layer_zeros / param.numel()
        zeros += layer_zeros
        masked_numel += param.numel()
        masked_out += int((~mask).sum().item())
    dense = sum(p.numel() for p in model.parameters())
    return SparsityReport(per_layer=per_layer,
                          prunable_sparsity=zeros / masked_numel if masked_numel else 0.0,
                          params_dense=dense, params_nonzero=dense - masked_out,
                          model_sparsity=masked_out / dense if dense else 0.0)


# ---------------------------------------------------------------------------------- callback
class MaskEnforcer(L.Callback):
    """Zero the gradients of masked weights before each optimizer step (``mask_grads``) and re-apply
    the masks after it, for every masked parameter of ``pl_module.net``."""

    def __init__(self, mask_grads: bool = True) -> None:
        self.mask_grads = mask_grads

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.mask_grads:
            mask_gradients(pl_module.net)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        apply_masks(pl_module.net)

    def on_train_start(self, trainer, pl_module) -> None:
        apply_masks(pl_module.net)
