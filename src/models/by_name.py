"""Checks shared by the any-model-by-name builders (``model=torchvision`` / ``model=timm``)."""

from __future__ import annotations

import torch
from torch import nn


def check_width(library: str, width_mult: float) -> None:
    if width_mult != 1.0:
        raise ValueError(f"model.width_mult={width_mult} is not supported by model={library} (architectures are "
                         "built as published); pick a smaller variant by model.name")


def checked_run(model: nn.Module, label: str, in_channels: int, image_size: int) -> nn.Module:
    """``model`` in train mode after one eval forward at the data's size; a ValueError naming why it cannot run."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_channels, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ValueError(f"{label} does not run on {image_size}x{image_size} inputs ({reason}); use a dataset with "
                         "larger images or another model") from exc
    return model.train()
