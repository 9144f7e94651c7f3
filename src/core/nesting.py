"""Nested (multi-level) sparsity: one stored model holding sub-models at several sparsities.

A model with levels 0 … L−1 (level 0 the sparsest) carries, on every prunable layer, a ``weight_level``
buffer (uint8, the weight's shape): the first level at which the entry is non-zero, or L where it is pruned
at every level. Level k's model keeps the entries with ``weight_level <= k`` at the stored values, so the
positions and values of a sparser level are a subset of every denser one's by construction of the
storage; training keeps that honest by freezing lower-level values (:mod:`compress_run.methods.multilevel`).
With per-level BN, every BatchNorm carries ``level_bn`` [L, 4, C]: weight, bias, running mean and running
variance as they were when level k finished training.

:func:`level_view` materialises level k as an ordinary masked model (a copy), :func:`check_hierarchy`
verifies the nesting of two materialised models, :func:`restore_levels` re-registers the buffers from a
state dict before ``load_state_dict``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from compress_run.core.allocation import allocate
from compress_run.core.masks import attach_mask, get_mask
from compress_run.core.projections import project

LEVEL_BUFFER = "weight_level"
BN_BUFFER = "level_bn"
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def level_count(model: nn.Module) -> int:
    """L for a multi-level model (the value marking "never kept" in ``weight_level``), 0 otherwise."""
    for module in model.modules():
        if LEVEL_BUFFER in module._buffers:
            return int(module._buffers["level_count"].item())
    return 0


def level_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if LEVEL_BUFFER in m._buffers}


def nested_level_maps(layers: Mapping[str, nn.Module], scores: Mapping[str, torch.Tensor],
                      sparsities: Sequence[float], distribution: str, pattern: str) -> dict[str, torch.Tensor]:
    """Per layer the level map of nested masks for ``sparsities`` (strictly decreasing).

    Level k projects the scores with every entry kept at a lower level lifted above all others, so the
    pattern's projection keeps them and fills its remaining budget from the free entries (the prune ratio
    on the free set is whatever brings the total to the level's density). Raises ValueError if a pattern
    cannot nest (a level's projection drops a lower level's entry).
    """
    count = len(sparsities)
    maps = {n: torch.full(scores[n].shape, count, dtype=torch.uint8) for n in layers}
    kept = {n: torch.zeros(scores[n].shape, dtype=torch.bool) for n in layers}
    for level, sparsity in enumerate(sparsities):
        lifted = {}
        for name in layers:
            score = scores[name].detach().float().abs().cpu()
            lifted[name] = score + kept[name] * (score.max() + 1.0)
        densities = allocate(lifted, sparsity, distribution)
        for name in layers:
            mask = project(pattern, lifted[name], densities[name]).cpu()
            if (kept[name] & ~mask).any():
                raise ValueError(f"pattern {pattern!r} cannot nest level {level} (sparsity {sparsity}) over the "
                                 f"sparser levels in layer {name}: its projection drops entries they keep")
            maps[name][mask & ~kept[name]] = level
            kept[name] = mask
    return maps


def attach_levels(model: nn.Module, maps: Mapping[str, torch.Tensor], count: int, per_level_bn: bool) -> None:
    for name, level_map in maps.items():
        module = model.get_submodule(name)
        module.register_buffer(LEVEL_BUFFER, level_map.to(module.weight.device))
        module.register_buffer("level_count", torch.tensor(count, dtype=torch.uint8))
    if per_level_bn:
        for module in model.modules():
            if isinstance(module, BN_TYPES) and module.affine and module.track_running_stats:
                module.register_buffer(BN_BUFFER, torch.stack(
                    [getattr(module, f).detach() for f in BN_FIELDS])[None].repeat(count, 1, 1))


def set_level_mask(model: nn.Module, level: int) -> None:
    """Make level ``level`` the active mask of every level layer (zeroes the entries above it)."""
    for module in level_layers(model).values():
        attach_mask(module, module._buffers[LEVEL_BUFFER] <= level)


@torch.no_grad()
def store_level_bn(model: nn.Module, level: int) -> None:
    for module in model.modules():
        if BN_BUFFER in module._buffers:
            module._buffers[BN_BUFFER][level] = torch.stack([getattr(module, f).detach() for f in BN_FIELDS])


@torch.no_grad()
def load_level_bn(model: nn.Module, level: int) -> None:
    for module in model.modules():
        if BN_BUFFER in module._buffers:
            for i, field in enumerate(BN_FIELDS):
                getattr(module, field).copy_(module._buffers[BN_BUFFER][level, i])


def level_view(model: nn.Module, level: int) -> nn.Module:
    """A copy of ``model`` that is level ``level``: its mask active, its BN snapshot loaded."""
    count = level_count(model)
    if not 0 <= level < count:
        raise ValueError(f"level {level} does not exist; the model has levels 0..{count - 1}")
    view = copy.deepcopy(model)
    set_level_mask(view, level)
    load_level_bn(view, level)
    return view


def mixed_view(model: nn.Module, segments: Sequence[Sequence[str]], levels: Sequence[int]) -> nn.Module:
    """A copy of ``model`` running segment i of its level layers at level ``levels[i]`` (a per-segment level
    choice: switching level part-way through the network). A BatchNorm takes the level of the segment of
    the last level layer registered before it (the stem's BN that of the first segment)."""
    count = level_count(model)
    if len(segments) != len(levels) or not all(0 <= k < count for k in levels):
        raise ValueError(f"levels {list(levels)} do not give one level of 0..{count - 1} to each of the "
                         f"{len(segments)} segments")
    view = copy.deepcopy(model)
    segment_of = {name: i for i, group in enumerate(segments) for name in group}
    current = 0
    with torch.no_grad():
        for name, module in view.named_modules():
            if LEVEL_BUFFER in module._buffers:
                current = segment_of[name]
                attach_mask(module, module._buffers[LEVEL_BUFFER] <= levels[current])
            elif BN_BUFFER in module._buffers:
                for i, field in enumerate(BN_FIELDS):
                    getattr(module, field).copy_(module._buffers[BN_BUFFER][levels[current], i])
    return view


def level_sparsity(model: nn.Module, level: int) -> float:
    """Measured sparsity of level ``level`` over the level layers."""
    layers = level_layers(model).values()
    kept = sum(int((m._buffers[LEVEL_BUFFER] <= level).sum()) for m in layers)
    return 1.0 - kept / max(1, sum(m.weight.numel() for m in layers))


@torch.no_grad()
def check_hierarchy(sparser: nn.Module, denser: nn.Module, atol: float = 0.0) -> list[str]:
    """Problems with ``sparser`` ⊂ ``denser`` (empty list = nested): on every masked layer the sparser
    model's non-zeros must sit inside the denser one's mask with the same values, and every other
    parameter (dense layers, biases, BN without per-level snapshots) must be equal."""
    problems = []
    dense_params = dict(denser.named_parameters())
    masked = {f"{n}.weight" for n, m in sparser.named_modules() if get_mask(m) is not None}
    per_level_bn = {f"{n}.{f}" for n, m in sparser.named_modules() if BN_BUFFER in m._buffers for f in BN_FIELDS}
    for name, param in sparser.named_parameters():
        other = dense_params.get(name)
        if other is None or other.shape != param.shape:
            problems.append(f"{name}: missing or reshaped in the denser model")
        elif name in masked:
            module = denser.get_submodule(name.rpartition(".")[0])
            support = param != 0
            dense_mask = get_mask(module)
            if dense_mask is not None and (support & ~dense_mask).any():
                problems.append(f"{name}: {int((support & ~dense_mask).sum())} non-zeros outside the denser mask")
            diff = (param - other)[support].abs()
            if diff.numel() and float(diff.max()) > atol:
                problems.append(f"{name}: {int((diff > atol).sum())} shared entries differ "
                                f"(max {float(diff.max()):.3g})")
        elif name not in per_level_bn and not torch.allclose(param, other, rtol=0.0, atol=atol):
            problems.append(f"{name}: differs between the levels (it is shared by all levels)")
    return problems


def restore_levels(model: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = "") -> int:
    """Register the level buffers a state dict holds (before ``load_state_dict``); returns how many."""
    modules = dict(model.named_modules())
    count = 0
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        module_name, _, buffer = key[len(prefix):].rpartition(".")
        if buffer in (LEVEL_BUFFER, "level_count", BN_BUFFER) and module_name in modules:
            modules[module_name].register_buffer(buffer, torch.zeros_like(value))
            count += 1
    return count
