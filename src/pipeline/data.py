"""DataModules: Fashion-MNIST, digits, CIFAR-10/100, ImageNet (ImageFolder) and synthetic tensors.

Small datasets are held in memory as uint8 tensors; augmentation (random crop with padding and
horizontal flip) and the step to the network's input (normalisation, or block DCT:
:mod:`compress_run.pipeline.network_input`) run batch-wise in ``on_after_batch_transfer``. DCT inputs of the
unaugmented splits (validation, test, and train without augmentation) are computed once and kept. All randomness of the
training data (order and augmentation) is a function of (seed, epoch), so a stage resumed from an
epoch checkpoint sees exactly the batches an uninterrupted run would.
The validation split is carved from the train split with ``split_seed`` (same for every run seed).
"""

from __future__ import annotations

import gzip
import os
import pickle
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from compress_run.core.errors import UserError
from compress_run.pipeline.network_input import NetworkInput, resize

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


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
    batch held without the dataset returning indices.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0
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
        return perm[~self.excluded[perm]]

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


class BaseDataModule(L.LightningDataModule):
    """Shared logic: split, loaders, batch-wise augmentation/normalisation for uint8 tensors."""

    crop_pad = 0
    flip = False

    def __init__(self, root: str | None, num_classes: int, in_channels: int, image_size: int,
                 val_fraction: float, split_seed: int, num_workers: int, augment: bool, download: bool,
                 mean: list[float], std: list[float], batch_size: int = 128, eval_batch_size: int = 512,
                 seed: int = 0, input_domain: str = "spatial", input_size: int | None = None, dct_block: int = 8,
                 dct_upsample: int = 1, dct_channels: Any = None) -> None:
        super().__init__()
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
        return EpochSeededSampler(num_samples, self.seed)

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
        self.test_set = test
        if not spatial:  # per-channel statistics from a seeded sample of unaugmented train images
            pick = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(self.split_seed))
            sample = torch.stack([eval_full[train_idx[i]][0] for i in pick[:IMAGENET_STATS_IMAGES].tolist()])
            self.network_input.fit_statistics(sample)

    def _make_sampler(self, num_samples: int, generator: torch.Generator) -> Sampler[int]:
        return _ReseedingSampler(num_samples, self.seed, generator)

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

    def __init__(self, num_samples: int, seed: int, generator: torch.Generator) -> None:
        super().__init__(num_samples, seed)
        self.generator = generator

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.generator.manual_seed(_mix(self.seed, epoch, 4))
