"""The LLaMA-3 W8A8 paper rows (conf/table/llama3_w8a8.yaml): composed with their published values or the reason
they have none, and smoke-run end to end on a small Hugging Face LLaMA saved to disk (the hf_causal_lm path a GPU
user takes with Meta-Llama-3), on WikiText-2-shaped files."""

from __future__ import annotations

import json
import random

import pytest

from compress_run.pipeline.tables import load_table
from tests.pipeline.test_tables import compress_table


def tiny_hf_llama(directory) -> None:
    """A 2-block LLaMA and a byte-level BPE tokenizer trained on a few lines, saved as a Hugging Face model dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = ["the king and the queen speak of love and death"] * 20 + ["a b c d e f g h i j k l m n o p"] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel
                                                      .alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory)


def wikitext_files(directory) -> None:
    rng = random.Random(0)
    words = ["the", "king", "and", "queen", "speak", "of", "love", "death", "night", "day", "a", "b", "c"]
    directory.mkdir(parents=True)
    for name, lines in (("wiki.train.raw", 300), ("wiki.valid.raw", 40), ("wiki.test.raw", 60)):
        (directory / name).write_text("\n".join(" ".join(rng.choice(words) for _ in range(12))
                                                for _ in range(lines)) + "\n")


def test_every_row_has_its_published_perplexity_or_an_experiment_that_says_why():
    table = load_table("llama3_w8a8")
    published = {r.name: r.paper.get("ppl") for r in table.rows}
    assert published["llama3_8b_fp16"] == 6.138 and published["llama3_70b_smoothquant"] == 2.982
    assert sum(v is not None for v in published.values()) == 4


@pytest.mark.slow
def test_the_llama3_rows_smoke_run_on_a_small_hugging_face_llama(tmp_path, monkeypatch):
    model, data = tmp_path / "tiny-llama", tmp_path / "wikitext"
    tiny_hf_llama(model)
    wikitext_files(data)
    out = tmp_path / "table"
    # the rows read their model dirs and WikiText-2 from the environment (keys of the rows' own groups cannot be
    # given on compress-table's command line, which is composed with the default groups first)
    for name, value in (("LLAMA3_8B_DIR", model), ("LLAMA3_70B_DIR", model), ("WIKITEXT2_DIR", data)):
        monkeypatch.setenv(name, str(value))
    result = compress_table(["table=llama3_w8a8", "scale=smoke", "trainer=cpu", f"output_dir={out}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert len(rows) == 10 and all(r["seeds_done"] == 1 for r in rows), rows
    assert all(r["ppl_ours"] and r["ppl_ours"] > 1 for r in rows)
