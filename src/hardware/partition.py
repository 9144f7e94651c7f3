"""Within-layer model parallelism: every conv/linear layer split across nodes by output channels, and what each
node computes, stores and receives (DISCO's setting: Qin, Sun, Hofmann, Vucinic, WACV 2024).

Node k owns a contiguous slice of every layer's output channels (channel c of C on node floor(c * nodes / C)),
so the activations of channel c live where they were computed and elementwise ops (norms, activations, residual
adds of equal width, option-A shortcuts that shift channels by a quarter of the new width) stay on their node. A
layer's weight splits into node k's rows; the columns of those rows that read input channels held by another node
j form the cross block j -> k. Input channel c of node j is **sent** to node k when any weight in node k's rows
that reads c is non-zero (a pruned cross column is not sent: US 2024/0095540 A1 fixes what is sent by the weight
sparsity of the cross blocks). What a node computes and stores counts its rows' non-zero weights. The network's
input is on every node (not counted as traffic); each consuming layer counts its own receptions (a tensor read by
two layers on the same node is counted twice: ours, an upper bound).

:func:`split_report` gives per layer and in total: each node's MACs and weight bytes, and the values and bytes each
node receives per inference (batch 1), for the network as it is (masks applied) and as the dense split that
transmits every cross channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress_run.core.masks import get_mask

SPLIT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def node_of(channels: int, nodes: int) -> torch.Tensor:
    """The node of each of ``channels`` channels (contiguous slices, as even as they divide)."""
    return torch.arange(channels) * nodes // channels


def input_channel_map(module: nn.Module) -> torch.Tensor:
    """For each weight entry's (row, column) the input channel it reads: shape (out, in_per_group)."""
    weight = module.weight
    out_channels, per_group = weight.shape[0], weight.shape[1]
    groups = getattr(module, "groups", 1)
    group_of_row = torch.arange(out_channels) // (out_channels // groups)
    return group_of_row[:, None] * per_group + torch.arange(per_group)[None, :]


@dataclass
class LayerSplit:
    name: str
    macs: list[float]                  # per node, batch 1
    weight_bytes: list[float]          # per node
    received_values: list[float]       # per node: input values it receives from the others
    dense_received_values: list[float]  # per node, if every cross channel were sent
    sent_channels: int                 # cross (channel, node) pairs sent
    cross_channels: int                # cross (channel, node) pairs there are
    dense_macs: float = 0.0            # the whole layer's, every weight counted


@dataclass
class SplitReport:
    nodes: int
    bytes_per_value: float
    layers: list[LayerSplit] = field(default_factory=list)

    def totals(self) -> dict[str, Any]:
        n = range(self.nodes)
        received = [sum(layer.received_values[k] for layer in self.layers) for k in n]
        dense = [sum(layer.dense_received_values[k] for layer in self.layers) for k in n]
        return {
            "nodes": self.nodes,
            "macs_per_node": [sum(layer.macs[k] for layer in self.layers) for k in n],
            "weight_bytes_per_node": [sum(layer.weight_bytes[k] for layer in self.layers) for k in n],
            "received_bytes_per_node": [v * self.bytes_per_value for v in received],
            "bytes_sent": sum(received) * self.bytes_per_value,
            "bytes_sent_dense_split": sum(dense) * self.bytes_per_value,
            "communication_reduction": (sum(dense) / sum(received)) if sum(received) else float("inf"),
            "cross_channels_sent": sum(layer.sent_channels for layer in self.layers),
            "cross_channels": sum(layer.cross_channels for layer in self.layers),
        }


@torch.no_grad()
def split_report(model: nn.Module, input_shape: tuple[int, ...], nodes: int, bytes_per_value: float = 4.0
                 ) -> SplitReport:
    """Each conv/linear layer of ``model`` split across ``nodes`` (see the module docstring) for one input of
    ``input_shape`` (batch included, batch 1 counted)."""
    spatial: dict[str, tuple[int, int]] = {}  # layer -> (input positions, output positions) per sample
    reads_input: set[str] = set()  # layers that read the network's input, which every node holds
    x = torch.zeros(input_shape, device=next((p.device for p in model.parameters()), torch.device("cpu")))

    def record(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            inputs = args[0]
            if inputs.data_ptr() == x.data_ptr():
                reads_input.add(name)
            if isinstance(module, nn.Linear):
                spatial[name] = (inputs[0].numel() // inputs.shape[-1], output[0].numel() // output.shape[-1])
            else:
                spatial[name] = (inputs[0, 0].numel(), output[0, 0].numel())
        return hook

    layers = {n: m for n, m in model.named_modules() if isinstance(m, SPLIT_TYPES)}
    handles = [m.register_forward_hook(record(n)) for n, m in layers.items()]
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    report = SplitReport(nodes, bytes_per_value)
    for name, module in layers.items():
        if name not in spatial:  # not on the forward path
            continue
        positions_in, positions_out = spatial[name]
        weight = module.weight.detach()
        mask = get_mask(module)
        kept = (weight != 0) if mask is None else mask.bool() & (weight != 0)
        kept_entries = kept.flatten(2).any(2) if kept.dim() > 2 else kept  # (out, in_per_group): a column kept
        out_channels = weight.shape[0]
        in_channels = weight.shape[1] * getattr(module, "groups", 1)
        out_node = node_of(out_channels, nodes)
        in_node = node_of(in_channels, nodes)
        channel = input_channel_map(module)
        per_weight = kept.flatten(1).sum(1).float()  # non-zero weights per row
        macs = [float(per_weight[out_node == k].sum()) * positions_out for k in range(nodes)]
        weight_bytes = [float(per_weight[out_node == k].sum()) * weight.element_size() for k in range(nodes)]
        received, dense, sent, cross = [], [], 0, 0
        for k in range(nodes):
            rows = out_node == k
            read = torch.zeros(in_channels, dtype=torch.bool)
            read[channel[rows][kept_entries[rows]]] = True  # channels node k's kept weights read
            reads_at_all = torch.zeros(in_channels, dtype=torch.bool)
            reads_at_all[channel[rows].flatten()] = True  # channels its rows read in the dense split
            remote = (in_node != k) & (name not in reads_input)
            sent_k = int((read & remote).sum())
            cross_k = int((reads_at_all & remote).sum())
            received.append(sent_k * positions_in)
            dense.append(cross_k * positions_in)
            sent += sent_k
            cross += cross_k
        report.layers.append(LayerSplit(name, macs, weight_bytes, received, dense, sent, cross,
                                        float(weight.numel()) * positions_out))
    return report


def split_latency_ms(report: SplitReport, layer_ms: dict[str, float], total_ms: float, link_gbps: float,
                     link_latency_us: float = 0.0) -> dict[str, float]:
    """Simulated batch-1 latency of the split network (ours: no overlap of computing and sending). A split layer
    takes, on each node, its one-device time ``layer_ms`` scaled by the node's MACs over the layer's dense MACs (a
    node stores only the weight columns it reads, so it runs them as a smaller dense layer) plus the time to
    receive the node's values over the link (bandwidth ``link_gbps`` each way, ``link_latency_us`` per
    transfer); the layer waits for its slowest node. Everything else (norms, activations, pools: channel-local)
    is shared evenly by the nodes. Returned: the split network's latency, the dense split's (every cross channel
    sent), and the one-device latency ``total_ms``."""
    bytes_per_ms = link_gbps * 1e9 / 8 / 1e3

    def transfer(values: float) -> float:
        return (values * report.bytes_per_value / bytes_per_ms + link_latency_us / 1e3) if values else 0.0

    split_ms = sum(layer_ms.get(layer.name, 0.0) for layer in report.layers)
    rest = max(total_ms - split_ms, 0.0) / report.nodes
    sparse, dense = rest, rest
    for layer in report.layers:
        t = layer_ms.get(layer.name, 0.0)
        compute = [t * m / (layer.dense_macs or 1.0) for m in layer.macs]
        sparse += max(c + transfer(v) for c, v in zip(compute, layer.received_values, strict=True))
        dense_compute = [t / report.nodes] * report.nodes  # the dense split: even rows, every weight kept
        dense += max(c + transfer(v) for c, v in zip(dense_compute, layer.dense_received_values, strict=True))
    return {"latency_ms": sparse, "dense_split_latency_ms": dense, "one_device_latency_ms": total_ms}
