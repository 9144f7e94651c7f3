"""timm DeiT-Tiny/Small/Base and smaller ViTs of the same design built from scratch (no hub access), adapted
to the dataset.

``patch_size=0`` (auto) keeps 16 for image_size >= 112 and otherwise takes the largest of 8/4/2/1 that
divides the image and leaves a grid of at least 7x7 tokens (28x28 -> 4, 32x32 -> 4, 8x8 -> 1).
``width_mult`` scales the embedding width in whole heads (head dimension kept, heads = round(width x heads)).
"""

from __future__ import annotations

import timm
from torch import nn

from compress_run.models.by_name import check_width, checked_run


def auto_patch_size(image_size: int) -> int:
    if image_size >= 112 and image_size % 16 == 0:
        return 16
    for p in (8, 4, 2, 1):
        if image_size % p == 0 and image_size // p >= 7:
            return p
    return 1


def vit(variant: str, num_classes: int, in_channels: int, image_size: int, width_mult: float = 1.0,
        patch_size: int = 0, drop_path_rate: float = 0.0, embed_dim: int | None = None, num_heads: int | None = None,
        depth: int | None = None, mlp_ratio: float | None = None) -> nn.Module:
    """timm ``variant`` from scratch; ``embed_dim``/``num_heads``/``depth``/``mlp_ratio`` (None: the variant's)
    shape a smaller transformer of the same design (the Fashion-MNIST ViT: 96 wide, 3 heads, depth 6)."""
    kwargs: dict = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels,
                    "img_size": image_size, "patch_size": patch_size or auto_patch_size(image_size),
                    "drop_path_rate": drop_path_rate}
    if embed_dim is not None:
        kwargs.update(embed_dim=embed_dim, num_heads=num_heads)
    kwargs.update({k: v for k, v in {"depth": depth, "mlp_ratio": mlp_ratio}.items() if v is not None})
    if width_mult != 1.0:
        base = timm.create_model(variant, pretrained=False)
        heads = base.blocks[0].attn.num_heads
        head_dim = base.embed_dim // heads
        heads = max(1, round(base.embed_dim * width_mult / head_dim))
        kwargs.update(embed_dim=heads * head_dim, num_heads=heads)
    return timm.create_model(variant, **kwargs)


def any_model(name: str, num_classes: int, in_channels: int, image_size: int, width_mult: float = 1.0) -> nn.Module:
    """Any timm model by name (``timm.list_models()``), from scratch (no hub), adapted to the data.

    ``num_classes`` and ``in_channels`` go to timm (``in_chans``); ``image_size`` too for models whose
    constructor takes ``img_size`` (ViT-like). No width multiplier (pick a smaller variant). A model that
    cannot be built or cannot run on ``image_size`` inputs is refused with the reason (exit 2).
    """
    if not timm.list_models(name):
        raise ValueError(f"model.name={name!r} is not a timm model (`timm.list_models('*pattern*')` lists them)")
    check_width("timm", width_mult)
    kwargs = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels}
    try:
        try:
            model = timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError:  # a constructor without img_size: convolutional, any input size
            model = timm.create_model(name, **kwargs)
    except (AssertionError, ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"timm {name} cannot be built for image_size={image_size}: {exc or type(exc).__name__}"
                         ) from exc
    return checked_run(model, f"timm {name}", in_channels, image_size)
