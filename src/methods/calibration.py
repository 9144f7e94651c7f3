"""Calibration data and per-weight MAC costs shared by the post-training methods (rd, lpvit): a fixed, seeded
sample of the train split (or Gaussian-noise images, the zero-data variant) as preprocessed batches, and the
MACs one weight of a layer costs per image."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from compress_run.core.errors import UserError


def calibration_batches(datamodule: L.LightningDataModule, source: str, size: int, batch_size: int,
                        input_shape: tuple[int, ...], seed: int, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if source == "noise":
        images = torch.randn((size, *input_shape), generator=generator)
        return [b.to(device) for b in images.split(batch_size)]
    if datamodule.train_set is None:
        datamodule.setup("fit")
    train_set = getattr(datamodule, "unaugmented_train_set", datamodule.train_set)  # no train-time augmentation
    if size > len(train_set):
        raise UserError(f"method.calib_size={size} is larger than the train split ({len(train_set)} images)",
                        f"set method.calib_size <= {len(train_set)}")
    indices = torch.randperm(len(train_set), generator=generator)[:size].tolist()
    loader = DataLoader(Subset(train_set, indices), batch_size=batch_size, shuffle=False)
    return [datamodule.on_after_batch_transfer(batch, 0)[0].to(device) for batch in loader]


def macs_per_weight(model: nn.Module, names: list[str], sample: torch.Tensor) -> dict[str, float]:
    """MACs one weight of each layer costs per image: output positions of a conv, tokens of a linear layer."""
    modules = dict(model.named_modules())
    found: dict[str, float] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
            per_image = out[0].numel()  # one sample
            found[name] = per_image / module.weight.shape[0]
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(sample[:1])
    finally:
        for h in handles:
            h.remove()
    return {n: float(found.get(n, 0.0)) for n in names}
