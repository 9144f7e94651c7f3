"""Learned selection of a network's input channels (Xu, Qin, Sun et al., "Learning in the Frequency Domain",
CVPR 2020): the frequency channels of a block-DCT input pass through on/off gates while the network trains, then
a static subset of them is kept and the layers that read the input shrink to it.

Both forms live on the network's root as the submodule ``frequency_input``, applied to the input by a forward
pre-hook (which ``torch.export``, hence the ONNX path, traces):

* :class:`FrequencyGate` (training): the authors' input gate (kaix90/DCTNet,
  segmentation/mmdet/models/backbones/gate.py: ``GateModule192``, the ``inp_GM`` of
  classification/models/imagenet/resnet.py: ``ResNetDCT_Upscaled_Static``). Per image, each channel is averaged
  over the grid, a 1x1 conv (all channels to all, with bias) + BatchNorm + ReLU mixes the averages, and a grouped
  1x1 conv gives each channel its own two logits (off, on). Training draws a hard on/off decision per channel and
  image by Gumbel-softmax (straight-through gradients; segmentation/mmdet/models/backbones/gumbel.py:
  ``GumbleSoftmax``) and multiplies the channel by it. Initialisation as ``ResNetDCT_Upscaled_Static.
  _initialize_weights``: the hidden conv Kaiming (fan-out), BatchNorm weight 1 and bias 0, the logit conv's
  weights N(0, 0.001) and its biases 0.1 (off) and 2 (on), so every channel starts open with probability 0.87.
  Each training forward records a penalty for the training step (:mod:`compress_run.core.auxiliary`):
  ``gates`` (the authors', segmentation/mmdet/models/detectors/two_stage.py and single_stage.py:
  ``forward_train_dct``, ``loss_gate_activations``): ``loss_weight x`` the mean of the hard decisions, the open
  share; ``target`` (ours): ``loss_weight x (mean on-probability - target)^2``.
  Evaluation (ours) keeps the channels whose on-logit exceeds the off-logit, where the authors' module samples
  even in evaluation.
* :class:`FrequencySelection` (after selection): the input is narrowed to the chosen channels, and every conv
  that reads the input holds only those channels' weights (so MACs, latency and the stored weights shrink).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from compress_run.models.frequency_stem import ROOT_NAME

PENALTIES = ("gates", "target")


class FrequencyGate(nn.Module):
    def __init__(self, channels: int, target: float, loss_weight: float, temperature: float,
                 penalty: str = "gates") -> None:
        super().__init__()
        if penalty not in PENALTIES:
            raise ValueError(f"penalty={penalty!r} is not one of {PENALTIES}")
        self.hidden = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU())
        self.decide = nn.Conv2d(channels, 2 * channels, 1, groups=channels)  # channel c -> logits (2c, 2c+1)
        nn.init.kaiming_normal_(self.hidden[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.hidden[0].bias)
        nn.init.normal_(self.decide.weight, 0.0, 0.001)
        with torch.no_grad():
            self.decide.bias[0::2] = 0.1
            self.decide.bias[1::2] = 2.0
        self.register_buffer("target", torch.tensor(float(target)))
        self.register_buffer("loss_weight", torch.tensor(float(loss_weight)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("aims_at_target", torch.tensor(penalty == "target"))
        self._penalty: torch.Tensor | None = None

    @property
    def penalty(self) -> str:
        return "target" if bool(self.aims_at_target) else "gates"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, channels, 2): each channel's (off, on) logits for each image."""
        return self.decide(self.hidden(x.mean(dim=(2, 3), keepdim=True))).view(x.shape[0], -1, 2)

    def on_probability(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, channels) probability that each channel of each image is kept (the expected hard decision)."""
        return self.logits(x).softmax(dim=-1)[..., 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        if not self.training:
            return x * (logits[..., 1] > logits[..., 0]).to(x.dtype)[:, :, None, None]
        on = F.gumbel_softmax(logits, tau=float(self.temperature), hard=True)[..., 1]
        share = (logits.softmax(dim=-1)[..., 1].mean() - self.target) ** 2 if bool(self.aims_at_target) else on.mean()
        self._penalty = self.loss_weight * share
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
                temperature: float, penalty: str = "gates") -> FrequencyGate:
    gate = FrequencyGate(channels, target, loss_weight, temperature, penalty)
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
    if f"{prefix}{ROOT_NAME}.decide.weight" in state:
        def value(name: str) -> torch.Tensor:
            return state[f"{prefix}{ROOT_NAME}.{name}"]

        attach_gate(model, value("decide.weight").shape[0] // 2, float(value("target")), float(value("loss_weight")),
                    float(value("temperature")), "target" if bool(value("aims_at_target")) else "gates")
        return 1
    return 0
