"""Channel masks: the structured-mask representation that channel methods (CHEX, L1 filter pruning) share,
and which channel groups such a method may prune.

Masking channel c of a :class:`~compress_run.core.channel_graph.ChannelGroup` masks row c of every
producer's weight (and bias), gamma and beta of the BatchNorm that follows it, and the same for every
depthwise passthrough, so the channel is exactly zero everywhere in the group; a heads group masks
the q, k and v rows of the head. The masks are ordinary ``*_mask`` buffers (re-applied after every
optimizer step by :class:`~compress_run.core.masks.MaskEnforcer`) and
:func:`~compress_run.core.compaction.compact` later removes what they zeroed.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from compress_run.core.channel_graph import ChannelGroup
from compress_run.core.masks import attach_mask, get_mask


def unit_rows(group: ChannelGroup, keep: torch.Tensor) -> torch.Tensor:
    """Boolean per output row of a producer for a boolean per channel (heads: q, k and v rows)."""
    if group.kind != "heads":
        return keep
    return keep.repeat_interleave(group.unit).repeat(3)


def group_layers(group: ChannelGroup, modules: dict[str, nn.Module]) -> list[tuple[nn.Module, nn.Module | None]]:
    """(layer, its BatchNorm) for every producer and passthrough of the group."""
    return [(modules[name], modules[norm] if norm else None) for name, norm in group.producers + group.passthrough]


def set_channel_mask(group: ChannelGroup, modules: dict[str, nn.Module], keep: torch.Tensor) -> None:
    """Mask the group's channels where ``keep`` is False (and unmask those where it is True)."""
    keep = keep.bool().cpu()
    for layer, norm in group_layers(group, modules):
        rows = unit_rows(group, keep).to(layer.weight.device)
        attach_mask(layer, rows.view(-1, *[1] * (layer.weight.dim() - 1)).expand_as(layer.weight))
        if layer.bias is not None:
            attach_mask(layer, rows, "bias")
        if norm is not None and norm.affine:
            attach_mask(norm, keep.to(norm.weight.device))
            attach_mask(norm, keep.to(norm.weight.device), "bias")


def channel_mask(group: ChannelGroup, modules: dict[str, nn.Module]) -> torch.Tensor:
    """The group's current channel mask (True = kept): all True where no mask is attached."""
    layer = modules[group.producers[0][0]]
    mask = get_mask(layer)
    if mask is None:
        return torch.ones(group.size, dtype=torch.bool)
    rows = mask.reshape(mask.shape[0], -1).any(1).cpu()
    return rows[: group.size * group.unit].reshape(group.size, group.unit).any(1) if group.kind == "heads" else rows


def prunable_groups(model: nn.Module, exclude: list[str], prune_residual: bool = True,
                    need_norm: bool = False) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Groups a channel method may prune, and the reason each other group is left whole."""
    from compress_run.core.channel_graph import channel_groups

    chosen, skipped = [], {}
    for group in channel_groups(model):
        names = [n for n, _ in group.producers]
        reason = group.frozen
        if reason is None and any(fnmatch.fnmatch(n, pattern) for n in names for pattern in exclude):
            reason = "excluded by method.exclude"
        if reason is None and group.scatters:
            reason = "receives an option-A (zero-padding) shortcut: its channels also carry the shortcut"
        if reason is None and group.residual and not prune_residual:
            reason = "tied by a residual add (method.prune_residual=false)"
        if reason is None and group.kind != "channels":
            reason = "attention heads (not a conv channel group)"
        if reason is None and need_norm and any(norm is None for _, norm in group.producers):
            reason = "a producer has no BatchNorm (no gamma to rank channels by)"
        if reason:
            skipped[group.name] = reason
        else:
            chosen.append(group)
    return chosen, skipped
