"""timm DeiT-Tiny/Small built from scratch (no hub access), adapted to the dataset.

``patch_size=0`` (auto) keeps 16 for image_size >= 112 and otherwise takes the largest of 8/4/2/1 that
divides the image and leaves a grid of at least 7x7 tokens (28x28 -> 4, 32x32 -> 4, 8x8 -> 1).
``width_mult`` scales the embedding width in whole heads (head dimension kept, heads = round(width x heads)).
"""

from __future__ import annotations

import timm
from torch import nn


def auto_patch_size(image_size: int) -> int:
    if image_size >= 112 and image_size % 16 == 0:
        return 16
    for p in (8, 4, 2, 1):
        if image_size % p == 0 and image_size // p >= 7:
            return p
    return 1


def vit(variant: str, num_classes: int, in_channels: int, image_size: int, width_mult: float = 1.0,
        patch_size: int = 0, drop_path_rate: float = 0.0) -> nn.Module:
    kwargs: dict = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels,
                    "img_size": image_size, "patch_size": patch_size or auto_patch_size(image_size),
                    "drop_path_rate": drop_path_rate}
    if width_mult != 1.0:
        base = timm.create_model(variant, pretrained=False)
        heads = base.blocks[0].attn.num_heads
        head_dim = base.embed_dim // heads
        heads = max(1, round(base.embed_dim * width_mult / head_dim))
        kwargs.update(embed_dim=heads * head_dim, num_heads=heads)
    return timm.create_model(variant, **kwargs)
