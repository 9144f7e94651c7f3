"""DataModules on tiny files written in the real on-disk formats (IDX, CIFAR pickles, ImageFolder)."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from compress_run.core.errors import UserError
from compress_run.pipeline import data as data_mod
from compress_run.pipeline.data import (
    CIFARDataModule,
    DigitsDataModule,
    EpochSeededSampler,
    FashionMNISTDataModule,
    ImageNetDataModule,
    SyntheticDataModule,
    random_crop_flip,
    read_idx,
    split_indices,
)

COMMON = {"val_fraction": 0.25, "split_seed": 0, "num_workers": 0, "augment": True, "download": False,
          "batch_size": 4, "eval_batch_size": 8, "seed": 0}


def write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def fake_fashion_mnist(root, n_train=40, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    write_idx(root / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)), gz)
    write_idx(root / "train-labels-idx1-ubyte", rng.integers(0, 10, (n_train,)), gz)
    write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)), gz)
    write_idx(root / "t10k-labels-idx1-ubyte", rng.integers(0, 10, (n_test,)), gz)


def fmnist(root, **kw):
    return FashionMNISTDataModule(root=str(root) if root else None, num_classes=10, in_channels=1, image_size=28,
                                  mean=[0.5], std=[0.5], **{**COMMON, **kw})


def test_idx_reader_roundtrip_and_truncation(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", arr, gz=False)
    assert np.array_equal(read_idx(tmp_path / "a"), arr)
    write_idx(tmp_path / "b", arr, gz=True)
    assert np.array_equal(read_idx(tmp_path / "b.gz"), arr)
    (tmp_path / "c").write_bytes((tmp_path / "a").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "c")


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_explicit_root(tmp_path, monkeypatch, gz):
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    fake_fashion_mnist(tmp_path, gz=gz)
    dm = fmnist(tmp_path)
    dm.setup("fit")
    assert len(dm.train_set) == 30 and len(dm.val_set) == 10 and len(dm.test_set) == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (4, 1, 28, 28) and y.dtype == torch.int64


def test_fashion_mnist_falls_back_to_the_debian_package_then_fails_clearly(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    debian.mkdir()
    fake_fashion_mnist(debian)
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", debian)
    assert fmnist(tmp_path / "empty").locate() == debian
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(UserError, match="apt-get install -y dataset-fashion-mnist"):
        fmnist(tmp_path / "empty").locate()


def test_fashion_mnist_download_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")

    class Offline:
        def __init__(self, *a, **k):
            raise OSError("network unreachable")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", Offline)
    with pytest.raises(UserError, match="download into .* failed .*network unreachable"):
        fmnist(tmp_path / "cache", download=True).locate()


def fake_cifar(root, classes: int, n: int = 6):
    folder, train_files, test_files, key = data_mod.CIFAR_LAYOUT[classes]
    (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(classes)
    for name in train_files + test_files:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, classes, n).tolist()}
        with open(root / folder / name, "wb") as f:
            pickle.dump(entry, f)


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_reads_python_pickle_batches(tmp_path, classes):
    fake_cifar(tmp_path, classes)
    dm = CIFARDataModule(root=str(tmp_path), num_classes=classes, in_channels=3, image_size=32,
                         mean=[0.5] * 3, std=[0.5] * 3, **COMMON)
    dm.setup("fit")
    n_train = 6 * (5 if classes == 10 else 1)
    assert len(dm.train_set) + len(dm.val_set) == n_train and len(dm.test_set) == 6
    x, _ = dm.train_set[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8


def test_imagenet_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("n01440764", "n01443537"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{cls}_{i}.JPEG", format="JPEG")
    dm = ImageNetDataModule(root=str(tmp_path), num_classes=2, in_channels=3, image_size=32,
                            mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], **COMMON)
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.val_set) == 2 and len(dm.test_set) == 4
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    # frequency input on the fly: [0, 1] pixels from the workers, the block DCT on the batch
    dct = ImageNetDataModule(root=str(tmp_path), num_classes=2, in_channels=3, image_size=32, mean=[0.5] * 3,
                             std=[0.5] * 3, input_domain="dct", dct_block=8, dct_upsample=2, **COMMON)
    dct.setup("fit")
    pixels, labels = next(iter(dct.val_dataloader()))
    assert pixels.shape == (2, 3, 32, 32) and float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0
    inputs = dct.on_after_batch_transfer((pixels, labels), 0)[0]
    assert inputs.shape == (2, 192, 8, 8) and torch.allclose(inputs, dct.network_input(pixels))
    small = ImageNetDataModule(root=str(tmp_path), num_classes=2, in_channels=3, image_size=32, mean=[0.5] * 3,
                               std=[0.5] * 3, input_size=16, **COMMON)
    small.setup("fit")
    assert small.on_after_batch_transfer(next(iter(small.val_dataloader())), 0)[0].shape == (2, 3, 16, 16)
    with pytest.raises(UserError, match="ImageNet split folder"):
        ImageNetDataModule(root=str(tmp_path / "none"), num_classes=2, in_channels=3, image_size=32,
                           mean=[0.5] * 3, std=[0.5] * 3, **COMMON).setup("fit")


def test_digits_split_is_deterministic_and_disjoint():
    kw = {**COMMON, "val_fraction": 0.1}
    a = DigitsDataModule(root=None, num_classes=10, in_channels=1, image_size=8, mean=[0.3], std=[0.4], **kw)
    b = DigitsDataModule(root=None, num_classes=10, in_channels=1, image_size=8, mean=[0.3], std=[0.4],
                         **{**kw, "seed": 123})
    a.setup(), b.setup()
    assert a.train_set.indices == b.train_set.indices and a.val_set.indices == b.val_set.indices
    assert not set(a.train_set.indices) & set(a.val_set.indices)
    assert len(a.train_set) + len(a.val_set) + len(a.test_set) == 1797
    train, val = split_indices(100, 0.2, 5)
    assert split_indices(100, 0.2, 5) == (train, val) and len(val) == 20


def test_sampler_and_augmentation_depend_only_on_seed_and_epoch():
    s = EpochSeededSampler(50, seed=3)
    s.set_epoch(2)
    first = list(s)
    s.set_epoch(0)
    s.set_epoch(2)
    assert list(s) == first and sorted(first) == list(range(50))
    s.set_epoch(3)
    assert list(s) != first
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    a = random_crop_flip(x, 2, True, torch.Generator().manual_seed(7))
    b = random_crop_flip(x, 2, True, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == x.shape


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(1 * 1 * 5 * 5, dtype=torch.float32).view(1, 1, 5, 5) + 1
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, 1, False, g)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    windows = [padded[..., i:i + 5, j:j + 5] for i in range(3) for j in range(3)]
    assert any(torch.equal(out, w) for w in windows)


def test_synthetic_shapes():
    dm = SyntheticDataModule(root=None, num_classes=4, in_channels=3, image_size=16, mean=[0.5] * 3,
                             std=[0.5] * 3, num_train=40, num_test=8, **COMMON)
    dm.setup()
    assert len(dm.train_set) == 30 and len(dm.test_set) == 8
    assert dm.test_set[0][0].shape == (3, 16, 16)
