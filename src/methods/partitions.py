"""Partitions of the prunable layers into groups of consecutive layers (GaP's grow-and-prune groups).

Partitioners (ours; GaP's released partitions, boone891214/GaP Transformer/profiles/3_step_sequential_gap_sp_0.9/
*.yaml, are hand-written groups of consecutive layers, and its ResNet-50 groups are not released; the glob list
is the form closest to them):
* ``by_stage`` — one group per top-level stage (the first component of the module name, e.g.
  ``layer1`` of a ResNet or ``blocks`` ... of a ViT); the model must have exactly ``num_partitions``.
* ``equal_params`` — cut the ordered layer list into ``num_partitions`` consecutive groups whose
  parameter counts are as balanced as consecutive cuts allow (cut j at the layer boundary whose
  cumulative count is nearest to j/num_partitions of the total; every group keeps at least one layer).
* an explicit list of fnmatch globs — group i holds the layers matching glob i; every prunable layer
  must match exactly one glob.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from torch import nn

PARTITIONERS = ("by_stage", "equal_params")


class PartitionError(ValueError):
    """The layers cannot be split as asked (the message says why and what would work)."""


def by_stage(layers: Mapping[str, nn.Module], num_partitions: int) -> list[list[str]]:
    groups: list[list[str]] = []
    for name in layers:
        stage = name.split(".", 1)[0]
        if groups and groups[-1][0].split(".", 1)[0] == stage:
            groups[-1].append(name)
        else:
            groups.append([name])
    if len(groups) != num_partitions:
        stages = [g[0].split(".", 1)[0] for g in groups]
        raise PartitionError(f"by_stage finds {len(groups)} stages ({', '.join(stages)}) but num_partitions="
                             f"{num_partitions}; set num_partitions={len(groups)} or use equal_params")
    return groups


def equal_params(layers: Mapping[str, nn.Module], num_partitions: int) -> list[list[str]]:
    names = list(layers)
    if num_partitions > len(names):
        raise PartitionError(f"num_partitions={num_partitions} exceeds the {len(names)} prunable layers")
    prefix = [0]
    for n in names:
        prefix.append(prefix[-1] + layers[n].weight.numel())
    cuts = [0]
    for j in range(1, num_partitions):  # cut j at the layer boundary nearest to j/num_partitions of the weights
        target = prefix[-1] * j / num_partitions
        allowed = range(cuts[-1] + 1, len(names) - (num_partitions - j) + 1)
        cuts.append(min(allowed, key=lambda i: abs(prefix[i] - target)))
    bounds = [*cuts, len(names)]
    return [names[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def by_globs(layers: Mapping[str, nn.Module], globs: list[str]) -> list[list[str]]:
    groups = [[n for n in layers if fnmatch.fnmatchcase(n, g)] for g in globs]
    for glob, group in zip(globs, groups, strict=True):
        if not group:
            raise PartitionError(f"partition glob {glob!r} matches no prunable layer")
    counts = {n: sum(n in g for g in groups) for n in layers}
    unmatched = [n for n, c in counts.items() if c == 0]
    doubled = [n for n, c in counts.items() if c > 1]
    if unmatched or doubled:
        raise PartitionError(f"every prunable layer must match exactly one partition glob; unmatched: "
                             f"{unmatched[:5]}, matched twice: {doubled[:5]}")
    return groups


def partition(layers: Mapping[str, nn.Module], num_partitions: int, partitioner: str | list[str]) -> list[list[str]]:
    if isinstance(partitioner, str):
        if partitioner == "by_stage":
            return by_stage(layers, num_partitions)
        if partitioner == "equal_params":
            return equal_params(layers, num_partitions)
        raise PartitionError(f"unknown partitioner {partitioner!r}; use {', '.join(PARTITIONERS)} or a list of globs")
    return by_globs(layers, list(partitioner))


def describe(layers: Mapping[str, nn.Module], groups: list[list[str]]) -> str:
    """One line per group: index, parameter count, first and last layer (printed at the start of a run)."""
    lines = []
    for i, group in enumerate(groups):
        params = sum(layers[n].weight.numel() for n in group)
        lines.append(f"partition {i}: {len(group)} layers, {params:,} weights ({group[0]} .. {group[-1]})")
    return "\n".join(lines)
