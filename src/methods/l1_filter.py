"""L1-norm filter pruning (Li, Kadav, Durdanovic, Samet, Graf, "Pruning Filters for Efficient ConvNets", ICLR
2017) — the one-shot structured baseline.

Reference code: no official code from the authors; compared with the widely used re-implementation
Eric-mingjie/rethinking-network-pruning — cifar/l1-norm-pruning/res56prune.py (filters ranked by the L1 norm of
their weights, num_keep = int(C·(1-p)), per-stage ratios, a skip list of sensitive layers; only the first conv
of each residual block is pruned), cifar/l1-norm-pruning/vggprune.py, imagenet/l1-norm-pruning/prune.py
(ResNet-34: again only the first conv of each block).
Deviations from it, with reasons: docs/fidelity.md (section l1_filter).

Algorithm: train the dense model; at the compress stage score every output channel of a prunable
channel group by the L1 norm of its filter (summed over the group's producers when a residual add ties
several convs), keep the same fraction of channels in every group (the largest L1 norms), mask the
rest, compact the network physically (the same dependency-aware compaction CHEX uses,
:mod:`compress_run.core.compaction`) and finetune the small network.

Our choices, each a deviation from the reference:
* Pruning space: with the defaults (``prune_residual: true``, ``exclude: []``) we also prune the stem conv's
  output and every residual stream (tied groups scored by the L1 norm summed over their producers); the
  reference re-implementation prunes only the first conv of each residual block and never the stem or the
  residual stream. (ours; no reason recorded — see docs/fidelity.md) ``prune_residual: false`` with the stem
  in ``exclude`` leaves those whole.
* The ratio is one uniform fraction for every group (or, with ``target: flops``, the one found by bisection
  so that the compacted network has ``flops_reduction`` fewer MACs), where the paper picks per-layer or
  per-stage ratios by a sensitivity analysis and skips sensitive layers.
* Kept counts use round() with ``min_channels`` and ``channel_multiple``; the reference uses int(C·(1-p)).

Config keys (conf/method/l1_filter.yaml):
* ``sparsity`` (0.5): fraction of each prunable group's channels removed (``target: channels``).
* ``target`` (channels): ``channels`` or ``flops``; ``flops_reduction`` (0.5): MAC reduction for flops.
* ``min_channels`` (1), ``channel_multiple`` (1), ``prune_residual`` (true), ``exclude`` ([]): as for CHEX.
  (No ``mask_grads``: the compacted network has no masks left to protect; the finetune stage still
  re-applies any mask a group left whole might carry.)
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from compress_run.core.channel_graph import ChannelGroup
from compress_run.core.channel_masks import prunable_groups, set_channel_mask
from compress_run.core.compaction import compact
from compress_run.core.masks import MaskEnforcer
from compress_run.methods.base import Method, NotApplicable, method_config
from compress_run.methods.channels import (
    ChannelConfig,
    MacModel,
    check_mac_target,
    round_count,
    search_keep_fraction,
)


class L1Filter(Method):
    plain_train = True  # its train stage is ordinary training (see Method.trains_plainly)
    state_attributes = ('keep', 'compacted')
    Config = method_config("l1_filter")(ChannelConfig)

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        self.keep = 1.0 - self.sparsity
        self.compacted: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}

    def groups(self, model: nn.Module) -> list[ChannelGroup]:
        groups, self.skipped = prunable_groups(model, self.exclude, self.prune_residual)
        return groups

    def check_applicable(self, model: nn.Module) -> None:
        groups = self.groups(model)
        if not groups:
            reasons = "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
            raise NotApplicable(f"no prunable channel group ({reasons})")
        if self.target == "flops":
            check_mac_target(model, self.input_shape, groups, self.flops_reduction, self.min_channels, self.skipped)

    def counts(self, groups: list[ChannelGroup], keep: float) -> dict[int, int]:
        return {g.id: round_count(max(min(self.min_channels, g.size), round(keep * g.size)), g.size,
                                  self.channel_multiple) for g in groups}

    @torch.no_grad()
    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        groups, modules = self.groups(model), dict(model.named_modules())
        if self.target == "flops":
            macs = MacModel(model, self.input_shape, groups)
            self.keep = search_keep_fraction(lambda f: macs.macs(self.counts(groups, f)),
                                             (1.0 - self.flops_reduction) * macs.total)
        counts = self.counts(groups, self.keep)
        for group in groups:
            l1 = sum(modules[n].weight.detach().abs().reshape(group.size, -1).sum(1).cpu() for n, _ in group.producers)
            keep = torch.zeros(group.size, dtype=torch.bool)
            keep[torch.topk(l1, counts[group.id]).indices] = True
            set_channel_mask(group, modules, keep)
        self.compacted = {k: list(v) for k, v in compact(model).items()}
        return model

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        return [MaskEnforcer()] if stage == "finetune" else []

    def summary(self) -> dict[str, Any]:
        return {"target": self.target, "sparsity": self.sparsity, "flops_reduction": self.flops_reduction,
                "keep_fraction": self.keep, "compacted_groups": self.compacted, "groups_left_whole": self.skipped}

