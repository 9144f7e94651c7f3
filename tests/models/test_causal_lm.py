"""Causal language models: the wrapper's forward and KV-cache decode, the byte tokenizer, missing models."""

from __future__ import annotations

import pytest
import torch

from compress_run.models.causal_lm import ByteTokenizer, CausalLM, hf_causal_lm, is_causal_lm, tiny_llama


def small() -> CausalLM:
    torch.manual_seed(0)
    return tiny_llama(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64, context_length=64)


def test_tiny_llama_maps_tokens_to_next_token_logits_over_bytes():
    net = small()
    assert is_causal_lm(net) and not net.pretrained and net.vocab_size == 256 and net.context_length == 64
    logits = net(torch.randint(0, 256, (3, 10)))
    assert logits.shape == (3, 10, 256)
    info = net.describe()
    assert info["layers"] == 2 and info["kv_heads"] == 1 and info["tied_embeddings"]
    assert net.lm.lm_head.weight is net.lm.model.embed_tokens.weight


def test_decoding_against_the_cache_gives_the_full_forwards_logits():
    net = small().eval()
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = net(tokens)
        cache = net.prefill(tokens[:, :-1])
        step = net.decode_step(tokens[:, -1:], cache)
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("Thou art — fair")
    assert max(ids) < 256 and tok.decode(ids) == "Thou art — fair"


def test_a_missing_model_names_how_to_get_it(tmp_path):
    with pytest.raises(ValueError, match="make llm-data"):
        hf_causal_lm(str(tmp_path / "smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    with pytest.raises(ValueError, match="model.offline=false"):
        hf_causal_lm(str(tmp_path / "no-such-model"))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of model.heads"):
        tiny_llama(hidden_size=30, heads=4)


def test_a_saved_hugging_face_model_loads_offline_and_every_copy_trains(tmp_path):
    """hf_causal_lm reads a local dir without a hub; the shared original (the KL reference) leaves later copies of
    the cached load trainable (a finetune after pruning trains them)."""
    from compress_run.models.causal_lm import pretrained_original
    from tests.pipeline.test_llm_paper_rows import tiny_hf_llama

    tiny_hf_llama(tmp_path / "m")
    first = hf_causal_lm(str(tmp_path / "m"))
    assert first.pretrained and first.tokenizer.encode("the king")
    original = pretrained_original(first)
    assert original is not None and original.lm is not first.lm
    second = hf_causal_lm(str(tmp_path / "m"))
    assert all(p.requires_grad for p in second.parameters())
    torch.testing.assert_close(second(torch.tensor([[1, 2, 3]])), original(torch.tensor([[1, 2, 3]])))
