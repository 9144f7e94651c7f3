"""What the network is fed: the image itself (``dataset.input_domain=spatial``, optionally resized to
``dataset.input_size``), or its block-DCT coefficients (``input_domain=dct``; Xu, Qin, Sun et al., "Learning in
the Frequency Domain", CVPR 2020), optionally only some of the frequency channels (``dataset.dct_channels``).

The DCT path, per batch and after the augmentation (crop and flip act on pixels, as in the paper): pixels in
[0, 255] -> upsampled by ``dct_upsample`` (bilinear; the paper upsamples ImageNet 2x so that the 8x8-block grid
matches the resolution the removed stem delivered) -> YCbCr for colour images, the grey image itself for one
channel -> ``dct_block`` x ``dct_block`` block DCT (:mod:`compress_run.core.frequency`) -> each frequency channel
standardised with its mean and std over the train split (the paper normalises per channel too; computed once per
process from the unaugmented train images, or from the first ``STATS_IMAGES`` of them) -> the chosen channels.

Input size per image, the quantity the paper trades: a pixel is one byte (uint8); a DCT coefficient is two (an
integer coefficient of an 8-bit image fits int16, as JPEG stores them) — ``input_values``/``input_bytes``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from compress_run.core.errors import UserError
from compress_run.core.frequency import block_dct, padded_size, to_ycbcr
from compress_run.models.causal_lm import is_causal_lm
from compress_run.models.frequency_stem import take_frequency_input
from compress_run.pipeline.checkpoints import load_checkpoint, load_net_state, net_state_from_checkpoint

DOMAINS = ("spatial", "dct")
STATS_IMAGES = 20000        # train images the per-channel statistics are computed from (all when fewer)
PIXEL_BYTES, COEFFICIENT_BYTES = 1, 2
SELECTION_FILE = "frequency_selection.json"  # what method=freq_select writes into its run dir


def read_channel_list(value: Any) -> list[int] | None:
    """``dataset.dct_channels``: null (all), a list of channel indices, or a path to a run dir (or its
    ``frequency_selection.json``) of ``method=freq_select`` whose selection to use."""
    if value is None:
        return None
    if isinstance(value, str):
        path = Path(value)
        path = path / SELECTION_FILE if path.is_dir() else path
        fix = ("set dataset.dct_channels to a list of channel indices, or to the output dir of a finished "
               "method=freq_select run")
        try:
            return [int(c) for c in json.loads(path.read_text())["channels"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"dataset.dct_channels={value} is not a readable frequency selection ({exc})", fix) from exc
    return [int(c) for c in value]


class NetworkInput:
    """The transform from a uint8 image batch to the network's input, and the shape and size of that input."""

    def __init__(self, in_channels: int, image_size: int, mean: torch.Tensor, std: torch.Tensor,
                 input_domain: str = "spatial", input_size: int | None = None, dct_block: int = 8,
                 dct_upsample: int = 1, dct_channels: Any = None) -> None:
        fix = "choose dataset.input_domain=spatial or dct, dct_block >= 2, dct_upsample >= 1"
        if input_domain not in DOMAINS:
            raise UserError(f"dataset.input_domain={input_domain!r} is not one of {DOMAINS}", fix)
        if dct_block < 2 or dct_upsample < 1:
            raise UserError(f"dataset.dct_block={dct_block} / dataset.dct_upsample={dct_upsample} is out of range", fix)
        if input_domain == "dct" and input_size is not None:
            raise UserError("dataset.input_size resizes the spatial input; the DCT input's size is set by "
                            "dataset.dct_block and dataset.dct_upsample", "drop dataset.input_size, or use "
                            "dataset.input_domain=spatial")
        if input_size is not None and not input_size >= 4:
            raise UserError(f"dataset.input_size={input_size} is too small", "use an input_size >= 4 or null")
        self.in_channels, self.image_size = in_channels, image_size
        self.mean, self.std = mean, std
        self.domain, self.input_size = input_domain, input_size
        self.block, self.upsample = dct_block, dct_upsample
        self.all_channels = in_channels * dct_block ** 2  # Y, Cb, Cr planes of RGB; the grey plane (Y) alone
        self.channels = read_channel_list(dct_channels) if input_domain == "dct" else None
        if self.channels is not None and (not self.channels or len(set(self.channels)) != len(self.channels)
                                          or not all(0 <= c < self.all_channels for c in self.channels)):
            raise UserError(f"dataset.dct_channels={self.channels} must be distinct indices in "
                            f"[0, {self.all_channels}) ({in_channels} colour plane(s) x "
                            f"{dct_block}x{dct_block} frequencies)", "give a valid selection, or null for all")
        self.dct_mean: torch.Tensor | None = None
        self.dct_std: torch.Tensor | None = None

    # --------------------------------------------------------------------------------- shape and size
    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one network input."""
        if self.domain == "spatial":
            side = self.input_size or self.image_size
            return self.in_channels, side, side
        grid = padded_size(self.image_size * self.upsample, self.block) // self.block
        return len(self.channels) if self.channels is not None else self.all_channels, grid, grid

    def size(self, selected_channels: int | None = None) -> dict[str, float]:
        """Input values and bytes per image (``selected_channels``: the network narrows the input to these)."""
        channels, height, width = self.shape
        values = (selected_channels or channels) * height * width
        per_value = PIXEL_BYTES if self.domain == "spatial" else COEFFICIENT_BYTES
        return {"input/values": values, "input/bytes": values * per_value,
                "input/bytes_vs_image": values * per_value / (self.in_channels * self.image_size ** 2 * PIXEL_BYTES)}

    # --------------------------------------------------------------------------------- transform
    def fit_statistics(self, train_images: torch.Tensor) -> None:
        """Per-frequency-channel mean/std over (the first STATS_IMAGES of) the unaugmented train images."""
        if self.domain != "dct" or self.dct_mean is not None:
            return
        total = sum_sq = None
        count = 0
        for chunk in train_images[:STATS_IMAGES].split(1000):
            coefficients = self.coefficients(chunk).double()
            s, q = coefficients.sum(dim=(0, 2, 3)), (coefficients ** 2).sum(dim=(0, 2, 3))
            total, sum_sq = (s, q) if total is None else (total + s, sum_sq + q)
            count += coefficients.shape[0] * coefficients.shape[2] * coefficients.shape[3]
        mean = total / count
        std = (sum_sq / count - mean ** 2).clamp_min(0).sqrt()
        self.dct_mean = mean.float().view(1, -1, 1, 1)
        self.dct_std = std.clamp_min(1e-3).float().view(1, -1, 1, 1)  # a constant channel (padding) stays 0

    def coefficients(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() if images.dtype == torch.uint8 else images.float() * 255.0  # [0, 1] floats: ToTensor
        if self.upsample > 1:
            x = F.interpolate(x, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        if x.shape[1] == 3:
            x = to_ycbcr(x)
        return block_dct(x, self.block)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) NCHW images -> the network's input."""
        if self.domain == "spatial":
            x = images.float().div_(255.0) if images.dtype == torch.uint8 else images
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
            if self.input_size is not None and self.input_size != x.shape[-1]:
                x = resize(x, self.input_size)
            return x
        if self.dct_mean is None:
            raise RuntimeError("NetworkInput.fit_statistics must run before DCT inputs are made")
        x = (self.coefficients(images) - self.dct_mean.to(images.device)) / self.dct_std.to(images.device)
        return x if self.channels is None else x[:, self.channels]


def resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """Spatial downsampling (area averaging at an integer factor, antialiased bilinear otherwise)."""
    if x.shape[-1] % side == 0 and x.shape[-2] % side == 0:
        return F.adaptive_avg_pool2d(x, side)
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def network_input_of(dataset: Any) -> NetworkInput:
    """The :class:`NetworkInput` a dataset config describes (shape and size only: no statistics)."""
    return NetworkInput(int(dataset.in_channels), int(dataset.image_size),
                        torch.tensor(list(dataset.mean)).view(1, -1, 1, 1),
                        torch.tensor(list(dataset.std)).view(1, -1, 1, 1),
                        dataset.get("input_domain", "spatial"), dataset.get("input_size"),
                        int(dataset.get("dct_block", 8)), int(dataset.get("dct_upsample", 1)),
                        dataset.get("dct_channels"))


def adapt_network(net: nn.Module, network_input: NetworkInput, model_choice: str) -> nn.Module:
    """``net`` (built for the image) made to take ``network_input``: DCT inputs go through the model's frequency
    stem (:mod:`compress_run.models.frequency_stem`); an input of another shape than the image is checked with
    one forward pass, so a model that cannot take it is refused here and not in the middle of training."""
    shape = network_input.shape
    language_model, text = is_causal_lm(net), network_input.domain == "tokens"
    if language_model != text:
        raise UserError(f"model={model_choice} is {'a causal language model' if language_model else 'an image model'}"
                        f" but the dataset holds {'text' if text else 'images'}",
                        "pair a causal LM (model=tiny_llama, smollm2_135m, hf_causal_lm) with a text dataset "
                        "(dataset=shakespeare, text) and an image model with an image dataset")
    if text:
        return net
    if network_input.domain == "dct":
        try:
            take_frequency_input(net, shape[0])
        except ValueError as exc:
            raise UserError(f"model={model_choice} cannot take dataset.input_domain=dct: {exc}",
                            "pick a torchvision ResNet, MobileNetV2, a CIFAR-style ResNet or VGG") from exc
    if shape != (network_input.in_channels, network_input.image_size, network_input.image_size):
        try:
            with torch.no_grad():
                net.eval()(torch.zeros(1, *shape))
        except (RuntimeError, ValueError, AssertionError) as exc:
            raise UserError(f"model={model_choice} cannot run on the network input {shape} "
                            f"({str(exc).splitlines()[0][:200]})",
                            "choose a model that accepts this input size (the CIFAR-style ResNets accept any), "
                            "or drop dataset.input_size") from exc
        net.train()
    return net


def finished_run_network(run_dir: Path, checkpoint: str) -> tuple[nn.Module, Any]:
    """The network of a finished run in eval mode, and the run's config: the model its ``.hydra/config.yaml``
    names, made to take the run's input, with the compression and the weights of ``checkpoints/<checkpoint>``."""
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise UserError(f"{run_dir} is not a compress-run run dir (no .hydra/config.yaml)",
                        "pass the output dir of a finished run")
    state = net_state_from_checkpoint(load_checkpoint(run_dir / "checkpoints" / checkpoint, "checkpoint",
                                                      "pass the dir of a run that finished that stage"))
    cfg = OmegaConf.load(config)
    net = adapt_network(instantiate(cfg.model), network_input_of(cfg.dataset), str(cfg.model._target_))
    load_net_state(net, state, f"checkpoint {run_dir / 'checkpoints' / checkpoint} does not fit the model of {config}",
                   "pass the checkpoint of that run, with its config unchanged")
    return net.eval(), cfg


def finished_run_test_set(cfg: Any, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` test images of a finished run's dataset (found as the run found them: ``dataset.root``,
    the Debian package, ...) normalized with the dataset's mean and std, and their labels."""
    _, _, images, labels = instantiate(cfg.dataset).load_arrays()
    mean = torch.tensor(list(cfg.dataset.mean)).view(1, -1, 1, 1)
    std = torch.tensor(list(cfg.dataset.std)).view(1, -1, 1, 1)
    return (images[:count].float() / 255.0 - mean) / std, labels[:count]
