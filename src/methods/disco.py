"""DISCO: distributed inference with sparse communication between the nodes that share each layer.

Paper: Minghai Qin, Chao Sun, Jaco Hofmann, Dejan Vucinic, "DISCO: Distributed Inference with Sparse
Communications" (WACV 2024; arXiv 2302.11180). Reference code: none released (searched: docs/fidelity.md, disco);
the method section was not reachable. The abstract states the setting (each layer inferred across several nodes,
the data exchanged between nodes inside a layer is the bottleneck), that which data to send is chosen by training
the model, and the ResNet-50 result (2 nodes: 5x less communication, about half the computation and memory per
node, comparable accuracy). Western Digital's application US 2024/0095540 A1 (same inventors) fixes what is sent
by a weight mask: a feature goes to node B only if a non-zero weight in node B's part of the layer reads it.

Algorithm (ours where the sources are silent): every conv/linear layer is split across ``nodes`` by output channels
(hardware/partition.py). In the train stage a group-lasso penalty ``penalty`` * sum of the L2 norms of the cross
columns (the weights of node k's output channels that read one input channel held by another node) drives the
columns the task does not need toward zero; the compress stage keeps, per layer, the ``comm_fraction`` of cross
(channel, node) pairs with the largest column norms and masks the rest (a masked pair is not transmitted); the
finetune stage trains with that mask fixed. ``comm_fraction=1`` with ``penalty=0`` is the dense split (everything
transmitted), the baseline. The evaluate stage reports (``method/<key>``) per node MACs and weight bytes, the
bytes sent per inference against the dense split's, and the split's simulated batch-1 latency on the run's
profile over its link (``hardware.link_gbps``; hardware/partition.py: split_latency_ms) against one device and
the dense split.

Keys (defaults): ``nodes`` 2; ``comm_fraction`` 0.2 (the paper's 5x less communication); ``penalty`` 5e-4;
``exclude`` [] (layers split but left whole: all their cross channels sent); ``bytes_per_value`` 4.0 (fp32
activations on the link).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn

from compress_run.core.config import check
from compress_run.core.masks import MaskEnforcer, attach_mask, prunable_layers
from compress_run.hardware.partition import (
    SPLIT_TYPES,
    SplitReport,
    input_channel_map,
    node_of,
    split_latency_ms,
    split_report,
)
from compress_run.hardware.simulator import simulate
from compress_run.hardware.trace import trace_model
from compress_run.methods.base import Method, MethodConfig, NotApplicable, method_config


@method_config("disco")
@dataclass
class DiscoConfig(MethodConfig):
    nodes: int = 2
    comm_fraction: float = 0.2
    penalty: float = 5e-4
    exclude: list[str] = field(default_factory=list)
    bytes_per_value: float = 4.0

    def __post_init__(self) -> None:
        check(isinstance(self.nodes, int) and self.nodes >= 2, "method.nodes", self.nodes, "an integer >= 2")
        check(0.0 <= self.comm_fraction <= 1.0, "method.comm_fraction", self.comm_fraction,
              "a float in [0, 1] (the share of cross-node channels each layer transmits)")
        check(self.penalty >= 0 and math.isfinite(self.penalty), "method.penalty", self.penalty, "a float >= 0")
        check(self.bytes_per_value > 0, "method.bytes_per_value", self.bytes_per_value, "a float > 0")


def column_pairs(module: nn.Module, nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each weight column (out, in_per_group): the id of its (node of the row, input channel read) pair,
    ``node * in_channels + channel``, and whether the channel is held by another node (a cross column)."""
    out_channels = module.weight.shape[0]
    in_channels = module.weight.shape[1] * getattr(module, "groups", 1)
    out_node, in_node = node_of(out_channels, nodes), node_of(in_channels, nodes)
    channel = input_channel_map(module)
    return out_node[:, None] * in_channels + channel, in_node[channel] != out_node[:, None]


def pair_norms(module: nn.Module, nodes: int, pairs: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> torch.Tensor:
    """(nodes, in_channels): the L2 norm of the weights of node k's rows that read input channel c (0 where c is
    node k's own or no row of k reads it); ``pairs``: :func:`column_pairs` of the module, if at hand."""
    pair, cross = pairs if pairs is not None else column_pairs(module, nodes)
    weight = module.weight.detach()
    entries = weight.flatten(2).pow(2).sum(2) if weight.dim() > 2 else weight.pow(2)  # (out, in_per_group)
    in_channels = weight.shape[1] * getattr(module, "groups", 1)
    norms = torch.zeros(nodes * in_channels, device=weight.device)
    return norms.index_add_(0, pair[cross], entries[cross].float()).sqrt().view(nodes, in_channels)


class CrossGroupLasso(L.Callback):
    """Adds the gradient of ``penalty`` * sum over cross (channel, node) pairs of the pair's weight norm."""

    def __init__(self, layers: dict[str, nn.Module], nodes: int, penalty: float) -> None:
        self.layers, self.nodes, self.penalty = layers, nodes, penalty
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer, on its weight's device

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.penalty == 0:
            return
        for name, module in self.layers.items():
            weight = module.weight
            if weight.grad is None:
                continue
            if name not in self.pairs or self.pairs[name][0].device != weight.device:
                self.pairs[name] = tuple(t.to(weight.device) for t in column_pairs(module, self.nodes))
            pair, cross = self.pairs[name]
            scale = pair_norms(module, self.nodes, (pair, cross)).flatten()[pair].clamp_min(1e-12)
            factor = (cross / scale).view(*scale.shape, *([1] * (weight.dim() - 2)))
            weight.grad.add_(self.penalty * weight.detach() * factor)


class Disco(Method):
    Config = DiscoConfig
    state_attributes = ("kept",)

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        self.kept: dict[str, float] = {}   # layer -> share of its cross (channel, node) pairs transmitted

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        whole = set(prunable_layers(model, list(self.exclude))) if self.exclude else None
        return {n: m for n, m in model.named_modules() if isinstance(m, SPLIT_TYPES)
                and (whole is None or n in whole) and bool(column_pairs(m, self.nodes)[1].any())}

    def check_applicable(self, model: nn.Module) -> None:
        try:
            layers = self.layers(model)
        except ValueError as exc:
            raise NotApplicable(f"method.exclude: {exc}") from exc
        if not layers:
            raise NotApplicable(f"no conv/linear layer has channels to exchange across method.nodes={self.nodes}")
        narrow = [n for n, m in layers.items() if m.weight.shape[0] < self.nodes]
        if narrow:
            raise NotApplicable(f"{len(narrow)} layer(s) have fewer output channels than method.nodes={self.nodes} "
                                f"(e.g. {narrow[0]}); lower method.nodes or exclude them")

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        if stage == "train":
            return [CrossGroupLasso(self.layers(model), self.nodes, self.penalty)]
        if stage == "finetune":
            return [MaskEnforcer()]
        return []

    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        for name, module in self.layers(model).items():
            pair, cross = column_pairs(module, self.nodes)
            norms = pair_norms(module, self.nodes, (pair, cross)).flatten().cpu()
            read = torch.zeros_like(norms, dtype=torch.bool)  # the cross pairs some weight reads
            read[pair[cross]] = True
            budget = math.ceil(self.comm_fraction * int(read.sum()) - 1e-9)
            keep = torch.zeros_like(read)
            keep[torch.where(read, norms, torch.tensor(-1.0)).argsort(descending=True)[:budget]] = True
            column_kept = ~cross | keep[pair]  # (out, in_per_group)
            mask = column_kept.view(*column_kept.shape, *([1] * (module.weight.dim() - 2))).expand_as(module.weight)
            mask = mask.contiguous().to(module.weight.device)
            attach_mask(module, mask)
            module.weight.data.mul_(mask)
            self.kept[name] = budget / max(int(read.sum()), 1)
        return model

    def network_metrics(self, model: nn.Module) -> dict[str, Any]:
        split = split_report(model, (1, *self.input_shape), self.nodes, self.bytes_per_value)
        totals = split.totals()
        return {**totals, "max_node_macs": max(totals["macs_per_node"]),
                "max_node_weight_bytes": max(totals["weight_bytes_per_node"]), **self.latency(model, split)}

    def latency(self, model: nn.Module, report: SplitReport) -> dict[str, Any]:
        """The split's simulated batch-1 latency on the run's profile over its link (``hardware.link_gbps``)."""
        if self.hardware is None or not self.hardware.link_gbps:
            return {"split_latency": f"not simulated: hardware={getattr(self.hardware, 'name', None)} describes no "
                                     "link (set hardware.link_gbps, e.g. 10 for 10 Gigabit Ethernet)"}
        simulation = simulate(model, trace_model(model, (1, *self.input_shape)), self.hardware)
        times = split_latency_ms(report, simulation.by_module(), simulation.total_ms, self.hardware.link_gbps,
                                 self.hardware.link_latency_us)
        return {**{f"split_{k}": v for k, v in times.items()}, "link_gbps": self.hardware.link_gbps,
                "split_speedup": times["one_device_latency_ms"] / times["latency_ms"]}

    def summary(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "comm_fraction": self.comm_fraction, "kept_per_layer": self.kept}
