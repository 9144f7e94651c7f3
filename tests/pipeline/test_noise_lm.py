"""A character-level LSTM language model trained and scored under noise: perplexity per SNR, and the NVM
composition (4-bit QAT weights and DAC inputs, a 4-bit ADC on every gate product in training and evaluation)."""

from __future__ import annotations

import pytest

from tests.conftest import run_pipeline

LSTM_LM = ["model=lstm_lm", "model.hidden_size=24", "model.num_layers=1", "model.embed_dim=8", "dataset.seq_len=32",
           "dataset.max_eval_sequences=4", "schedule.batch_size=8", "schedule.eval_batch_size=4",
           "schedule.train.epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
           "evaluate.measure_latency=false", "logger=none"]


def test_perplexity_under_strong_noise_rises_and_inf_is_the_clean_model(tmp_path, text_corpus):
    results = run_pipeline([*LSTM_LM, f"dataset.root={text_corpus}", "evaluate.noise_snr_db=[inf,20,-5]"], tmp_path)
    m = results["metrics"]
    assert m["noise/test_ppl/snrinf"] == pytest.approx(m["test/ppl"])
    assert m["noise/test_ppl/snr-5"] > 1.05 * m["test/ppl"]  # noise stronger than the signal costs perplexity
    assert m["noise/test_ppl/snr20"] < m["noise/test_ppl/snr-5"]
    assert (tmp_path / "noise_curve.png").is_file() and len(results["noise"]["curve"]) == 3


def test_nvm_qat_trains_with_the_adc_and_evaluates_with_it(tmp_path, text_corpus):
    results = run_pipeline([*LSTM_LM, f"dataset.root={text_corpus}", "quant=qat_w4a8", "quant.input_bits=4",
                            "quant.epochs=1", "noise=analog", "noise.snr_db=null", "noise.adc_bits=4",
                            "noise.exclude=[head]", "noise.train_stages=[quantize]",
                            "evaluate.noise_snr_db=[inf,10]"], tmp_path)
    assert results["quant"]["bits_per_layer"]["layers.0.input"]["weight_bits"] == 4
    assert results["quant"]["bits_per_layer"]["layers.0.input"]["input_bits"] == 4
    assert results["noise"]["model"]["adc_bits"] == 4 and results["noise"]["model"]["exclude"] == ["head"]
    m = results["metrics"]
    assert m["noise/test_ppl/snr10"] > m["noise/test_ppl/snrinf"]
    assert results["config"]["noise"]["train_stages"] == ["quantize"]
