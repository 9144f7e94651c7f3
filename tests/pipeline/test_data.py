"""DataModules on tiny files written in the real on-disk formats (IDX, CIFAR pickles, ImageFolder), and DeiT's
training-data recipe (schedule.augment): per-image transforms, repeated augmentation, Mixup/CutMix."""

from __future__ import annotations

import gzip
import pickle
import struct
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchvision.transforms import InterpolationMode

from compress_run.core.errors import UserError
from compress_run.methods.calibration import calibration_batches
from compress_run.pipeline import data as data_mod
from compress_run.pipeline.data import (
    BatchMix,
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
from compress_run.pipeline.lit_module import ClassifierModule

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


def image_folder(root, n_train: int = 4, n_val: int = 2) -> None:
    """train/ and val/ ImageFolders of two classes of 40x48 noise JPEGs."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in ("n01440764", "n01443537"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    root / split / cls / f"{cls}_{i}.JPEG", format="JPEG")


def test_imagenet_image_folder(tmp_path):
    image_folder(tmp_path)
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


IMAGENET_STATS = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
DEIT = {"rand_augment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25, "mixup": 0.8, "cutmix": 1.0, "repeats": 3}


def test_deit_recipe_transforms_the_train_images_of_an_image_folder(tmp_path):
    image_folder(tmp_path, n_train=6)
    dm = ImageNetDataModule(root=str(tmp_path), num_classes=2, in_channels=3, image_size=32, recipe=DEIT,
                            **IMAGENET_STATS, **COMMON)
    dm.setup("fit")
    steps = dm.train_set.dataset.transform.transforms
    crop, flip, rand_augment, erasing = steps[0], steps[1], steps[2], steps[-1]
    # DeiT's build_transform through timm: bicubic random resized crop, flip, RandAugment, ..., random erasing
    assert crop.scale == (0.08, 1.0) and crop.interpolation == InterpolationMode.BICUBIC and flip.p == 0.5
    assert isinstance(rand_augment, RandAugment) and rand_augment.num_layers == 2
    assert all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in rand_augment.ops)
    assert "PosterizeIncreasing" in {op.name for op in rand_augment.ops}  # inc1: the increasing variants
    assert isinstance(erasing, RandomErasing) and erasing.probability == 0.25 and erasing.mode == "pixel"
    assert (erasing.min_count, erasing.max_count) == (1, 1)
    assert not any("ColorJitter" in type(t).__name__ for t in steps)  # inactive under RandAugment, as in DeiT
    assert type(dm.val_set.dataset.transform.transforms[0]).__name__ == "Resize"  # evaluation: resize + crop
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    # repeated augmentation through the sampler that E-ViT's forgetting statistics read (order/exclude/include)
    sampler = dm.train_dataloader().sampler
    assert all(hasattr(sampler, a) for a in ("order", "exclude", "include", "num_samples"))
    order = sampler.order(0)
    assert len(order) == len(sampler) == len(dm.train_set) and torch.equal(order[0:3], order[0].repeat(3))
    assert dm.batch_mix is not None


def test_deit_recipe_refuses_what_it_cannot_honour(tmp_path):
    image_folder(tmp_path)
    with pytest.raises(UserError, match="rand_augment=rand-m9-mstd0.5-inc1 is a per-image transform"):
        SyntheticDataModule(root=None, num_classes=4, in_channels=3, image_size=16, mean=[0.5] * 3,
                            std=[0.5] * 3, recipe=DEIT, **COMMON)
    fine = SyntheticDataModule(root=None, num_classes=4, in_channels=3, image_size=16, mean=[0.5] * 3, std=[0.5] * 3,
                               recipe={**DEIT, "rand_augment": None, "random_erasing": 0.0}, **COMMON)
    assert fine.batch_mix is not None and fine._make_sampler(30, torch.Generator()).repeats == 3
    for kwargs, message in (({"input_domain": "dct"}, "input_domain=dct"), ({"augment": False}, "augment=false"),
                            ({"recipe": {"rand_augment": "rand-q9"}}, "not a timm augmentation policy")):
        args = {**IMAGENET_STATS, **COMMON, "recipe": DEIT, **kwargs}
        dm = ImageNetDataModule(root=str(tmp_path), num_classes=2, in_channels=3, image_size=32, **args)
        with pytest.raises(UserError, match=message):
            dm.setup("fit")


def test_repeated_augmentation_draws_each_example_in_a_row_and_keeps_the_epoch_length():
    plain = EpochSeededSampler(10, seed=1).order(4)
    s = EpochSeededSampler(10, seed=1, repeats=3)
    s.set_epoch(4)
    # DeiT's RASampler on one replica: the permutation with every entry 3 times, cut to the epoch's length
    assert list(s) == plain.repeat_interleave(3)[:10].tolist() and len(s) == 10
    s.exclude(plain[:1])
    assert list(s) == plain[1:].repeat_interleave(3)[:9].tolist() and len(s) == 9
    s.include(plain[:1])
    assert list(s) == plain.repeat_interleave(3)[:10].tolist()


def _partner_share(mixed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per image, the fraction of pixels CutMix took from the reversed batch (every pixel is from one of the two)."""
    partner = x.flip(0)
    assert torch.all((mixed == x) | (mixed == partner))
    return ((mixed == partner) & (mixed != x))[:, 0].flatten(1).float().mean(1)


def test_batch_mix_is_timms_mixup_or_cutmix_drawn_per_seed_and_epoch():
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    original = x.clone()
    mix = BatchMix(0.8, 1.0, num_classes=4, seed=0)
    np.random.seed(123)
    outer = np.random.get_state()[1].copy()
    kinds = set()
    for epoch in range(16):
        mixed, targets = mix(x, y, epoch)
        lam = float(targets[0, 0])  # image 0 (class 0) is mixed with image 5 (class 1)
        expected = lam * F.one_hot(y, 4).float() + (1 - lam) * F.one_hot(y.flip(0), 4).float()
        assert torch.allclose(targets, expected, atol=1e-6)
        if torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6):
            kinds.add("mixup")
        else:  # CutMix: a box from the partner, lambda corrected to the box's area
            assert torch.allclose(_partner_share(mixed, x), torch.full((6,), 1 - lam), atol=1e-6)
            kinds.add("cutmix")
    assert kinds == {"mixup", "cutmix"} and torch.equal(x, original)
    assert np.array_equal(np.random.get_state()[1], outer)  # numpy's global stream is left alone
    again = BatchMix(0.8, 1.0, num_classes=4, seed=0)
    for epoch in (3, 3, 4):
        assert all(torch.equal(a, b) for a, b in zip(mix(x, y, epoch), again(x, y, epoch), strict=True))
    assert not torch.equal(again(x, y, 5)[1], again(x, y, 6)[1])
    odd_x, odd_targets = mix(x[:5], y[:5], 0)  # an odd batch: the last example stays as it is
    assert torch.equal(odd_x[4], x[4]) and torch.equal(odd_targets[4], F.one_hot(y[4], 4).float())


def test_a_mixed_batch_trains_on_deits_soft_target_loss_and_reports_accuracy_on_its_labels():
    torch.manual_seed(0)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    module = ClassifierModule(net, partial(torch.optim.SGD), lr=0.1, epochs=1, label_smoothing=0.1)
    logged: dict = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, value)
    module.batch_mix = BatchMix(0.8, 1.0, num_classes=4, seed=0)
    loss = module._step((x, y), "train")
    mixed, targets = BatchMix(0.8, 1.0, num_classes=4, seed=0)(x, y, 0)  # the same draw
    lam = float(targets[0, 0])
    with torch.no_grad():
        logits = net(mixed)
        # DeiT: SoftTargetCrossEntropy on timm's mixed targets smoothed by 0.1
        assert torch.allclose(loss, SoftTargetCrossEntropy()(logits, mixup_target(y, 4, lam, smoothing=0.1)))
        assert torch.equal(module.last_train_logits, logits)
        assert float(logged["train/acc"]) == float((logits.argmax(1) == y).float().mean())
        module.batch_mix = None
        assert torch.allclose(module._step((x, y), "train"), F.cross_entropy(net(x), y, label_smoothing=0.1))


def test_calibration_reads_the_train_split_without_train_time_augmentation(tmp_path):
    image_folder(tmp_path, n_train=6)
    dm = ImageNetDataModule(root=str(tmp_path), num_classes=2, in_channels=3, image_size=32, recipe=DEIT,
                            **IMAGENET_STATS, **COMMON)
    first, again = (calibration_batches(dm, "train", 5, 4, (3, 32, 32), seed=0, device="cpu") for _ in range(2))
    # RandAugment, erasing or a random crop would differ between the two reads; the evaluation transform does not
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    picked = torch.randperm(len(dm.train_set), generator=torch.Generator().manual_seed(0))[:5].tolist()
    centre_crops = torch.stack([dm.val_set.dataset[dm.train_set.indices[i]][0] for i in picked])
    assert torch.equal(torch.cat(first), centre_crops)
