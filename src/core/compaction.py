"""Dependency-aware compaction: the physically smaller network whose outputs equal the masked one's.

A channel of a :class:`~compress_run.core.channel_graph.ChannelGroup` is *dead* when it is zero
whatever the input: every producer's weight slice is zero and its bias, pushed through the BatchNorm
that follows (eval statistics), is exactly zero; every depthwise passthrough adds nothing; and every
scatter source (option-A shortcut) is dead at that channel too. Channel masks (weight rows plus the
BN's gamma and beta, see :mod:`compress_run.methods.channels`) make channels dead; so does any other way
of zeroing them. :func:`compact` removes the dead channels of every non-frozen group from producers,
BatchNorms, passthrough convs and consumers, so the compacted network computes exactly what the
masked one computes (eval mode).

Compacted layers are ``Compacted*`` subclasses of the torch layers. Each stores its constructor
arguments and the fraction of the dense layer's MACs it keeps as ``extra_state``, so a checkpoint of a
compacted network describes its own shapes: :func:`restore_compacted` rebuilds them on a freshly
built (dense) network before ``load_state_dict``. ``compression_info()`` reports ``kind=compacted``
to the MAC counter and the latency simulator.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from compress_run.core.channel_graph import ChannelGroup, channel_groups
from compress_run.core.masks import MASK_SUFFIX
from compress_run.models.cifar_resnet import PadShortcut


class Compacted:
    """Mixin: a layer that lost channels. ``dense_fraction`` = its MACs / the original layer's MACs.
    Each concrete class defines ``ctor_args()``: the constructor arguments that rebuild it at its new shape."""

    dense_fraction: float = 1.0
    owner_attrs: dict[str, Any]
    fx_leaf = True  # traced as the torch layer it specialises (channel_graph), not through its forward

    def get_extra_state(self) -> dict[str, Any]:
        return {"compacted": type(self).__name__, "args": self.ctor_args(), "dense_fraction": self.dense_fraction,
                "owner_attrs": getattr(self, "owner_attrs", {})}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.dense_fraction = state["dense_fraction"]
        self.owner_attrs = state.get("owner_attrs", {})

    def compression_info(self) -> dict[str, Any]:
        return {"kind": "compacted", "density": self.dense_fraction, "shape": list(self.weight.shape)}


class CompactedConv2d(Compacted, nn.Conv2d):
    def ctor_args(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "kernel_size": self.kernel_size,
                "stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups,
                "bias": self.bias is not None, "padding_mode": self.padding_mode}


class CompactedLinear(Compacted, nn.Linear):
    def ctor_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}


class CompactedBatchNorm2d(Compacted, nn.BatchNorm2d):
    def ctor_args(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum,
                "affine": self.affine, "track_running_stats": self.track_running_stats}

    def compression_info(self) -> dict[str, Any]:
        return {"kind": "compacted", "density": self.dense_fraction, "shape": [self.num_features]}


class CompactedBatchNorm1d(CompactedBatchNorm2d, nn.BatchNorm1d):
    pass


class CompactedPadShortcut(Compacted, PadShortcut):
    """Option-A shortcut after compaction: input channel i lands on output channel ``positions[i]``.

    Written as a gather from [x, zeros] so it exports to ONNX as plain Concat + Gather."""

    def __init__(self, in_planes: int, planes: int, stride: int, positions: list[int]) -> None:
        super().__init__(in_planes, planes, stride)
        gather = torch.full((planes,), in_planes, dtype=torch.long)
        gather[torch.tensor(positions, dtype=torch.long)] = torch.arange(in_planes)
        self._positions = list(positions)
        self.register_buffer("gather", gather, persistent=False)

    def positions(self) -> torch.Tensor:
        return torch.tensor(self._positions, dtype=torch.long)

    def ctor_args(self) -> dict[str, Any]:
        return {"in_planes": self.in_planes, "planes": self.planes, "stride": self.stride,
                "positions": self._positions}

    def compression_info(self) -> dict[str, Any]:
        return {"kind": "compacted", "density": self.dense_fraction, "shape": [self.planes]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        padded = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2], x.shape[3])], 1)
        return padded.index_select(1, self.gather)


class CompactedInPlaceNorm(Compacted):
    """Mixin for a BatchNorm subclass with a forward or submodules of its own (timm's ``BatchNormAct2d``:
    BN, drop, activation), compacted *in place* so that its class's forward and its children stay. The
    instance's class becomes ``Compacted<its class>``; ``in_place`` in the extra state tells
    :func:`restore_compacted` to resize the freshly built layer instead of replacing it."""

    def ctor_args(self) -> dict[str, Any]:
        return {"num_features": self.num_features}

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "in_place": True}

    def compression_info(self) -> dict[str, Any]:
        return {"kind": "compacted", "density": self.dense_fraction, "shape": [self.num_features]}


@functools.cache
def _in_place_class(cls: type) -> type:
    return type(f"Compacted{cls.__name__}", (CompactedInPlaceNorm, cls), {})


def _compacts_in_place(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) and not isinstance(module, CompactedBatchNorm2d) and \
        type(module) not in (nn.BatchNorm1d, nn.BatchNorm2d)


def _resize_in_place(module: _BatchNorm, keep: torch.Tensor | None, size: int) -> None:
    """Keep the ``keep`` channels of every per-channel tensor (``None``: new uninitialised tensors of ``size``)."""
    old = module.num_features
    for store in (module._parameters, module._buffers):
        for key, value in list(store.items()):
            if value is None or value.dim() == 0 or value.shape[0] != old:
                continue
            new = _slice(value, 0, keep) if keep is not None else value.new_empty((size, *value.shape[1:]))
            if keep is not None and key.endswith(MASK_SUFFIX) and bool(new.all()):
                del store[key]  # a full mask says nothing once the layer has its new shape
            elif store is module._parameters:
                store[key] = nn.Parameter(new, requires_grad=value.requires_grad)
            else:
                store[key] = new
    if not isinstance(module, Compacted):
        module.__class__ = _in_place_class(type(module))
    module.dense_fraction = getattr(module, "dense_fraction", 1.0) * size / max(1, old)
    module.num_features = size


COMPACTED = {cls.__name__: cls for cls in (CompactedConv2d, CompactedLinear, CompactedBatchNorm2d,
                                            CompactedBatchNorm1d, CompactedPadShortcut)}


# ------------------------------------------------------------------------------------ dead channels
def _norm_of_constant(norm: nn.Module, value: torch.Tensor) -> torch.Tensor:
    """BatchNorm (eval statistics) applied to a per-channel constant input."""
    if norm.running_mean is None:  # batch statistics: a constant channel's output depends on the batch
        return torch.ones_like(value)
    out = (value - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
    if norm.affine:
        out = out * norm.weight + norm.bias
    return out


def _offset(modules: dict[str, nn.Module], name: str, norm: str | None, size: int) -> torch.Tensor:
    bias = modules[name].bias
    value = bias.detach().clone() if bias is not None else torch.zeros(size, device=modules[name].weight.device)
    return _norm_of_constant(modules[norm], value).detach() if norm else value


@torch.no_grad()
def dead_channels(model: nn.Module, group: ChannelGroup, groups: list[ChannelGroup],
                  modules: dict[str, nn.Module] | None = None) -> torch.Tensor:
    """Boolean (group.size,): channels (or heads) that are zero for every input."""
    modules = modules or dict(model.named_modules())
    if group.frozen:
        return torch.zeros(group.size, dtype=torch.bool)
    if group.kind == "heads":
        qkv, proj = modules[group.producers[0][0]], modules[group.consumers[0][0]]
        heads, dim = group.size, group.unit
        v_rows = qkv.weight[2 * heads * dim:].reshape(heads, -1)
        dead = (v_rows == 0).all(1)
        if qkv.bias is not None:
            dead &= (qkv.bias[2 * heads * dim:].reshape(heads, dim) == 0).all(1)
        return (dead | (proj.weight.reshape(proj.out_features, heads, dim) == 0).all(2).all(0)).cpu()
    dead = torch.ones(group.size, dtype=torch.bool)
    for name, norm in group.producers:
        rows = (modules[name].weight.reshape(group.size, -1) == 0).all(1)
        dead &= (rows & (_offset(modules, name, norm, group.size) == 0)).cpu()
    for name, norm in group.passthrough:
        dead &= (_offset(modules, name, norm, group.size) == 0).cpu()
    for name, source in group.scatters:
        positions = modules[name].positions()
        dead[positions] &= dead_channels(model, groups[source], groups, modules)
    return dead


# ------------------------------------------------------------------------------------ compaction
def _rows(group: ChannelGroup, keep: torch.Tensor, role: str) -> torch.Tensor:
    """Indices along a layer's channel dimension for kept channels (heads: expanded to rows/columns)."""
    if group.kind != "heads":
        return keep
    per_head = (keep[:, None] * group.unit + torch.arange(group.unit)).flatten()
    if role == "producer":  # qkv: q, k and v blocks
        return torch.cat([per_head + part * group.size * group.unit for part in range(3)])
    return per_head


def _expand(keep: torch.Tensor, factor: int) -> torch.Tensor:
    return (keep[:, None] * factor + torch.arange(factor)).flatten() if factor > 1 else keep


def _slice(tensor: torch.Tensor | None, dim: int, index: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None or index is None:
        return tensor
    return tensor.detach().index_select(dim, index.to(tensor.device)).clone()


def _shrunk(module: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Module:
    """A Compacted* copy of ``module`` keeping output ``rows`` and input ``cols``."""
    old_numel = module.weight.numel() if getattr(module, "weight", None) is not None else module.num_features
    device = next(iter(module.parameters()), torch.zeros(0)).device
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        if depthwise:
            cols = None
        out_ch = len(rows) if rows is not None else module.out_channels
        in_ch = out_ch if depthwise else (len(cols) if cols is not None else module.in_channels)
        new = CompactedConv2d(in_ch, out_ch, module.kernel_size, module.stride, module.padding, module.dilation,
                              out_ch if depthwise else module.groups, module.bias is not None,
                              module.padding_mode, device=device)
    elif isinstance(module, nn.Linear):
        new = CompactedLinear(len(cols) if cols is not None else module.in_features,
                              len(rows) if rows is not None else module.out_features,
                              module.bias is not None, device=device)
    elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        cls = CompactedBatchNorm2d if isinstance(module, nn.BatchNorm2d) else CompactedBatchNorm1d
        new = cls(len(rows), module.eps, module.momentum, module.affine, module.track_running_stats, device=device)
        cols = None
    else:
        raise TypeError(f"cannot compact a {type(module).__name__}")
    state = {}
    for key, value in module.state_dict().items():
        if key.endswith("_extra_state") or value.dim() == 0:
            state[key] = value
            continue
        value = _slice(value, 0, rows)
        state[key] = _slice(value, 1, cols) if value.dim() > 1 else value
    for key in [k for k in state if k.endswith(MASK_SUFFIX)]:
        if bool(state[key].all()):
            del state[key]  # a full mask says nothing once the layer has its new shape
        else:
            new.register_buffer(key, torch.empty_like(state[key]))
    state.pop("_extra_state", None)
    new.load_state_dict(state, strict=False)
    new.train(module.training)
    new_numel = new.weight.numel() if getattr(new, "weight", None) is not None else new.num_features
    new.dense_fraction = getattr(module, "dense_fraction", 1.0) * new_numel / max(1, old_numel)
    new.owner_attrs = dict(getattr(module, "owner_attrs", {}))
    return new


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def compact(model: nn.Module) -> dict[str, Any]:
    """Remove every dead channel in place; returns ``{group name: (kept, size)}`` for the groups that shrank."""
    modules = dict(model.named_modules())
    groups = channel_groups(model)
    keeps: dict[int, torch.Tensor] = {}
    for group in groups:
        dead = dead_channels(model, group, groups, modules)
        if dead.numel() and dead.all():
            dead[0] = False  # an empty layer is not a layer; one zero channel keeps the shapes valid
        if dead.any():
            keeps[group.id] = torch.nonzero(~dead).flatten()
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    for group in groups:
        keep = keeps.get(group.id)
        if keep is None:
            continue
        for name, norm in group.producers + group.passthrough:
            rows[name] = _rows(group, keep, "producer")
            if norm:
                rows[norm] = keep
        for name, factor in group.consumers:
            cols[name] = _expand(_rows(group, keep, "consumer"), factor)
    for name in sorted(set(rows) | set(cols)):
        if _compacts_in_place(modules[name]):
            _resize_in_place(modules[name], rows[name], len(rows[name]))
        else:
            _set_module(model, name, _shrunk(modules[name], rows.get(name), cols.get(name)))
    for group in groups:
        for name, source in group.scatters:
            if group.id in keeps or source in keeps:
                _compact_scatter(model, modules[name], name, keeps.get(source), keeps.get(group.id))
        keep = keeps.get(group.id)
        if group.kind == "heads" and keep is not None:
            attention = model.get_submodule(group.producers[0][0].rpartition(".")[0])
            attention.num_heads, attention.attn_dim = len(keep), len(keep) * group.unit
            attention.qkv.owner_attrs = {"num_heads": attention.num_heads, "attn_dim": attention.attn_dim}
    return {g.name: (len(keeps[g.id]), g.size) for g in groups if g.id in keeps}


def _compact_scatter(model: nn.Module, module: PadShortcut, name: str, source_keep: torch.Tensor | None,
                     target_keep: torch.Tensor | None) -> None:
    positions = module.positions()
    if source_keep is not None:
        positions = positions[source_keep]
    planes = module.planes
    if target_keep is not None:
        new_index = torch.full((module.planes,), -1, dtype=torch.long)
        new_index[target_keep] = torch.arange(len(target_keep))
        positions, planes = new_index[positions], len(target_keep)
        if bool((positions < 0).any()):
            raise RuntimeError(f"{name}: a live shortcut channel lands on a removed channel")
    new = CompactedPadShortcut(len(positions), planes, module.stride, positions.tolist())
    new.dense_fraction = getattr(module, "dense_fraction", 1.0) * planes / module.planes
    _set_module(model, name, new)


# ------------------------------------------------------------------------------------ reloading
def restore_compacted(model: nn.Module, state_dict: dict[str, Any], prefix: str = "") -> int:
    """Give ``model`` the compacted layers a state dict describes (call before ``load_state_dict``)."""
    count = 0
    for key, value in state_dict.items():
        if not (key.startswith(prefix) and key.endswith("._extra_state") and isinstance(value, dict)
                and (value.get("compacted") in COMPACTED or value.get("in_place"))):
            continue
        name = key[len(prefix): -len("._extra_state")]
        if value.get("in_place"):
            new = model.get_submodule(name)
            _resize_in_place(new, None, value["args"]["num_features"])
        else:
            new = COMPACTED[value["compacted"]](**value["args"])
        new.set_extra_state(value)
        for mask_key in state_dict:  # masks still present on compacted layers
            if mask_key.startswith(f"{prefix}{name}.") and mask_key.endswith(MASK_SUFFIX) \
                    and mask_key.count(".") == key.count("."):
                new.register_buffer(mask_key.rpartition(".")[2], torch.empty_like(state_dict[mask_key]))
        _set_module(model, name, new)
        parent = name.rpartition(".")[0]
        for attr, attr_value in value.get("owner_attrs", {}).items():
            setattr(model.get_submodule(parent) if parent else model, attr, attr_value)
        count += 1
    return count


def is_compacted(model: nn.Module) -> bool:
    return any(isinstance(m, Compacted) for m in model.modules())


def params_kept(model: nn.Module) -> int:
    """Parameters still stored (a compacted layer stores only kept weights; masks are not subtracted)."""
    return sum(p.numel() for p in model.parameters())

