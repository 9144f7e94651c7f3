"""Block-DCT image representation (Xu, Qin, Sun, Wang, Chen, Ren, "Learning in the Frequency Domain", CVPR 2020):
JPEG's own view of an image. Colour images go to YCbCr (JPEG's full-range BT.601 conversion), each channel is cut
into ``block x block`` tiles, and each tile gets an orthonormal 2-D DCT-II. Coefficient (u, v) of every tile,
laid out over the tile grid, becomes one *frequency channel*: an image of ``C x H x W`` becomes
``C·block² x H/block x W/block``, channel ``c·block² + u·block + v`` holding colour ``c``'s frequency (u, v).
Images whose sides are not multiples of the block are padded at the bottom/right by edge replication (as JPEG
encoders do), so padding adds no artificial edge frequencies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# JPEG (JFIF) full-range RGB -> YCbCr, inputs and outputs in [0, 255]
_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCBCR_OFFSET = torch.tensor([0.0, 128.0, 128.0])


def to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """(batch, 3, H, W) RGB in [0, 255] -> YCbCr in [0, 255]."""
    matrix, offset = _YCBCR.to(rgb), _YCBCR_OFFSET.to(rgb)
    return torch.einsum("oc,bchw->bohw", matrix, rgb) + offset[None, :, None, None]


def dct_matrix(size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D`` (size x size): ``D @ x`` transforms a column, ``D.T @ X`` inverts it."""
    n = torch.arange(size, dtype=torch.float64)
    matrix = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * size)) * math.sqrt(2.0 / size)
    matrix[0] /= math.sqrt(2.0)
    return matrix.to(dtype)


def padded_size(size: int, block: int) -> int:
    return -(-size // block) * block


def block_dct(images: torch.Tensor, block: int) -> torch.Tensor:
    """(batch, C, H, W) -> (batch, C·block², ceil(H/block), ceil(W/block)) frequency channels (module docstring)."""
    batch, channels, height, width = images.shape
    pad_h, pad_w = padded_size(height, block) - height, padded_size(width, block) - width
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
    rows, cols = images.shape[2] // block, images.shape[3] // block
    tiles = images.reshape(batch, channels, rows, block, cols, block)
    d = dct_matrix(block, images.dtype).to(images.device)
    coefficients = torch.einsum("un,bcynxm,vm->bcuvyx", d, tiles, d)
    return coefficients.reshape(batch, channels * block * block, rows, cols)


def inverse_block_dct(channels: torch.Tensor, colours: int, block: int) -> torch.Tensor:
    """The inverse of :func:`block_dct` (padded size): frequency channels back to (batch, colours, H, W)."""
    batch, _, rows, cols = channels.shape
    coefficients = channels.reshape(batch, colours, block, block, rows, cols)
    d = dct_matrix(block, channels.dtype).to(channels.device)
    tiles = torch.einsum("un,bcuvyx,vm->bcynxm", d, coefficients, d)
    return tiles.reshape(batch, colours, rows * block, cols * block)


def channel_frequency(index: int, block: int) -> tuple[int, int, int]:
    """(colour, u, v) of frequency channel ``index``."""
    colour, rest = divmod(index, block * block)
    return colour, *divmod(rest, block)
