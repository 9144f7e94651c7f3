"""Channel dependency analysis: which layers' channels must be kept or removed together.

A :class:`ChannelGroup` is one channel index space shared by several tensors. Convolutions (and
linear layers) that feed the same residual add *produce* one group; the BatchNorm right after a
producer belongs to it; a depthwise conv is channel-wise, so its input and output are the same group
(*passthrough*); the layers reading the group *consume* it (conv input channels, or linear input
columns after flatten, ``factor`` columns per channel). A channel of a group can be removed only as a
whole: every producer's output channel, every passthrough channel and every consumer's input slice.

CNNs are analysed by tracing with ``torch.fx``. Only ops known to map a zero channel to a zero channel
(ReLU-like activations, pooling, dropout, add, flatten) carry a group through; any other op that
touches a group *freezes* it (its channels are never removed), so an unknown architecture is handled
conservatively rather than wrongly. A BatchNorm subclass (timm's ``BatchNormAct2d``: BN, drop,
activation) is one node and carries its group when its own submodules are zero-preserving. A model
fx cannot trace gets one frozen pseudo-group named ``model`` with the reason: nothing is removed. The
CIFAR ResNets' option-A shortcut (zero padding) is a *scatter*: its input group lands on the first
channels of the output group.

Vision transformers (timm ``Attention``/``Mlp``) are analysed structurally: each MLP's hidden units
form a group (fc1 produces, fc2 consumes), each attention's heads form a ``heads`` group whose unit
is one head (rows of q, k and v in ``qkv``, columns of ``proj``). The embedding dimension is frozen.
Attention modules with another layout (torchvision's Swin, LeViT's normalised qkv) have their heads
left whole, with the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from compress_run.models.cifar_resnet import PadShortcut

PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.Dropout, nn.Identity, nn.MaxPool2d,
                nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
PASS_FUNCTIONS = {F.relu, F.relu6, torch.relu, F.hardswish, F.silu, F.gelu, F.dropout, F.max_pool2d,
                  F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
PASS_METHODS = {"relu", "relu_", "contiguous", "clone"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class ChannelGroup:
    """One shared channel index space (``unit`` > 1: each index is a block of ``unit`` rows, e.g. a head)."""

    id: int
    size: int
    kind: str = "channels"                                            # channels | heads
    unit: int = 1
    producers: list[tuple[str, str | None]] = field(default_factory=list)    # (conv/linear, its BN)
    passthrough: list[tuple[str, str | None]] = field(default_factory=list)  # (depthwise conv, its BN)
    consumers: list[tuple[str, int]] = field(default_factory=list)           # (conv/linear, columns/channel)
    scatters: list[tuple[str, int]] = field(default_factory=list)            # (module, source group id)
    frozen: str | None = None
    label: str | None = None  # the name of a group without producers (the whole untraceable model)

    @property
    def name(self) -> str:
        return self.producers[0][0] if self.producers else self.label or f"group{self.id}"

    @property
    def residual(self) -> bool:
        return len(self.producers) > 1 or bool(self.scatters)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, PadShortcut | _BatchNorm) or getattr(m, "fx_leaf", False)
                or super().is_leaf_module(m, qualname))


def _zero_preserving_children(module: nn.Module) -> bool:
    """Whether a norm's own submodules (timm's BatchNormAct2d: drop, then act) map a zero channel to zero."""
    return all(isinstance(child, PASS_MODULES) for child in module.children())


class _Builder:
    """Union-find over channel spaces, filled while walking the fx graph."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.groups: list[ChannelGroup] = []
        self.parent: list[int] = []

    def new(self, size: int, frozen: str | None = None) -> int:
        self.groups.append(ChannelGroup(len(self.groups), size, frozen=frozen))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def group(self, i: int) -> ChannelGroup:
        return self.groups[self.find(i)]

    def freeze(self, i: int | None, reason: str) -> None:
        if i is not None and self.group(i).frozen is None:
            self.group(i).frozen = reason

    def merge(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        ga, gb = self.groups[a], self.groups[b]
        if ga.size != gb.size:
            self.freeze(a, "added tensors of different channel counts")
            self.freeze(b, "added tensors of different channel counts")
            return a
        self.parent[b] = a
        ga.producers += gb.producers
        ga.passthrough += gb.passthrough
        ga.consumers += gb.consumers
        ga.scatters += gb.scatters
        ga.frozen = ga.frozen or gb.frozen
        return a


Value = tuple[int, bool]  # (group id, flattened)


def _trace_groups(model: nn.Module) -> list[ChannelGroup]:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises TraceError, TypeError, AttributeError, ... by model
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        return [ChannelGroup(0, 0, label="model", frozen=f"torch.fx cannot trace {type(model).__name__} ({reason}), "
                             "so its channel dependencies cannot be analysed: every channel is left whole")]
    modules = dict(model.named_modules())
    b = _Builder(modules)
    values: dict[fx.Node, Value] = {}

    def inputs(node: fx.Node) -> list[Value]:
        found: list[Value] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(values[n]) if n in values else None)
        return found

    def unknown(node: fx.Node) -> None:
        for gid, _ in inputs(node):
            b.freeze(gid, f"read by an op compaction does not model ({node.format_node()[:80]})")

    for node in graph.nodes:
        if node.op == "placeholder":
            values[node] = (b.new(0, frozen="network input"), False)
        elif node.op == "output":
            for gid, _ in inputs(node):
                b.freeze(gid, "network output")
        elif node.op == "call_module":
            module, args = modules[node.target], inputs(node)
            src = args[0] if args else None
            if isinstance(module, nn.Conv2d) and src and not src[1]:
                gid = src[0]
                if module.groups == 1:
                    b.group(gid).consumers.append((node.target, 1))
                    out = b.new(module.out_channels)
                    b.group(out).producers.append((node.target, None))
                    values[node] = (out, False)
                elif module.groups == module.in_channels == module.out_channels:
                    b.group(gid).passthrough.append((node.target, None))
                    values[node] = (gid, False)
                else:
                    b.freeze(gid, f"grouped conv {node.target}")
                    values[node] = (b.new(module.out_channels, frozen=f"grouped conv {node.target}"), False)
            elif isinstance(module, nn.Linear) and src:
                b.group(src[0]).consumers.append((node.target, 0 if src[1] else 1))  # 0: factor from shapes
                out = b.new(module.out_features)
                b.group(out).producers.append((node.target, None))
                values[node] = (out, False)
            elif isinstance(module, NORM_TYPES) and src and _zero_preserving_children(module):
                values[node] = src
                owner = node.args[0]
                attachable = (isinstance(owner, fx.Node) and owner.op == "call_module" and len(owner.users) == 1)
                group = b.group(src[0])
                for role in (group.producers, group.passthrough):
                    for i, (name, norm) in enumerate(role):
                        if attachable and name == owner.target and norm is None:
                            role[i] = (name, node.target)
                            break
                    else:
                        continue
                    break
                else:
                    b.freeze(src[0], f"BatchNorm {node.target} does not directly follow a conv")
            elif isinstance(module, PadShortcut) and src:
                out = b.new(module.planes)
                b.group(out).scatters.append((node.target, src[0]))
                values[node] = (out, False)
            elif isinstance(module, nn.Flatten) and src and module.start_dim == 1:
                values[node] = (src[0], True)
            elif isinstance(module, PASS_MODULES) and src:
                values[node] = src
            else:
                unknown(node)
                if args:
                    values[node] = (b.new(0, frozen=f"output of {node.target}"), False)
        elif node.op in ("call_function", "call_method"):
            args = inputs(node)
            target = node.target
            if node.op == "call_method" and target in ("size", "dim") or target is getattr:
                continue  # shape queries read no channel values
            if target in ADD_FUNCTIONS or (node.op == "call_method" and target in ("add", "add_")):
                if len(args) == 2:
                    values[node] = (b.merge(args[0][0], args[1][0]), args[0][1] and args[1][1])
                elif args:
                    values[node] = args[0]  # tensor + scalar
                continue
            flat = (target is torch.flatten or target == "flatten") and \
                (node.args[1:2] == (1,) or node.kwargs.get("start_dim") == 1)
            flat = flat or (target in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1)
            if flat and args:
                values[node] = (args[0][0], True)
            elif (target in PASS_FUNCTIONS or (node.op == "call_method" and target in PASS_METHODS)) and args:
                values[node] = args[0]
            elif args:
                unknown(node)
                values[node] = (b.new(0, frozen=f"output of {node.format_node()[:60]}"), False)
    roots = [r for r in sorted({b.find(i) for i in range(len(b.groups))})
             if b.groups[r].producers or b.groups[r].scatters]
    index = {r: i for i, r in enumerate(roots)}
    groups = [b.groups[r] for r in roots]
    for group in groups:
        group.scatters = [(name, index.get(b.find(src), -1)) for name, src in group.scatters]
        if any(src < 0 for _, src in group.scatters):
            group.frozen = group.frozen or "scatter from a group without producers"
        for i, (name, factor) in enumerate(group.consumers):
            if factor == 0:  # linear after flatten: in_features = channels x spatial positions
                in_features = modules[name].in_features
                group.consumers[i] = (name, max(1, in_features // max(1, group.size)))
                if in_features % max(1, group.size):
                    group.frozen = group.frozen or f"{name} in_features is not a multiple of the channels"
    return groups


def _timm_head_layout(module: nn.Module) -> bool:
    """Whether ``module`` lays out its heads as timm's Attention does (what head compaction assumes)."""
    heads, head_dim = module.num_heads, getattr(module, "head_dim", None)
    qkv, proj = module.qkv, module.proj
    return (isinstance(head_dim, int) and isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
            and qkv.out_features == 3 * heads * head_dim and proj.in_features == heads * head_dim)


def _vit_groups(model: nn.Module) -> list[ChannelGroup]:
    groups: list[ChannelGroup] = []
    for name, module in model.named_modules():
        if hasattr(module, "qkv") and hasattr(module, "proj") and hasattr(module, "num_heads"):
            heads, timm_layout = module.num_heads, _timm_head_layout(module)
            qkv_rows = module.qkv.out_features if isinstance(module.qkv, nn.Linear) else 3 * heads
            unit = qkv_rows // (3 * heads) or 1  # head_dim for timm's layout
            group = ChannelGroup(len(groups), heads, kind="heads", unit=unit,
                                 producers=[(f"{name}.qkv", None)], consumers=[(f"{name}.proj", 1)])
            if not timm_layout:
                group.frozen = (f"{type(module).__name__} is not a timm-style attention (one qkv Linear of "
                                "3 x heads x head_dim, proj over heads x head_dim): its heads are left whole")
            elif getattr(module, "gate", None) is not None or not isinstance(getattr(module, "norm", nn.Identity()),
                                                                              nn.Identity):
                group.frozen = "gated or normalised attention"
            groups.append(group)
        elif hasattr(module, "fc1") and hasattr(module, "fc2") and isinstance(module.fc1, nn.Linear):
            group = ChannelGroup(len(groups), module.fc1.out_features, producers=[(f"{name}.fc1", None)],
                                 consumers=[(f"{name}.fc2", 1)])
            if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity) or \
                    not isinstance(getattr(module, "act", nn.GELU()), PASS_MODULES):
                group.frozen = "MLP with a hidden norm or a non zero-preserving activation"
            groups.append(group)
    return groups


def is_vit(model: nn.Module) -> bool:
    return any(hasattr(m, "qkv") and hasattr(m, "num_heads") for m in model.modules())


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """The channel groups of ``model`` (frozen ones included, with the reason)."""
    groups = _vit_groups(model) if is_vit(model) else _trace_groups(model)
    for i, group in enumerate(groups):
        group.id = i
    return groups
