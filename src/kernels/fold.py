"""Batch norm folded into the conv or linear layer before it, for inference: the executed form that deployment
runtimes use (ONNX Runtime folds the same pairs in its graph optimizer), so eager host latency does not pay a
separate normalisation pass per layer. torch.fx traces the network with every conv, linear and batch-norm module
(compacted subclasses included) as a leaf; a batch norm whose only input is a conv's or linear's output, which
feeds nothing else, is folded into it (torch.nn.utils.fusion) and leaves the graph. The root's forward pre-hooks,
which tracing leaves out, become calls in the graph (an input-channel selection)."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

FOLDABLE = (_ConvNd, nn.Linear)


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (*FOLDABLE, _BatchNorm)) or super().is_leaf_module(module, qualified_name)


def _set_module(root: nn.Module, qualified_name: str, module: nn.Module) -> None:
    parent, _, name = qualified_name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _trace(net: nn.Module) -> fx.GraphModule:
    """The traced network, with the root's forward pre-hooks (an input-channel selection: a submodule's method
    applied to the input) as calls of those submodules on the input; fx traces ``forward`` alone."""
    graph = _LeafTracer().trace(net)
    children = {module: name for name, module in net.named_children()}
    for hook in net._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if owner not in children:
            raise ValueError("a forward pre-hook on the root that is not a submodule's")
        first = next(node for node in graph.nodes if node.op == "placeholder")
        with graph.inserting_after(first):
            call = graph.call_module(children[owner], (first,))
        first.replace_all_uses_with(call, delete_user_cb=lambda user, call=call: user is not call)
    return fx.GraphModule(net, graph)


def _fold_pairs(net: nn.Module) -> tuple[fx.GraphModule, int]:
    graph_module = _trace(net)
    modules = dict(graph_module.named_modules())
    folded = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm) or len(node.args) != 1:
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1
                and isinstance(modules[source.target], FOLDABLE)):
            continue
        layer, norm = modules[source.target], modules[node.target]
        if norm.running_mean is None or norm.running_var is None:
            continue  # batch statistics at inference: nothing constant to fold
        if isinstance(layer, nn.Linear) and layer.out_features != norm.num_features:
            continue
        fold = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
        _set_module(graph_module, source.target, fold(layer, norm))
        node.replace_all_uses_with(source)
        graph_module.graph.erase_node(node)
        folded += 1
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module, folded


def fold_batchnorm(net: nn.Module, sample: torch.Tensor) -> tuple[nn.Module, str]:
    """An inference copy of ``net`` with its conv/linear + batch-norm pairs folded, and what was done (``"folded
    N of M batch norms"``); or ``net`` itself and why not (no batch norm, a network torch.fx cannot trace, or
    outputs that differ from the unfolded network's on ``sample``: the copy is used only when it computes the
    same function)."""
    norms = sum(isinstance(m, _BatchNorm) for m in net.modules())
    if not norms:
        return net, "no batch norm"
    was_training = net.training
    net.eval()
    try:
        try:
            folded, count = _fold_pairs(copy.deepcopy(net))
        except Exception as exc:  # data-dependent control flow, an untraceable op
            return net, f"not folded: not traceable by torch.fx ({type(exc).__name__})"
        if not count:
            return net, "not folded: no batch norm with running statistics follows a conv or linear layer directly"
        with torch.inference_mode():
            reference, output = net(sample), folded.eval()(sample)
        if not (isinstance(output, torch.Tensor) and torch.allclose(
                output, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()) + 1e-6)):
            return net, "not folded: the folded network's outputs differ"
        return folded, f"folded {count} of {norms} batch norms"
    finally:
        net.train(was_training)
