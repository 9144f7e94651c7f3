"""Channel budgets for channel methods: the network's MACs as a function of the kept channels per group, the
global allocation of a keep fraction, the bisection onto a MAC target and its reachability. The masks
themselves are :mod:`compress_run.core.channel_masks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from compress_run.core.channel_graph import ChannelGroup
from compress_run.core.config import check
from compress_run.methods.base import MethodConfig

TARGETS = ("channels", "flops")


@dataclass
class ChannelConfig(MethodConfig):
    """Keys of the channel methods (CHEX, L1 filter pruning)."""
    sparsity: float = 0.5
    target: str = "channels"
    flops_reduction: float = 0.5
    min_channels: int = 1
    channel_multiple: int = 1
    prune_residual: bool = True
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(0.0 <= self.sparsity < 1.0, "method.sparsity", self.sparsity, "a float in [0, 1) (channels removed)")
        check(self.target in TARGETS, "method.target", self.target, ", ".join(TARGETS))
        check(0.0 < self.flops_reduction < 1.0, "method.flops_reduction", self.flops_reduction,
              "a float in (0, 1) (fraction of MACs removed)")
        check(self.min_channels >= 1, "method.min_channels", self.min_channels, "an integer >= 1")
        check(self.channel_multiple >= 1, "method.channel_multiple", self.channel_multiple, "an integer >= 1")


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


def check_mac_target(model: nn.Module, input_shape: tuple[int, ...], groups: list[ChannelGroup],
                     flops_reduction: float, min_channels: int, skipped: dict[str, str]) -> None:
    """Raise :class:`~compress_run.methods.base.NotApplicable` when the MAC target cannot be reached."""
    from compress_run.methods.base import NotApplicable

    problem = unreachable_mac_target(model, input_shape, groups, flops_reduction, min_channels, skipped)
    if problem:
        raise NotApplicable(f"{problem}. Lower method.flops_reduction (or method.min_channels), or let more groups "
                            "be pruned (method.prune_residual, method.exclude)")


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
