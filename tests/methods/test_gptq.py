"""GPTQ (IST-DASLab/gptq, gptq.py ``fasterquant``): error propagation through the inverse Hessian, groups,
the sequential block order on a causal LM, refusals."""

from __future__ import annotations

import pytest
import torch

from compress_run.core.quantization import fake_quantize_weight
from compress_run.methods.gptq import GPTQConfig, gptq_quantize

# every key flipped in a real run (tests/methods/test_config_keys.py, on tiny_llama and a small corpus)
CONFIG_FLIPS = {
    "weight_bits": ("3", []), "input_bits": ("6", []), "granularity": ("group", ["quant.group_size=16"]),
    "group_size": ("16", ["quant.granularity=group"]), "calibration": ("mse", []),
    "percentile": ("90.0", ["quant.calibration=percentile"]), "activations": ("dynamic", []),
    "calib_size": ("4", []), "calib_batch_size": ("2", ["quant.calibration=mse", "quant.max_rows=16"]),
    "mixed_fraction": ("0.25", ["quant.group_size=16"]), "exclude": ("[lm.model.layers.0.mlp.down_proj]", []),
    "max_rows": ("16", ["quant.calibration=mse"]), "error_images": ("2", []),
    # per channel the lazy blocks change nothing (test_blocks_are_lazy_updates...); a group's scale is read from
    # the weight as updated when the loop reaches it, which includes this block's updates only with small blocks
    "blocksize": ("8", ["quant.granularity=group", "quant.group_size=16"]),
    "percdamp": ("0.5", []), "act_order": ("true", []),
}


def correlated_inputs(n: int = 512, cols: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    return torch.randn(n, cols, generator=g) @ mix


def test_with_an_identity_hessian_nothing_propagates_and_gptq_is_round_to_nearest():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    q, scales = gptq_quantize(w, torch.eye(64), bits=4, blocksize=16)
    torch.testing.assert_close(q, fake_quantize_weight(w, 4, "channel"))
    assert scales.shape == (16, 1)


def test_error_propagation_lowers_the_layer_output_error_below_rounding():
    x = correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    hessian = 2 * x.T @ x / len(x)
    q, _ = gptq_quantize(w, hessian, bits=3, blocksize=16)
    rtn = fake_quantize_weight(w, 3, "channel")
    gptq_error, rtn_error = (x @ (w - q).T).pow(2).sum(), (x @ (w - rtn).T).pow(2).sum()
    assert gptq_error < 0.8 * rtn_error
    # every weight sits on its row's symmetric 3-bit grid (codes -4..3 of max|w_row| / 3)
    codes = q / (w.abs().amax(1, keepdim=True) / 3)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.min() >= -4 and codes.max() <= 3


def test_groups_take_their_scale_when_the_loop_reaches_them_and_act_order_permutes_back():
    x = correlated_inputs(cols=64)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    hessian = 2 * x.T @ x / len(x)
    q, scales = gptq_quantize(w, hessian, bits=4, group_size=16, blocksize=32)
    assert scales.shape == (8, 4)
    for g in range(4):  # every group's values are on that group's grid
        codes = q[:, 16 * g: 16 * (g + 1)] / scales[:, g: g + 1]
        assert torch.allclose(codes, codes.round(), atol=1e-4)
    ordered, _ = gptq_quantize(w, hessian, bits=4, act_order=True)
    assert (x @ (w - ordered).T).pow(2).sum() < (x @ (w - fake_quantize_weight(w, 4, "channel")).T).pow(2).sum()


def test_blocks_are_lazy_updates_that_leave_a_per_channel_result_unchanged():
    x = correlated_inputs(cols=64)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    hessian = 2 * x.T @ x / len(x)
    whole, _ = gptq_quantize(w, hessian, bits=4, blocksize=64)
    blocked, _ = gptq_quantize(w, hessian, bits=4, blocksize=8)
    assert (whole != blocked).float().mean() < 0.01  # the same but for float rounding at a grid boundary


def test_a_pruned_layer_keeps_its_mask_and_the_pruned_values_are_propagated_as_error():
    x = correlated_inputs(cols=64)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    mask = (torch.rand(8, 64, generator=torch.Generator().manual_seed(6)) > 0.5).float()
    pruned = w * mask
    hessian = 2 * x.T @ x / len(x)
    q, _ = gptq_quantize(pruned, hessian, bits=4, mask=mask)
    assert torch.all(q[mask == 0] == 0)
    unmasked, _ = gptq_quantize(pruned, hessian, bits=4)
    assert (unmasked[mask == 0] != 0).any()  # without the mask, compensation fills the pruned positions


def test_dead_inputs_zero_their_weights():
    hessian = torch.eye(8)
    hessian[3, 3] = 0
    q, _ = gptq_quantize(torch.ones(2, 8), hessian, bits=8)
    assert torch.all(q[:, 3] == 0) and torch.all(q[:, 2] != 0)


@pytest.mark.parametrize("keys, fragment", [
    ({"granularity": "tensor"}, "quant.granularity"),
    ({"act_order": True, "granularity": "group"}, "quant.act_order"),
    ({"act_order": True, "mixed_fraction": 0.1}, "quant.act_order"),
    ({"weight_bits": 9}, "quant.weight_bits"),
    ({"percdamp": 1.5}, "quant.percdamp"),
])
def test_settings_gptq_cannot_honour_are_refused(keys, fragment):
    with pytest.raises(ValueError, match=fragment):
        GPTQConfig(**keys)


def test_gptq_quantizes_a_causal_lm_block_by_block(tmp_path, text_corpus):
    from tests.conftest import TINY_LLM, run_pipeline

    results = run_pipeline([*TINY_LLM, f"dataset.root={text_corpus}", "quant=gptq_w4a8", "quant.calib_size=8",
                            "quant.activations=dynamic"], tmp_path / "run")
    quant, m = results["quant"], results["metrics"]
    assert quant["kind"] == "gptq" and len(quant["gptq_loss"]) == 14 and m["quant/weight_bits"] == 4
    assert all(row["weight_bits"] == 4 for row in quant["bits_per_layer"].values())
    assert m["test/kl"] > 0 and m["test/top1_agreement"] > 0.3


def test_gptq_refuses_an_image_classifier(cli_forked):
    result = cli_forked("dataset=digits", "debug=smoke", "logger=none", "quant=gptq_w4a8")
    assert result.returncode == 2
    assert "GPTQ is built here for decoder language models" in " ".join(result.stderr.split())
