"""Text data for causal LMs: split by work, fixed windows, the First Folio kept with its play, bad input."""

from __future__ import annotations

import pytest
import torch

from compress_run.core.errors import UserError
from compress_run.models.causal_lm import ByteTokenizer
from compress_run.pipeline.text_data import FOLIO_OF, ShakespeareDataModule, TextDataModule, evenly_spaced
from tests.conftest import compose


def module(root, **keys) -> ShakespeareDataModule:
    cfg, _ = compose(["model=tiny_llama", f"dataset.root={root}", "dataset.seq_len=32", *keys.pop("overrides", [])])
    data = cfg.dataset
    dm = ShakespeareDataModule(root=str(root), works={k: list(v) for k, v in data.works.items()},
                               editions=keys.get("editions", "modern"), seq_len=32,
                               max_eval_sequences=keys.get("max_eval", 8))
    dm.bind_tokenizer(ByteTokenizer(), 1024, 256, "tiny_llama")
    dm.setup("fit")
    return dm


def test_windows_are_next_token_pairs_and_splits_read_disjoint_works(text_corpus):
    dm = module(text_corpus)
    x, y = dm.train_set[3]
    assert x.shape == y.shape == (32,) and x.dtype == torch.long
    assert torch.equal(x[1:], y[:-1])
    files = {split: {p.name for p in dm.files(split)} for split in ("train", "calibration", "test", "ood")}
    names = [n for s in files.values() for n in s]
    assert len(names) == len(set(names)), "a work in two splits"
    assert "hamlet_gut.txt" in files["test"] and "paradise_regained_gut.txt" in files["ood"]
    assert len(dm.test_set) == 8 and len(dm.ood_set) == 8  # capped by max_eval_sequences
    # calibration windows overlap (stride seq_len / 4): four times as many as non-overlapping ones
    stream = dm.stream("calibration")
    assert len(dm.calibration_set) == len(range(0, len(stream) - 32, 8))
    assert dm.unaugmented_train_set is dm.calibration_set


def test_the_first_folio_goes_to_its_plays_split(text_corpus):
    dm = module(text_corpus, editions="all")
    test_files = [p.name for p in dm.files("test")]
    assert "hamlet_gut_f.txt" in test_files and "twelfe-night_gut_f.txt" in test_files
    assert not any(p.name.endswith("_gut_f.txt") for p in dm.files("train"))
    assert FOLIO_OF["twelfe-night"] == "twelfth_night"


def test_eval_windows_are_spread_over_the_whole_split():
    assert evenly_spaced(list(range(0, 1000, 10)), 4) == [0, 250, 500, 750]
    assert evenly_spaced([0, 10], 4) == [0, 10]


def test_missing_texts_name_make_llm_data(tmp_path):
    data = ShakespeareDataModule(root=str(tmp_path / "nowhere"), works={"train": ["hamlet"], "calibration": ["lear"],
                                                                       "test": ["tempest"]}, seq_len=32)
    data.bind_tokenizer(ByteTokenizer(), 1024, 256, "tiny_llama")
    with pytest.raises(UserError, match="make llm-data"):
        data.setup("fit")


def test_seq_len_beyond_the_context_and_image_augmentation_are_refused(tmp_path):
    data = TextDataModule(root=str(tmp_path), works={"train": ["a.txt"]}, seq_len=2048)
    with pytest.raises(UserError, match="beyond the context"):
        data.bind_tokenizer(ByteTokenizer(), 1024, 256, "tiny_llama")
    with pytest.raises(UserError, match="image augmentation"):
        TextDataModule(root=str(tmp_path), works={}, recipe={"mixup": 0.8})


def test_a_train_glob_that_reads_a_test_file_is_refused(tmp_path):
    for name in ("a.txt", "test.txt", "valid.txt"):
        (tmp_path / name).write_text("to be or not to be " * 60)
    data = TextDataModule(root=str(tmp_path), works={"train": ["*.txt"], "calibration": ["valid.txt"],
                                                     "test": ["test.txt"]}, seq_len=16)
    data.bind_tokenizer(ByteTokenizer(), 1024, 256, "tiny_llama")
    with pytest.raises(UserError, match="would leak"):
        data.setup("fit")


def test_a_users_text_files_by_glob(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"train_{name}.txt").write_text("to be or not to be " * 60)
    (tmp_path / "valid.txt").write_text("that is the question " * 40)
    (tmp_path / "test.txt").write_text("whether tis nobler " * 40)
    data = TextDataModule(root=str(tmp_path), works={"train": ["train_*.txt"], "calibration": ["valid.txt"],
                                                     "test": ["test.txt"]}, seq_len=16)
    data.bind_tokenizer(ByteTokenizer(), 1024, 256, "tiny_llama")
    data.setup("fit")
    assert [p.name for p in data.files("train")] == ["train_a.txt", "train_b.txt"]
    assert data.ood_set is None and set(data.eval_sets()) == {"test"}
