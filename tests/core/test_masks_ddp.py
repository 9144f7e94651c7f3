"""The cross-rank mask check, driven with a stand-in strategy (no process group needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compress_run.core.masks import attach_mask, check_masks_agree_across_ranks, mask_checksums


def _model(mask: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 3))
    attach_mask(model[0], mask)
    return model


def _trainer(other: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(strategy=SimpleNamespace(all_gather=lambda local: torch.stack([local, other])))


def test_equal_masks_pass_and_different_masks_raise():
    mask = torch.rand(3, 4) > 0.5
    model = _model(mask)
    check_masks_agree_across_ranks(_trainer(mask_checksums(_model(mask.clone()))), model)
    flipped = mask.clone()
    flipped[0, 0] = ~flipped[0, 0]
    with pytest.raises(RuntimeError, match="masks differ between ranks"):
        check_masks_agree_across_ranks(_trainer(mask_checksums(_model(flipped))), model)
