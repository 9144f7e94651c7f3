"""Channel masks: the structured-mask representation that channel methods (CHEX, L1 filter pruning) share.

Masking channel c of a :class:`~compress_run.kernels.channel_graph.ChannelGroup` masks row c of every
producer's weight (and bias), gamma and beta of the BatchNorm that follows it, and the same for every
depthwise passthrough, so the channel is exactly zero everywhere in the group; a heads group masks
the q, k and v rows of the head. The masks are ordinary ``*_mask`` buffers (re-applied after every
optimizer step by :class:`~compress_run.methods.masks.MaskEnforcer`) and
:func:`~compress_run.kernels.compaction.compact` later removes what they zeroed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
from torch import nn

from compress_run.kernels.channel_graph import ChannelGroup
from compress_run.methods.masks import attach_mask, get_mask


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


# ------------------------------------------------------------------------------ which groups, what cost
def prunable_groups(model: nn.Module, exclude: list[str], prune_residual: bool = True,
                    need_norm: bool = False) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Groups a channel method may prune, and the reason each other group is left whole."""
    from compress_run.kernels.channel_graph import channel_groups

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


class MacModel:
    """MACs of the network as a function of the kept channels per group (from one dense trace).

    A layer's MACs scale with its kept output channels (producers, their BN, passthrough convs) and
    its kept input channels (consumers); a depthwise conv scales once."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], groups: list[ChannelGroup]) -> None:
        from compress_run.hardware.macs import count_macs

        self.per_module = count_macs(model, (1, *input_shape)).per_module
        self.total = sum(self.per_module.values())
        self.scales: dict[str, list[ChannelGroup]] = {}
        for group in groups:
            names = [n for n, _ in group.producers] + [n for _, n in group.producers if n]
            names += [n for pair in group.passthrough for n in pair if n] + [n for n, _ in group.consumers]
            for name in dict.fromkeys(names):
                self.scales.setdefault(name, []).append(group)

    def macs(self, kept: dict[int, int]) -> float:
        total = 0.0
        for name, macs in self.per_module.items():
            for group in self.scales.get(name, []):
                macs *= kept.get(group.id, group.size) / group.size
            total += macs
        return total


def round_count(count: int, size: int, multiple: int = 1) -> int:
    """``count`` rounded to the nearest multiple of ``multiple`` (at least one multiple, at most ``size``)."""
    if multiple <= 1:
        return count
    return min(size, max(multiple, multiple * round(count / multiple)))


def allocate_counts(scores: dict[int, torch.Tensor], keep_fraction: float, min_channels: int = 1,
                    multiple: int = 1) -> dict[int, int]:
    """Kept channels per group from one global ranking: the top ``keep_fraction`` of all channels, each
    group keeping at least ``min_channels`` (its best ones); the counts sum to the global budget (unless
    ``multiple`` > 1 rounds each count to a multiple of it, for hardware-friendly widths)."""
    sizes = {g: len(s) for g, s in scores.items()}
    budget = max(sum(min(min_channels, n) for n in sizes.values()), round(keep_fraction * sum(sizes.values())))
    counts = {g: min(min_channels, n) for g, n in sizes.items()}
    rest = []
    for g, s in scores.items():
        order = torch.argsort(s.float().cpu(), descending=True, stable=True)
        rest += [(float(s[i]), g) for i in order[counts[g]:].tolist()]
    rest.sort(key=lambda item: -item[0])
    for _, g in rest[: budget - sum(counts.values())]:
        counts[g] += 1
    return {g: round_count(n, sizes[g], multiple) for g, n in counts.items()}


def search_keep_fraction(macs_at: Callable[[float], float], target_macs: float, tolerance: float = 1e-4) -> float:
    """Largest keep fraction whose MACs stay at or under ``target_macs`` (bisection; MACs grow with it)."""
    low, high = 0.0, 1.0
    if macs_at(high) <= target_macs:
        return high
    while high - low > tolerance:
        mid = (low + high) / 2
        low, high = (mid, high) if macs_at(mid) <= target_macs else (low, mid)
    return low


def unreachable_mac_target(model: nn.Module, input_shape: tuple[int, ...], groups: list[ChannelGroup],
                           flops_reduction: float, min_channels: int, skipped: dict[str, str]) -> str | None:
    """Why ``flops_reduction`` cannot be met by cutting ``groups`` (every group at ``min_channels`` at most
    removes this much), with the reachable range — None when it can be met."""
    macs = MacModel(model, input_shape, groups)
    floor = macs.macs({g.id: min(min_channels, g.size) for g in groups})
    best = 1.0 - floor / macs.total
    if flops_reduction <= best - 1e-6:
        return None
    whole = f"; {len(skipped)} channel group(s) stay whole ({'; '.join(list(skipped.values())[:2])})" if skipped \
        else ""
    return (f"method.flops_reduction={flops_reduction} cannot be reached: with every prunable channel group cut to "
            f"method.min_channels={min_channels}, the network still keeps {floor / macs.total:.1%} of its MACs, so "
            f"the reachable range is 0 < flops_reduction <= {best:.3f}{whole}")
