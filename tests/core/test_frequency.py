"""Block DCT: orthonormal (energy kept, exact inverse), channel layout (colour, u, v), the DC channel is the scaled
tile mean, JPEG's YCbCr, and replicate padding to a multiple of the block."""

from __future__ import annotations

import torch

from compress_run.core.frequency import block_dct, channel_frequency, dct_matrix, inverse_block_dct, to_ycbcr


def test_the_dct_matrix_is_orthonormal_and_the_transform_keeps_energy_and_inverts_exactly():
    d = dct_matrix(8, torch.float64)
    assert torch.allclose(d @ d.T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    y = block_dct(x, 8)
    assert y.shape == (2, 192, 2, 3)
    assert torch.allclose((y ** 2).sum(), (x ** 2).sum())
    assert torch.allclose(inverse_block_dct(y, 3, 8), x, atol=1e-10)


def test_the_dc_channel_is_the_scaled_tile_mean_and_a_horizontal_cosine_lands_in_its_channel():
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64) * 255
    y = block_dct(x, 4)  # 2x2 tiles of 4x4, 16 channels
    means = x.reshape(1, 1, 2, 4, 2, 4).mean(dim=(3, 5))
    assert torch.allclose(y[:, 0:1], 4 * means)  # orthonormal 2-D DC = block x mean
    n = torch.arange(4, dtype=torch.float64)
    wave = torch.cos(torch.pi * (2 * n + 1) * 3 / 8).expand(4, 4)  # frequency v = 3 along the rows
    y = block_dct(wave.reshape(1, 1, 4, 4), 4).flatten()
    assert int(y.abs().argmax()) == 0 * 4 + 3 and channel_frequency(3, 4) == (0, 0, 3)
    assert channel_frequency(2 * 64 + 9, 8) == (2, 1, 1)


def test_ycbcr_is_jpegs_full_range_conversion():
    rgb = torch.tensor([[255.0, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]).T.reshape(1, 3, 1, 4)
    ycbcr = to_ycbcr(rgb)[0, :, 0].T
    assert torch.allclose(ycbcr[3], torch.tensor([128.0, 128, 128]), atol=1e-3)  # grey: no chroma
    assert torch.allclose(ycbcr[0], torch.tensor([76.245, 84.972, 255.5]), atol=1e-2)  # red


def test_sides_are_padded_by_replication_to_a_multiple_of_the_block():
    x = torch.ones(1, 1, 28, 28) * 7.0
    y = block_dct(x, 8)
    assert y.shape == (1, 64, 4, 4)
    assert torch.allclose(y[:, 1:], torch.zeros(1, 63, 4, 4), atol=1e-4)  # a flat image stays flat when padded
