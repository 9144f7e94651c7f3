"""Learned selection of a network's input channels (Xu, Qin, Sun et al., "Learning in the Frequency Domain",
CVPR 2020): the frequency channels of a block-DCT input pass through on/off gates while the network trains, then
a static subset of them is kept and the layers that read the input shrink to it.

Both forms live on the network's root as the submodule ``frequency_input``, applied to the input by a forward
pre-hook (which ``torch.export``, hence the ONNX path, traces):

* :class:`FrequencyGate` (training): per image, a 2-way Gumbel-softmax on/off decision per channel, its logits a
  learned per-channel bias plus a linear map of the channels' mean magnitudes (the paper's gate: pooled input
  -> 1x1 conv -> two numbers per channel). Training multiplies each channel by its hard decision (straight-
  through gradients); evaluation keeps the channels whose on-probability is above 1/2. Each training forward
  records the penalty ``loss_weight * (mean on-probability - target)^2`` for the training step
  (:mod:`compress_run.core.auxiliary`).
* :class:`FrequencySelection` (after selection): the input is narrowed to the chosen channels, and every conv
  that reads the input holds only those channels' weights (so MACs, latency and the stored weights shrink).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

ROOT_NAME = "frequency_input"


class FrequencyGate(nn.Module):
    def __init__(self, channels: int, target: float, loss_weight: float, temperature: float) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.full((channels,), 2.0))  # every channel starts on (p = 0.88)
        self.magnitude = nn.Linear(channels, channels)
        nn.init.zeros_(self.magnitude.weight)
        nn.init.zeros_(self.magnitude.bias)
        self.register_buffer("target", torch.tensor(float(target)))
        self.register_buffer("loss_weight", torch.tensor(float(loss_weight)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self._penalty: torch.Tensor | None = None

    def on_probability(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, channels) probability that each channel of each image is kept."""
        return torch.sigmoid(self.logits(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias + self.magnitude(x.abs().mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        if not self.training:
            return x * (logits > 0).to(x.dtype)[:, :, None, None]
        two_way = torch.stack([logits, torch.zeros_like(logits)], dim=-1)  # (on, off): softmax = sigmoid(logit)
        on = F.gumbel_softmax(two_way, tau=float(self.temperature), hard=True)[..., 0]
        self._penalty = self.loss_weight * (torch.sigmoid(logits).mean() - self.target) ** 2
        return x * on[:, :, None, None]

    def pop_auxiliary_losses(self) -> dict[str, torch.Tensor]:
        penalty, self._penalty = self._penalty, None
        return {} if penalty is None else {"channel_penalty": penalty}

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        return (self(args[0]), *args[1:])


class FrequencySelection(nn.Module):
    def __init__(self, channels: list[int] | torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("channels", torch.as_tensor(channels, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.channels.to(x.device))

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        return (self(args[0]), *args[1:])


def _uninstall(model: nn.Module) -> None:
    """Remove the gate or selection and its hook (found by what it is: a handle would not survive a deepcopy)."""
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(getattr(hook, "__self__", None), FrequencyGate | FrequencySelection):
            del model._forward_pre_hooks[key]
    if ROOT_NAME in model._modules:
        delattr(model, ROOT_NAME)


def _install(model: nn.Module, part: FrequencyGate | FrequencySelection) -> None:
    _uninstall(model)
    model.add_module(ROOT_NAME, part)
    model.register_forward_pre_hook(part.pre_hook)


def attach_gate(model: nn.Module, channels: int, target: float, loss_weight: float,
                temperature: float) -> FrequencyGate:
    gate = FrequencyGate(channels, target, loss_weight, temperature)
    _install(model, gate)
    return gate


def input_readers(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """Names of the convs that read the network's input tensor itself (one forward of zeros)."""
    found: list[str] = []
    names = {module: name for name, module in model.named_modules()}
    sample = torch.zeros(1, *input_shape)

    def record(module: nn.Module, args: tuple) -> None:
        if args[0] is sample:
            found.append(names[module])

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(sample)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    if not found:
        raise ValueError("no conv reads the network's input directly, so its input channels cannot be selected")
    return found


def _narrow(conv: nn.Conv2d, channels: torch.Tensor) -> None:
    conv.weight = nn.Parameter(conv.weight.detach().index_select(1, channels).clone())
    conv.in_channels = len(channels)


def select_channels(model: nn.Module, channels: list[int], input_shape: tuple[int, ...]) -> list[str]:
    """Keep only ``channels`` of the input (in place; a gate, if any, goes): the input-reading convs keep those
    channels' weights, so the network computes exactly what it computed with the other channels zeroed.
    Returns the narrowed convs."""
    _uninstall(model)
    readers = input_readers(model, input_shape)
    index = torch.as_tensor(sorted(channels), dtype=torch.long)
    for name in readers:
        _narrow(model.get_submodule(name), index)
    _install(model, FrequencySelection(index))
    return readers


def selected_input_channels(model: nn.Module) -> int | None:
    """How many input channels a selection keeps (None: no selection, the network reads all it is given)."""
    part = getattr(model, ROOT_NAME, None)
    return len(part.channels) if isinstance(part, FrequencySelection) else None


def restore_frequency_input(model: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = "") -> int:
    """Give a freshly built ``model`` the gate or selection ``state`` records (before ``load_state_dict``);
    the narrowed convs are those whose stored weight has fewer input channels than the model's."""
    if f"{prefix}{ROOT_NAME}.channels" in state:
        index = state[f"{prefix}{ROOT_NAME}.channels"].long()
        for name, module in model.named_modules():
            key = f"{prefix}{name}.weight"
            if isinstance(module, nn.Conv2d) and key in state and state[key].shape[1] == len(index) \
                    and module.weight.shape[1] != len(index):
                _narrow(module, torch.arange(len(index)))
        _install(model, FrequencySelection(index))
        return 1
    if f"{prefix}{ROOT_NAME}.bias" in state:
        attach_gate(model, state[f"{prefix}{ROOT_NAME}.bias"].numel(), float(state[f"{prefix}{ROOT_NAME}.target"]),
                    float(state[f"{prefix}{ROOT_NAME}.loss_weight"]),
                    float(state[f"{prefix}{ROOT_NAME}.temperature"]))
        return 1
    return 0
