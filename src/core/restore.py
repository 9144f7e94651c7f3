"""One function that gives a freshly built network every compression structure a state dict describes —
an input-channel gate or selection, compacted shapes, factorized layers, multi-level buffers, masks, quantized
layers, token-pruning blocks and token selectors — so that ``load_state_dict`` then loads the compressed weights
into it. Checkpoints carry their own structure (``extra_state`` of compacted and factorized layers, level, mask
and quantization buffers): no method has to be present to reload a compressed model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from compress_run.core.compaction import restore_compacted
from compress_run.core.factorized import restore_factorized
from compress_run.core.frequency_input import restore_frequency_input
from compress_run.core.masks import attach_masks_from_state_dict
from compress_run.core.nesting import restore_levels
from compress_run.core.quantization import attach_quantization_from_state_dict
from compress_run.core.soft_tokens import restore_soft_tokens
from compress_run.core.tokens import restore_token_pruning


def restore_compression(model: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, int]:
    """Rebuild on ``model`` (freshly built, dense) the compression state of ``state_dict``; call before
    ``model.load_state_dict``. Returns how many compacted layers, factorized layers, level buffers, masks,
    quantized layers, token-pruning blocks and token selectors were restored (and whether an input gate or
    channel selection was)."""
    state = dict(state_dict)
    selected_input = restore_frequency_input(model, state, prefix)  # first: narrowed convs take masks after
    return {"frequency_input": selected_input,
            "compacted": restore_compacted(model, state, prefix),
            "factorized": restore_factorized(model, state, prefix),
            "levels": restore_levels(model, state, prefix),
            "masks": attach_masks_from_state_dict(model, state, prefix),
            "quantized": attach_quantization_from_state_dict(model, state, prefix),
            "token_pruned_blocks": restore_token_pruning(model, state, prefix),
            "token_selectors": restore_soft_tokens(model, state, prefix)}
