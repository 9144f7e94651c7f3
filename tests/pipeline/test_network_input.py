"""What the network is fed: block-DCT channels standardised on the train split, computed after augmentation,
the unaugmented splits computed once; spatial downsampling; the input size per image; bad settings refused."""

from __future__ import annotations

import types

import pytest
import torch

from compress_run.core.errors import UserError
from compress_run.core.frequency import block_dct
from compress_run.models.cifar_resnet import resnet20
from compress_run.pipeline.data import SyntheticDataModule, _mix, random_crop_flip
from compress_run.pipeline.network_input import adapt_network, finished_run_network, network_input_of

COMMON = {"val_fraction": 0.25, "split_seed": 0, "num_workers": 0, "augment": True, "download": False,
          "batch_size": 8, "eval_batch_size": 16, "seed": 0, "num_train": 64, "num_test": 16}


def grey(**kw):
    return SyntheticDataModule(root=None, num_classes=4, in_channels=1, image_size=12, mean=[0.5], std=[0.25],
                               **{**COMMON, **kw})


class _FashionLike(SyntheticDataModule):  # synthetic images with Fashion-MNIST's augmentation
    crop_pad, flip = 2, True


def test_dct_channels_are_standardised_on_the_train_split_and_eval_splits_are_computed_once():
    dm = grey(input_domain="dct", dct_block=4)
    dm.setup()
    assert dm.network_input.shape == (16, 3, 3)
    x = dm.train_set.tensors[0]  # no augmentation here: the train split is prepared once too
    assert x.shape == (48, 16, 3, 3)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(16), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(16), atol=1e-3)
    raw = dm.load_arrays()[2]  # the test images, as stored
    cached = dm.test_set.tensors[0]
    assert cached.dtype == torch.float32 and cached.shape == (16, 16, 3, 3)
    expected = (block_dct(raw.float(), 4) - dm.network_input.dct_mean) / dm.network_input.dct_std
    assert torch.allclose(cached, expected, atol=1e-5)
    batch = dm.on_after_batch_transfer((cached[:4], torch.zeros(4)), 0)[0]
    assert torch.equal(batch, cached[:4])  # prepared inputs pass through unchanged


def test_augmentation_acts_on_pixels_before_the_dct():
    dm = _FashionLike(root=None, num_classes=4, in_channels=1, image_size=12, mean=[0.5], std=[0.25],
                      input_domain="dct", dct_block=4, **COMMON)
    dm.setup()
    dm.trainer = types.SimpleNamespace(training=True, current_epoch=3)
    images = torch.stack([dm.train_set[i][0] for i in range(8)])
    out = dm.on_after_batch_transfer((images, torch.zeros(8)), 0)[0]
    augmented = random_crop_flip(images, 2, True, torch.Generator().manual_seed(_mix(0, 3, 3)))
    assert not torch.equal(augmented, images)
    assert torch.allclose(out, dm.network_input(augmented), atol=1e-6)


def test_colour_images_go_to_ycbcr_and_a_selection_keeps_only_its_channels():
    dm = SyntheticDataModule(root=None, num_classes=4, in_channels=3, image_size=16, mean=[0.5] * 3,
                             std=[0.5] * 3, input_domain="dct", dct_block=8, dct_upsample=2, dct_channels=[0, 64, 128],
                             **COMMON)
    dm.setup()
    assert dm.network_input.shape == (3, 4, 4)  # 16 x 2 = 32 pixels, 8x8 blocks: a 4x4 grid; Y, Cb, Cr DC
    assert dm.test_set.tensors[0].shape == (16, 3, 4, 4)
    grey_image = torch.full((1, 3, 16, 16), 100, dtype=torch.uint8)  # no colour: Y = 100, Cb = Cr = 128
    coefficients = dm.network_input.coefficients(grey_image)[0]
    assert coefficients.shape == (192, 4, 4)
    for plane, level in ((0, 100.0), (1, 128.0), (2, 128.0)):  # the DC of an 8x8 block is 8 x its mean
        assert torch.allclose(coefficients[64 * plane], torch.full((4, 4), 8 * level), atol=1e-2)
        assert coefficients[64 * plane + 1: 64 * (plane + 1)].abs().max() < 1e-2
    assert dm.network_input.size()["input/values"] == 48


def test_spatial_downsampling_averages_pixels_and_sizes_are_reported_per_image():
    dm = grey(input_size=6)
    dm.setup()
    images = torch.stack([dm.train_set[i][0] for i in range(4)])
    out = dm.on_after_batch_transfer((images, torch.zeros(4)), 0)[0]
    normalised = (images.float() / 255 - 0.5) / 0.25
    assert out.shape == (4, 1, 6, 6)
    assert torch.allclose(out, torch.nn.functional.avg_pool2d(normalised, 2), atol=1e-6)
    assert dm.network_input.size() == {"input/values": 36, "input/bytes": 36, "input/bytes_vs_image": 0.25}
    dct = grey(input_domain="dct", dct_block=4).network_input
    assert dct.size() == {"input/values": 144, "input/bytes": 288, "input/bytes_vs_image": 2.0}
    assert dct.size(selected_channels=4)["input/bytes"] == 72  # 4 channels x 3 x 3 x 2 bytes


@pytest.mark.parametrize(("keys", "message"), [
    ({"input_domain": "wavelet"}, "input_domain"),
    ({"input_domain": "dct", "input_size": 8}, "input_size resizes the spatial input"),
    ({"input_domain": "dct", "dct_block": 4, "dct_channels": [0, 16]}, r"distinct indices in \[0, 16\)"),
    ({"input_domain": "dct", "dct_channels": "/nonexistent/run"}, "not a readable frequency selection"),
])
def test_bad_input_settings_are_refused_with_the_cause(keys, message):
    with pytest.raises(UserError, match=message):
        grey(**keys)


def test_a_model_that_cannot_take_the_input_is_refused_before_training():
    from compress_run.models.timm_models import vit

    dct = grey(input_domain="dct", dct_block=4).network_input
    net = adapt_network(resnet20(4, 1, 12), dct, "resnet20")
    assert net.conv1.in_channels == 16 and net(torch.zeros(2, 16, 3, 3)).shape == (2, 4)
    with pytest.raises(UserError, match="cannot take dataset.input_domain=dct"):
        adapt_network(vit("deit_tiny_patch16_224", 4, 1, 12, patch_size=4, embed_dim=32, num_heads=2, depth=1), dct,
                      "vit_fmnist")
    small = grey(input_size=6).network_input
    with pytest.raises(UserError, match="cannot run on the network input"):
        adapt_network(vit("deit_tiny_patch16_224", 4, 1, 12, patch_size=4, embed_dim=32, num_heads=2, depth=1),
                      small, "vit_fmnist")


def test_the_config_describes_the_same_input_as_the_datamodule():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"in_channels": 3, "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                            "input_domain": "dct", "dct_block": 8, "dct_upsample": 2, "dct_channels": None})
    assert network_input_of(cfg).shape == (192, 8, 8)


def test_loading_a_finished_run_refuses_a_dir_that_is_not_one(tmp_path):
    with pytest.raises(UserError, match="not a compress-run run dir"):
        finished_run_network(tmp_path, "train.ckpt")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("model: {_target_: compress_run.models.cifar_resnet.resnet20}\n")
    with pytest.raises(UserError, match="does not exist"):
        finished_run_network(tmp_path, "finetune.ckpt")
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "model: {_target_: compress_run.models.cifar_resnet.resnet20, num_classes: 10, in_channels: 3,"
        " image_size: 32}\n"
        "dataset: {in_channels: 3, image_size: 32, mean: [0, 0, 0], std: [1, 1, 1]}\n")
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": {"net.fc.weight": torch.zeros(3, 64)}}, tmp_path / "checkpoints" / "train.ckpt")
    with pytest.raises(UserError, match="does not fit the model"):
        finished_run_network(tmp_path, "train.ckpt")
