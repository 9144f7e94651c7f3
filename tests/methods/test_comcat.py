"""COMCAT: the factorized attention equals timm's at full rank, truncation keeps the leading singular
components of each head's products, a 0/1 prefix gate equals the cut module, the search brings the
expected parameter count to the target, and the pipeline compresses and reloads a DeiT."""

from __future__ import annotations

import pytest
import timm
import torch

from compress_run.kernels.lowrank_attention import LowRankAttention, attention_products
from compress_run.methods.comcat import COMCAT, transformer_blocks
from tests.conftest import run_pipeline


def _vit(variant: str = "deit_tiny_patch16_224", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(variant, pretrained=False, img_size=16, patch_size=4, num_classes=10).eval()
    with torch.no_grad():  # non-trivial biases everywhere (timm initialises them at zero)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("variant", ["deit_tiny_patch16_224", "deit_small_patch16_224"])
def test_full_rank_attention_equals_timm_attention(variant):
    model = _vit(variant)
    attn = model.blocks[0].attn
    x = torch.randn(2, 17, attn.qkv.in_features)
    low = LowRankAttention.from_attention(attn, attn.head_dim, attn.head_dim).eval()
    with torch.no_grad():
        assert torch.allclose(low(x), attn(x), rtol=1e-4, atol=1e-4)


def test_truncation_keeps_the_leading_singular_components_per_head():
    attn = _vit().blocks[1].attn
    m, n, _ = attention_products(attn)
    low = LowRankAttention.from_attention(attn, 8, 8)
    c, r = attn.qkv.in_features, 8
    for h in range(attn.num_heads):
        rows = slice(h * r, (h + 1) * r)
        a = torch.cat([low.q.weight[rows].T, low.q.bias[rows][None]]).double()   # (C+1) × r
        b = torch.cat([low.k.weight[rows].T, low.k.bias[rows][None]]).double()
        s = torch.linalg.svdvals(m[h])
        error = torch.linalg.matrix_norm(m[h] - a @ b.T) ** 2
        assert error.item() == pytest.approx((s[r:] ** 2).sum().item(), rel=1e-3)
        e = low.v.weight[rows].T.double()                                         # C × r
        f = low.o.weight[:, rows].T.double()                                      # r × C
        s2 = torch.linalg.svdvals(n[h])
        assert (torch.linalg.matrix_norm(n[h] - e @ f) ** 2).item() == pytest.approx((s2[r:] ** 2).sum().item(),
                                                                                      rel=1e-3)
    assert c == 192


def test_full_rank_model_equals_dense_and_prefix_gate_equals_cut():
    model = _vit()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        dense = model(x)
    method = COMCAT()
    choices = method.factorize(model)
    with torch.no_grad():
        assert torch.allclose(model(x), dense, rtol=1e-4, atol=1e-4)
    for c in choices:
        c.chosen = c.candidates[len(c.candidates) // 2 - 1]
        setattr(c.module, "gate_qk" if c.part == "qk" else ("gate_vo" if c.part == "vo" else "gate"), c.hard_gate())
    with torch.no_grad():
        gated = model(x)
    for c in choices:
        setattr(c.module, "gate_qk" if c.part == "qk" else ("gate_vo" if c.part == "vo" else "gate"), None)
        method.truncate(c)
    for hook in method.hooks:
        hook.remove()
    with torch.no_grad():
        assert torch.allclose(model(x), gated, rtol=1e-4, atol=1e-4)
    block = model.blocks[0]
    assert block.attn.q.out_features == block.attn.num_heads * choices[0].chosen


SEARCH_ARGS = ["dataset=digits", "model=deit_tiny", "model.patch_size=2", "debug=smoke", "logger=none",
               "method=comcat", "method.params_reduction=0.6", "method.arch_lr=0.3", "method.search_fraction=0.3",
               "method.train_fraction=0.1", "evaluate.measure_latency=false"]


def test_search_reaches_the_params_target_on_digits(tmp_path):
    results = run_pipeline(SEARCH_ARGS, tmp_path)
    m, info = results["metrics"], results["method"]
    history = [h["expected_params"] for h in info["search_history"]]
    assert history[-1] < history[0]
    assert m["model/params_reduction"] >= 0.5
    assert all(isinstance(v, list) for v in info["ranks"].values())
    again = run_pipeline([*SEARCH_ARGS, "evaluate.breakdown=3"], tmp_path)
    assert again["metrics"]["test/acc"] == m["test/acc"]


def test_not_applicable_to_cnns(tmp_path):
    with pytest.raises(Exception, match="COMCAT is for ViTs"):
        run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "method=comcat"], tmp_path)


def test_blocks_found_in_timm_vits():
    assert len(transformer_blocks(_vit())) == 12
