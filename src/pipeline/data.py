"""DataModules: Fashion-MNIST, digits, CIFAR-10/100, ImageNet (ImageFolder) and synthetic tensors.

Small datasets are held in memory as uint8 tensors; augmentation (random crop with padding and
horizontal flip) and the step to the network's input (normalisation, or block DCT:
:mod:`compress_run.pipeline.network_input`) run batch-wise in ``on_after_batch_transfer``. DCT inputs of the
unaugmented splits (validation, test, and train without augmentation) are computed once and kept. All randomness of the
training data (order and augmentation) is a function of (seed, epoch), so a stage resumed from an
epoch checkpoint sees exactly the batches an uninterrupted run would.
The validation split is carved from the train split with ``split_seed`` (same for every run seed).

``recipe`` (the schedule's ``augment`` keys) adds DeiT's training-data recipe (Touvron et al., ICML 2021;
facebookresearch/deit ``main.py``, ``datasets.py: build_transform``, ``samplers.py: RASampler``), each part
through timm's implementation where one exists:

* ``rand_augment`` / ``random_erasing``: the train images go through ``timm.data.create_transform`` (random
  resized crop and flip with bicubic interpolation, the RandAugment policy, normalisation, random erasing in
  pixel mode with that probability), DeiT's ``build_transform``. Per-image transforms: ImageFolder data
  (``ImageNetDataModule``) with spatial input only; the in-memory datasets augment whole uint8 batches on the
  device and refuse them. DeiT's colour jitter (0.3) is inactive whenever RandAugment is on (timm drops it),
  and we leave it out without RandAugment too (ours).
* ``mixup`` / ``cutmix``: :class:`BatchMix` (timm's ``Mixup`` in DeiT's setting), applied by the LightningModule
  to every training batch; the targets become class probabilities.
* ``repeats``: repeated augmentation: the sampler draws each example ``repeats`` times in a row (each copy
  augmented on its own) and keeps the epoch at its number of examples, as DeiT's ``RASampler`` (which also
  rounds the epoch down to a multiple of 256 images: not here).
"""

from __future__ import annotations

import gzip
import os
import pickle
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from compress_run.core.errors import UserError
from compress_run.pipeline.network_input import NetworkInput, resize

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


RECIPE_DEFAULTS: dict[str, Any] = {"rand_augment": None, "random_erasing": 0.0, "mixup": 0.0, "cutmix": 0.0,
                                   "repeats": 1}
PER_IMAGE = ("rand_augment", "random_erasing")  # recipe keys that are per-image transforms (ImageFolder data)


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


class EpochSeededSampler(Sampler[int]):
    """Random permutation seeded by (seed, epoch); Lightning calls ``set_epoch`` before every epoch.

    ``exclude(positions)`` drops examples from later epochs (data-efficient training), ``include(positions)``
    brings excluded ones back (example swapping); ``order(epoch)``
    is the exact sequence of dataset positions an epoch visits, so callbacks can tell which examples a
    batch held without the dataset returning indices. ``repeats`` > 1: repeated augmentation (DeiT's
    ``RASampler``): every position of the permutation ``repeats`` times in a row, cut to the epoch's length.
    """

    def __init__(self, num_samples: int, seed: int, repeats: int = 1) -> None:
        self.num_samples, self.seed, self.epoch, self.repeats = num_samples, seed, 0, repeats
        self.excluded = torch.zeros(num_samples, dtype=torch.bool)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def exclude(self, positions: torch.Tensor) -> None:
        self.excluded[positions] = True

    def include(self, positions: torch.Tensor) -> None:
        self.excluded[positions] = False

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_mix(self.seed, epoch, 1))
        perm = torch.randperm(self.num_samples, generator=g)
        kept = perm[~self.excluded[perm]]
        return kept.repeat_interleave(self.repeats)[:len(kept)] if self.repeats > 1 else kept

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch).tolist())

    def __len__(self) -> int:
        return self.num_samples - int(self.excluded.sum())


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzipped or raw."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {arr.size} bytes")
    return arr.reshape(shape)


def random_crop_flip(x: torch.Tensor, pad: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Batch-wise random crop (zero padding ``pad``) and horizontal flip of an NCHW batch."""
    n, _, h, w = x.shape
    if pad:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=g)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None].to(x.device)
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :].to(x.device)
        idx = torch.arange(n, device=x.device)[:, None, None, None]
        ch = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[idx, ch, rows, cols]
    if flip:
        do_flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
        x = torch.where(do_flip[:, None, None, None], x.flip(-1), x)
    return x


class BatchMix:
    """Mixup / CutMix of a training batch: timm's ``Mixup`` as DeiT builds it (one draw per batch, probability 1;
    with both on, CutMix or Mixup with probability 1/2 each; the cut's lambda corrected to its area). The images
    are mixed with the batch reversed; the targets become lam·onehot(y) + (1 - lam)·onehot(reversed y), without
    smoothing (the loss applies label smoothing to them, which equals timm's smoothed mixed targets). timm draws
    from numpy's global generator: each (seed, epoch, rank) gets its own stream here, and the global state is left
    as it was, so the mixing of an epoch is a function of the run's seed. A batch of odd size (timm mixes pairs)
    leaves its last example unmixed."""

    def __init__(self, mixup: float, cutmix: float, num_classes: int, seed: int) -> None:
        from timm.data import Mixup

        self.mixer = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                           label_smoothing=0.0, num_classes=num_classes)
        self.num_classes, self.seed = num_classes, seed
        self._key: tuple[int, int] | None = None
        self._state: Any = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int, rank: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        even = len(x) - len(x) % 2
        if even == 0:
            return x, F.one_hot(y, self.num_classes).float()
        if self._key != (epoch, rank):
            self._key = (epoch, rank)
            self._state = np.random.RandomState(_mix(self.seed, epoch, rank, 5) % 2**32).get_state()
        outer = np.random.get_state()
        np.random.set_state(self._state)
        try:
            mixed, targets = self.mixer(x[:even].clone(), y[:even])
        finally:
            self._state = np.random.get_state()
            np.random.set_state(outer)
        if even < len(x):
            mixed = torch.cat([mixed, x[even:]])
            targets = torch.cat([targets, F.one_hot(y[even:], self.num_classes).to(targets.dtype)])
        return mixed, targets


class BaseDataModule(L.LightningDataModule):
    """Shared logic: split, loaders, batch-wise augmentation/normalisation for uint8 tensors."""

    crop_pad = 0
    flip = False
    per_image_transforms = False  # train images pass per-image transforms (the recipe's PER_IMAGE keys)

    def __init__(self, root: str | None, num_classes: int, in_channels: int, image_size: int,
                 val_fraction: float, split_seed: int, num_workers: int, augment: bool, download: bool,
                 mean: list[float], std: list[float], batch_size: int = 128, eval_batch_size: int = 512,
                 seed: int = 0, input_domain: str = "spatial", input_size: int | None = None, dct_block: int = 8,
                 dct_upsample: int = 1, dct_channels: Any = None, recipe: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.recipe = {**RECIPE_DEFAULTS, **(dict(recipe) if recipe else {})}
        per_image = [k for k in PER_IMAGE if self.recipe[k]]
        if per_image and not self.per_image_transforms:
            raise UserError(f"schedule.augment.{per_image[0]}={self.recipe[per_image[0]]} is a per-image transform, "
                            f"but {type(self).__name__} augments whole batches of in-memory images",
                            "use it with dataset=imagenet (ImageFolder), or set schedule.augment.rand_augment=null "
                            "schedule.augment.random_erasing=0")
        mixup, cutmix = float(self.recipe["mixup"]), float(self.recipe["cutmix"])
        self.batch_mix = BatchMix(mixup, cutmix, num_classes, seed) if mixup > 0 or cutmix > 0 else None
        self.root = root
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.num_workers, self.augment, self.download = num_workers, augment, download
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.network_input = NetworkInput(in_channels, image_size, self.mean, self.std, input_domain, input_size,
                                          dct_block, dct_upsample, dct_channels)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._aug_epoch: int | None = None
        self._aug_gen: torch.Generator | None = None  # created on first use: generators do not pickle for ddp_spawn

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_aug_gen"], state["_aug_epoch"] = None, None
        state["trainer"] = None  # a finished stage's trainer (and its loaders) stays behind; the new one re-attaches
        return state

    @abstractmethod
    def load_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(train images uint8 NCHW, train labels, test images, test labels)."""

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x_train, y_train, x_test, y_test = self.load_arrays()
        self._check_shapes(x_train)
        train_idx, val_idx = split_indices(len(y_train), self.val_fraction, self.split_seed)
        full = TensorDataset(x_train, y_train)
        self.train_set, self.val_set = Subset(full, train_idx), Subset(full, val_idx)
        self.test_set = TensorDataset(x_test, y_test)
        if self.network_input.domain == "dct":
            self.network_input.fit_statistics(x_train[train_idx])
            self.val_set = self._prepared(x_train[val_idx], y_train[val_idx])
            self.test_set = self._prepared(x_test, y_test)
            if not (self.augment and (self.crop_pad or self.flip)):
                self.train_set = self._prepared(x_train[train_idx], y_train[train_idx])

    @property
    def unaugmented_train_set(self) -> Dataset | None:
        """The train split as the evaluation splits see their images (calibration data). The in-memory sets hold
        unaugmented images (they augment batch-wise while training only)."""
        return self.train_set

    def _prepared(self, images: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
        """The network inputs of unaugmented images, computed once (float; batches pass through unchanged)."""
        return TensorDataset(torch.cat([self.network_input(chunk) for chunk in images.split(1000)]), labels)

    def _check_shapes(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise UserError(f"the {type(self).__name__} data has image shape {tuple(x.shape[1:])} but the "
                            f"dataset config says {expected}",
                            "set dataset.in_channels/dataset.image_size to match the files, or point "
                            "dataset.root at the right dataset")

    def _make_sampler(self, num_samples: int, generator: torch.Generator) -> Sampler[int]:
        return EpochSeededSampler(num_samples, self.seed, int(self.recipe["repeats"]))

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(_mix(self.seed, 2))
        sampler = self._make_sampler(len(dataset), generator) if train else None
        return DataLoader(dataset, batch_size=self.batch_size if train else self.eval_batch_size,
                          sampler=sampler, shuffle=False, drop_last=train and len(dataset) > self.batch_size,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=False, generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def to_network_input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images -> the network's input; a batch of prepared inputs (cached DCT, float where the
        images are uint8) passes through."""
        if x.dtype != torch.uint8 and self.network_input.domain == "dct":
            return x
        return self.network_input(x)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, torch.Tensor):  # the model summary's example input
            return batch
        x, y = batch
        trainer = self.trainer
        if trainer is not None and trainer.training and self.augment and (self.crop_pad or self.flip):
            epoch = trainer.current_epoch
            if self._aug_epoch != epoch or self._aug_gen is None:
                self._aug_gen = torch.Generator().manual_seed(_mix(self.seed, epoch, 3))
                self._aug_epoch = epoch
            x = random_crop_flip(x, self.crop_pad, self.flip, self._aug_gen)
        return self.to_network_input(x), y


def split_indices(n: int, val_fraction: float, split_seed: int) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


class FashionMNISTDataModule(BaseDataModule):
    crop_pad = 2
    flip = True

    def locate(self) -> Path:
        """dataset.root -> Debian package -> torchvision download (when online) -> clear error."""
        candidates = []
        if self.root:
            candidates += [Path(self.root), Path(self.root) / "FashionMNIST" / "raw"]
        candidates.append(DEBIAN_FASHION_MNIST)
        for d in candidates:
            if all(_idx_file(d, f) for f in FASHION_MNIST_FILES.values()):
                return d
        cache = Path(self.root or os.environ.get("COMPRESS_RUN_DATA_DIR", "data"))
        if self.download:
            try:
                from torchvision.datasets import FashionMNIST

                FashionMNIST(str(cache), train=True, download=True)
                FashionMNIST(str(cache), train=False, download=True)
                return cache / "FashionMNIST" / "raw"
            except Exception as exc:  # offline, proxy, disk: all mean "not available"
                reason = f"download into {cache} failed ({type(exc).__name__}: {str(exc)[:120]})"
        else:
            reason = "download is disabled (dataset.download=false)"
        looked = ", ".join(str(c) for c in candidates)
        raise UserError(f"Fashion-MNIST was not found (looked in {looked}; {reason})",
                        "install the Debian package with `apt-get install -y dataset-fashion-mnist`, or "
                        "set dataset.root to a folder holding train-images-idx3-ubyte(.gz), "
                        "train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)")

    def load_arrays(self):
        d = self.locate()
        try:
            arrays = {k: read_idx(_idx_file(d, f)) for k, f in FASHION_MNIST_FILES.items()}
        except (OSError, ValueError, EOFError) as exc:
            raise UserError(f"the Fashion-MNIST files in {d} are unreadable ({exc})",
                            "reinstall them (`apt-get install --reinstall dataset-fashion-mnist`) or "
                            "point dataset.root at intact IDX files") from exc
        images = {k: torch.from_numpy(arrays[k].copy()).unsqueeze(1) for k in ("train_images", "test_images")}
        labels = {k: torch.from_numpy(arrays[k].astype(np.int64)) for k in ("train_labels", "test_labels")}
        return images["train_images"], labels["train_labels"], images["test_images"], labels["test_labels"]


def _idx_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


class DigitsDataModule(BaseDataModule):
    """scikit-learn's 8x8 digits; pixel values 0..16 rescaled to uint8 0..255."""

    test_fraction = 0.2

    def load_arrays(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy((digits.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
        labels = torch.from_numpy(digits.target.astype(np.int64))
        rest, test = split_indices(len(labels), self.test_fraction, self.split_seed + 1)
        return images[rest], labels[rest], images[test], labels[test]


CIFAR_LAYOUT = {  # num_classes -> (folder, train files, test files, label key)
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    100: ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def read_cifar_batches(folder: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR python-pickle batches (the format torchvision downloads) into uint8 NCHW + labels."""
    images, labels = [], []
    for name in files:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[label_key])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


class CIFARDataModule(BaseDataModule):
    """CIFAR-10/100 (``num_classes`` picks which) from the python-pickle batches under ``root``;
    torchvision downloads them there when they are missing and ``download`` is true."""

    crop_pad = 4
    flip = True

    def load_arrays(self):
        if self.num_classes not in CIFAR_LAYOUT:
            raise UserError(f"CIFAR has 10 or 100 classes, not dataset.num_classes={self.num_classes}",
                            "use dataset=cifar10 or dataset=cifar100 without changing num_classes")
        folder_name, train_files, test_files, label_key = CIFAR_LAYOUT[self.num_classes]
        root = Path(self.root or "data")
        folder = root / folder_name
        missing = [f for f in train_files + test_files if not (folder / f).is_file()]
        if missing and self.download:
            from torchvision.datasets import CIFAR10, CIFAR100

            try:
                (CIFAR10 if self.num_classes == 10 else CIFAR100)(str(root), train=True, download=True)
                missing = []
            except Exception as exc:  # offline: report below
                missing.append(f"download failed: {type(exc).__name__}: {str(exc)[:100]}")
        if missing:
            raise UserError(f"CIFAR-{self.num_classes} could not be loaded from {folder} (missing: "
                            f"{', '.join(missing[:3])})",
                            f"put the python version of CIFAR-{self.num_classes} ({folder_name}/) under "
                            "dataset.root, or run once online with dataset.download=true")
        try:
            return (*read_cifar_batches(folder, train_files, label_key),
                    *read_cifar_batches(folder, test_files, label_key))
        except (OSError, ValueError, KeyError, pickle.UnpicklingError, EOFError) as exc:
            raise UserError(f"the CIFAR-{self.num_classes} files in {folder} are unreadable ({exc!r})",
                            "replace them with intact python-pickle batches (delete them and download again)") from exc


class SyntheticDataModule(BaseDataModule):
    """Random uint8 images with random labels (shape from the config); for tests and benchmarks only."""

    def __init__(self, *args, num_train: int = 512, num_test: int = 128, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_train, self.num_test = num_train, num_test

    def load_arrays(self):
        g = torch.Generator().manual_seed(self.split_seed + 7)
        shape = (self.in_channels, self.image_size, self.image_size)
        x = torch.randint(0, 256, (self.num_train + self.num_test, *shape), generator=g, dtype=torch.uint8)
        y = torch.randint(0, self.num_classes, (self.num_train + self.num_test,), generator=g)
        return x[: self.num_train], y[: self.num_train], x[self.num_train:], y[self.num_train:]


IMAGENET_STATS_IMAGES = 1024  # decoded train images the DCT channel statistics of an ImageFolder come from


class ImageNetDataModule(BaseDataModule):
    """ImageFolder train/val with per-sample torchvision transforms in worker processes."""

    per_image_transforms = True

    @property
    def unaugmented_train_set(self) -> Dataset | None:
        """The train split through the evaluation transform (resize, centre crop), not the train transform."""
        return getattr(self, "_unaugmented_train", None)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision import datasets
        from torchvision import transforms as T

        root = Path(self.root or "data/imagenet")
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise UserError(f"ImageNet split folder {root / split} does not exist",
                                "set dataset.root to a folder with train/<class>/*.JPEG and val/<class>/*.JPEG "
                                "(val sorted into class folders, e.g. with the usual valprep script)")
        size = self.image_size
        spatial = self.network_input.domain == "spatial"
        # DCT inputs: [0, 1] pixels from the workers, the DCT on the batch (on_after_batch_transfer)
        tensor = [T.ToTensor(), T.Normalize(self.mean.flatten().tolist(), self.std.flatten().tolist())] if spatial \
            else [T.ToTensor()]
        if any(self.recipe[k] for k in PER_IMAGE):
            train_tf = self.recipe_transform(size, spatial)
        else:
            train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *tensor]
                                 if self.augment else [T.Resize(int(size * 256 / 224)), T.CenterCrop(size), *tensor])
        eval_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), *tensor])
        train_full = datasets.ImageFolder(str(root / "train"), transform=train_tf)
        eval_full = datasets.ImageFolder(str(root / "train"), transform=eval_tf)
        test = datasets.ImageFolder(str(root / "val"), transform=eval_tf)
        if len(train_full.classes) != self.num_classes or test.classes != train_full.classes:
            raise UserError(f"ImageNet at {root} has {len(train_full.classes)} train classes and "
                            f"{len(test.classes)} val classes; dataset.num_classes={self.num_classes}",
                            "make train/ and val/ hold the same class folders, or set dataset.num_classes")
        train_idx, val_idx = split_indices(len(train_full), self.val_fraction, self.split_seed)
        self.train_set, self.val_set = Subset(train_full, train_idx), Subset(eval_full, val_idx)
        self._unaugmented_train = Subset(eval_full, train_idx)
        self.test_set = test
        if not spatial:  # per-channel statistics from a seeded sample of unaugmented train images
            pick = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(self.split_seed))
            sample = torch.stack([eval_full[train_idx[i]][0] for i in pick[:IMAGENET_STATS_IMAGES].tolist()])
            self.network_input.fit_statistics(sample)

    def recipe_transform(self, size: int, spatial: bool) -> Any:
        """DeiT's train transform (its ``build_transform``) through timm's ``create_transform``."""
        from timm.data import create_transform

        policy, erasing = self.recipe["rand_augment"], float(self.recipe["random_erasing"])
        conflict = None if self.augment else "dataset.augment=false (no train augmentation)"
        if not spatial:
            conflict = "dataset.input_domain=dct (the DCT needs raw pixels; the timm transform normalises them)"
        if conflict:
            raise UserError(f"schedule.augment asks for per-image transforms (rand_augment={policy}, "
                            f"random_erasing={erasing}) but the run has {conflict}",
                            "set schedule.augment.rand_augment=null schedule.augment.random_erasing=0")
        try:
            return create_transform(size, is_training=True, auto_augment=policy, interpolation="bicubic",
                                    color_jitter=None, re_prob=erasing, re_mode="pixel", re_count=1,
                                    mean=tuple(self.mean.flatten().tolist()), std=tuple(self.std.flatten().tolist()))
        except (AssertionError, ValueError, KeyError, IndexError) as exc:
            raise UserError(f"schedule.augment.rand_augment={policy!r} is not a timm augmentation policy ({exc!r})",
                            "use a timm policy string such as rand-m9-mstd0.5-inc1 (DeiT's), or null") from exc

    def _make_sampler(self, num_samples: int, generator: torch.Generator) -> Sampler[int]:
        return _ReseedingSampler(num_samples, self.seed, generator, int(self.recipe["repeats"]))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, torch.Tensor):  # the model summary's example input
            return batch
        x, y = batch
        if self.network_input.domain == "spatial":  # normalised by the per-sample transforms
            size = self.network_input.input_size
            return (x if size is None or size == x.shape[-1] else resize(x, size)), y
        return self.network_input(x), y


class _ReseedingSampler(EpochSeededSampler):
    """Also reseeds the loader's generator per epoch, so worker augmentation seeds depend on (seed, epoch)."""

    def __init__(self, num_samples: int, seed: int, generator: torch.Generator, repeats: int = 1) -> None:
        super().__init__(num_samples, seed, repeats)
        self.generator = generator

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.generator.manual_seed(_mix(self.seed, epoch, 4))
