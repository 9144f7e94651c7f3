"""Learned static selection of DCT frequency channels (Xu, Qin, Sun, Wang, Chen, Ren, "Learning in the Frequency
Domain", CVPR 2020).

Reference code (kaix90/DCTNet; its classification training code is not in the repository, so the gate's loss is
read from its detection code): the gate, segmentation/mmdet/models/backbones/gate.py: ``GateModule192`` (the
``inp_GM`` of classification/models/imagenet/resnet.py: ``ResNetDCT_Upscaled_Static``, initialised by its
``_initialize_weights``); the Gumbel-softmax, segmentation/mmdet/models/backbones/gumbel.py: ``GumbleSoftmax``;
the gate's loss, segmentation/mmdet/models/detectors/two_stage.py and single_stage.py: ``forward_train_dct``
(``loss_gate_activations``); the static selections, classification/main/__init__.py: ``subset_channel_index``;
the network, :mod:`compress_run.models.frequency_stem`.

Algorithm: the network reads block-DCT coefficients (``dataset.input_domain=dct``; for a torchvision ResNet the
authors' DCT ResNet). In the train stage every frequency channel passes through an on/off gate
(:class:`compress_run.core.frequency_input.FrequencyGate`): per image, the channels' grid averages go through a
1x1 conv + BatchNorm + ReLU and a per-channel 1x1 conv to two logits (off, on), and a hard Gumbel-softmax
decision multiplies each channel (straight-through gradients). The loss adds ``penalty_weight x`` the share of
open gates (``penalty=gates``, the authors'), which pushes gates shut where the task does not need them. The
compress stage averages each channel's on-probability over ``calib_size`` train images — the paper's heat map of
how often a channel is used — keeps the ``keep_channels`` most used ones, and narrows the network to them: the
input is reduced to those channels and the convs that read it keep only their weights
(:mod:`compress_run.core.frequency_input`). The finetune stage trains that network. The run writes
``frequency_selection.json`` (the channels, by index and as (colour, u, v), and every channel's probability) and
``frequency_heatmap.png`` into its output dir; the evaluate stage reports the input size per image of the
selection (``input/values``, ``input/bytes``) beside MACs and latency. Another run can train on the selection with
``dataset.dct_channels=<this run's output dir>`` (e.g. ``method=gap``), and start it from RGB weights with
``init_ckpt`` (:func:`compress_run.models.frequency_stem.image_weights_for_frequency_input`).

Config keys (conf/method/freq_select.yaml):
* ``keep_channels`` (null): frequency channels kept; null = ``keep_fraction`` of them (at least 1).
* ``keep_fraction`` (0.25): the kept share when ``keep_channels`` is null (the paper's 24 of 192 is 1/8).
* ``penalty`` (gates): ``gates``, the authors' loss on the gates: ``penalty_weight x`` the mean of the hard on
  decisions; ``target`` (ours): ``penalty_weight x (mean on-probability - kept share)^2``, which pulls the open
  share to the kept share.
* ``penalty_weight`` (1.0): the penalty's weight (the authors' detection code adds the gate loss with weight 1).
* ``temperature_start`` (1.0) and ``temperature_end`` (1.0): Gumbel-softmax temperature at the first and the
  last train epoch, geometric in between (the authors' ``GumbleSoftmax`` always samples at 1; annealing is ours).
* ``calib_size`` (2048): train images over which the on-probabilities are averaged for the selection.

Deviations (ours): the paper picks its static subsets from the heat maps by hand (``subset_channel_index``: e.g.
the 4x4 lowest Y frequencies and 2x2 of Cb and Cr for 24 channels); here the selection is the top
``keep_channels`` channels by on-probability, so a run meets its input budget exactly. Evaluation-mode gates (the
train stage's validation) take the likelier decision where the authors' module samples. The finetune stage
continues from the gate-trained weights narrowed to the kept channels; the paper trains the static-selection
network again from the RGB-pretrained ResNet-50 (here: a second run with ``dataset.dct_channels`` and
``init_ckpt``).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from compress_run.core.config import check
from compress_run.core.frequency import channel_frequency
from compress_run.core.frequency_input import PENALTIES, ROOT_NAME, FrequencyGate, attach_gate, select_channels
from compress_run.methods.base import Method, MethodConfig, NotApplicable, method_config
from compress_run.methods.calibration import calibration_batches

SELECTION_FILE, HEATMAP_FILE = "frequency_selection.json", "frequency_heatmap.png"


@method_config("freq_select")
@dataclass
class FreqSelectConfig(MethodConfig):
    keep_channels: int | None = None
    keep_fraction: float = 0.25
    penalty: str = "gates"
    penalty_weight: float = 1.0
    temperature_start: float = 1.0
    temperature_end: float = 1.0
    calib_size: int = 2048

    def __post_init__(self) -> None:
        check(self.keep_channels is None or self.keep_channels >= 1, "method.keep_channels", self.keep_channels,
              "an integer >= 1, or null")
        check(0.0 < self.keep_fraction <= 1.0, "method.keep_fraction", self.keep_fraction, "a fraction in (0, 1]")
        check(self.penalty in PENALTIES, "method.penalty", self.penalty, " or ".join(PENALTIES))
        check(self.penalty_weight >= 0.0, "method.penalty_weight", self.penalty_weight, "a float >= 0")
        check(self.temperature_start > 0 and self.temperature_end > 0, "method.temperature_start/end",
              (self.temperature_start, self.temperature_end), "floats > 0")
        check(self.calib_size >= 1, "method.calib_size", self.calib_size, "an integer >= 1")


class TemperatureSchedule(L.Callback):
    """Sets the gate's Gumbel temperature at each train epoch: geometric from ``start`` to ``end``."""

    def __init__(self, gate: FrequencyGate, start: float, end: float) -> None:
        self.gate, self.start, self.end = gate, start, end

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        progress = trainer.current_epoch / max(1, trainer.max_epochs - 1)
        self.gate.temperature.fill_(self.start * (self.end / self.start) ** progress)


class FreqSelect(Method):
    stages = ("train", "compress", "finetune", "evaluate")
    Config = FreqSelectConfig
    state_attributes = ("selected", "probabilities")

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        self.selected: list[int] = []
        self.probabilities: list[float] = []

    def channels(self) -> int:
        return int(self.input_shape[0])

    def kept(self) -> int:
        if self.keep_channels is not None:
            return int(self.keep_channels)
        return max(1, round(self.keep_fraction * self.channels()))

    def check_applicable(self, model: nn.Module) -> None:
        data = self.network_input
        if data is None or data.domain != "dct":
            raise NotApplicable("freq_select selects frequency channels of a block-DCT input; set "
                                "dataset.input_domain=dct")
        if data.channels is not None:
            raise NotApplicable(f"dataset.dct_channels already narrows the input to {len(data.channels)} channels; "
                                "freq_select chooses among all of them (set dataset.dct_channels=null)")
        if self.kept() > self.channels():
            raise NotApplicable(f"method.keep_channels={self.kept()} is more than the {self.channels()} frequency "
                                "channels of the input")

    def check_data(self, train_size: int) -> None:
        if self.calib_size > train_size:
            raise NotApplicable(f"method.calib_size={self.calib_size} is larger than the train split "
                                f"({train_size} images); lower it")

    def prepare(self, model: nn.Module) -> nn.Module:
        attach_gate(model, self.channels(), self.kept() / self.channels(), self.penalty_weight,
                    self.temperature_start, self.penalty)
        return model

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        gate = getattr(model, ROOT_NAME, None)
        if stage != "train" or not isinstance(gate, FrequencyGate):
            return []
        return [TemperatureSchedule(gate, self.temperature_start, self.temperature_end)]

    def compress(self, model: nn.Module, datamodule: Any) -> nn.Module:
        gate = getattr(model, ROOT_NAME)
        device = next(model.parameters()).device
        batches = calibration_batches(datamodule, "train", self.calib_size, 256, self.input_shape, seed=0,
                                      device=device)
        was_training = gate.training
        try:
            with torch.no_grad():  # the gate's BatchNorm on its running statistics
                total = sum(gate.eval().on_probability(batch).sum(dim=0) for batch in batches)
        finally:
            gate.train(was_training)
        probabilities = (total / self.calib_size).cpu()
        order = sorted(range(self.channels()), key=lambda c: (-float(probabilities[c]), c))
        self.selected = sorted(order[: self.kept()])
        self.probabilities = [round(float(p), 6) for p in probabilities]
        select_channels(model, self.selected, self.input_shape)
        return model

    def artifacts(self) -> dict[str, bytes]:
        block = self.network_input.block
        selection = {"channels": self.selected,
                     "frequencies": [list(channel_frequency(c, block)) for c in self.selected],
                     "block": block, "probabilities": self.probabilities,
                     "input_all": self.network_input.size(),
                     "input_selected": self.network_input.size(len(self.selected))}
        return {SELECTION_FILE: (json.dumps(selection, indent=1) + "\n").encode(),
                HEATMAP_FILE: heatmap(self.probabilities, self.selected, block)}

    def summary(self) -> dict[str, Any]:
        return {"selected_channels": self.selected, "kept": len(self.selected), "of": self.channels(),
                "on_probability": self.probabilities}


def heatmap(probabilities: list[float], selected: list[int], block: int) -> bytes:
    """One block x block panel per colour plane: each frequency's on-probability, the kept ones outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = len(probabilities) // (block * block)
    grid = torch.tensor(probabilities).view(colours, block, block)
    names = {1: ["Y"], 3: ["Y", "Cb", "Cr"]}.get(colours, [f"plane {c}" for c in range(colours)])
    fig, axes = plt.subplots(1, colours, figsize=(3.2 * colours, 3.0), squeeze=False)
    for c, ax in enumerate(axes[0]):
        image = ax.imshow(grid[c].numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        for index in selected:
            colour, u, v = channel_frequency(index, block)
            if colour == c:
                ax.add_patch(plt.Rectangle((v - 0.5, u - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        ax.set_title(f"{names[c]}: on-probability (kept: red)", fontsize=8)
        ax.set_xlabel("horizontal frequency v")
        ax.set_ylabel("vertical frequency u")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
