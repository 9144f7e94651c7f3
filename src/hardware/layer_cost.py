"""Cost of one layer alone on the input it gets inside a network: simulated on a hardware profile, measured on
this host, or its MACs; and, for factorized layers, whether they are slower than the dense layer they replace."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress_run.core.factorized import Factorized
from compress_run.hardware.measure import model_latency_ms
from compress_run.hardware.profile import HardwareConfig
from compress_run.hardware.simulator import Simulator
from compress_run.hardware.trace import trace_model

SOURCES = ("simulated", "measured", "macs")


def layer_cost(module: nn.Module, shape: tuple[int, ...], source: str, profile: HardwareConfig) -> float:
    """Cost of ``module`` alone on an input of ``shape``: simulated ms on ``profile``, measured ms, or MACs."""
    module = module.eval()
    if source == "measured":
        return model_latency_ms(module, shape, warmup=3, repeats=15)
    trace = trace_model(module, shape)
    if source == "macs":
        return float(sum(op.macs for op in trace.ops))
    return Simulator(profile).run(trace, {}).total_ms


@torch.no_grad()
def layer_input_shapes(model: nn.Module, layers: dict[str, nn.Module], shape: tuple[int, ...]) -> dict[str, tuple]:
    """The input shape each of ``layers`` (name -> submodule of ``model``) gets when ``model`` runs on zeros of
    ``shape`` (batch included), in eval mode; the model's mode is restored."""
    shapes: dict[str, tuple] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    hooks = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()(torch.zeros(shape, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return shapes


def factorized_costs(model: nn.Module, sample_shape: tuple[int, ...],
                     profile: HardwareConfig) -> dict[str, dict[str, Any]]:
    """Per factorized layer of ``model`` that replaced one dense layer: its simulated batch-1 latency and that of
    the dense layer on ``profile`` (ms), and whether it is slower (``slower``: the factorization costs time there).
    COMCAT's factorized attention replaced qkv and proj together and is not priced this way."""
    dense_layers = {name: m.dense_like() for name, m in model.named_modules() if isinstance(m, Factorized)}
    layers = {name: model.get_submodule(name) for name, dense in dense_layers.items() if dense is not None}
    if not layers:
        return {}
    shapes = layer_input_shapes(model, layers, (1, *sample_shape))
    costs = {}
    for name, layer in layers.items():
        if name not in shapes:  # not on the forward path
            continue
        factorized = layer_cost(layer, shapes[name], "simulated", profile)
        dense = layer_cost(dense_layers[name], shapes[name], "simulated", profile)
        costs[name] = {"dense_ms": round(dense, 6), "factorized_ms": round(factorized, 6),
                       "slower": factorized > dense}
    return costs
