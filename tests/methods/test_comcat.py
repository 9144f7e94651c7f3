"""COMCAT: the factorized attention equals timm's at full rank, truncation keeps the leading singular
components of each head's products, a 0/1 prefix gate equals the cut module, the search brings the
expected parameter count to the target, and the pipeline compresses and reloads a DeiT."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import timm
import torch

from compress_run.core.auxiliary import auxiliary_losses
from compress_run.core.errors import UserError
from compress_run.core.factorized import LowRankLinear
from compress_run.core.lowrank_attention import LowRankAttention, attention_products
from compress_run.methods.comcat import COMCAT, alignment_weights, transformer_blocks
from compress_run.methods.distill import Distillation
from compress_run.pipeline.lit_module import ClassifierModule
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
    method = COMCAT(attn_ranks=[96, 192], mlp_ranks=[96, 192])  # largest candidates = full rank (deit tiny)
    choices = method.factorize(model)
    with torch.no_grad():
        assert torch.allclose(model(x), dense, rtol=1e-4, atol=1e-4)
    for c in choices:
        c.chosen = c.candidates[0]
        setattr(c.module, "gate_qk" if c.part == "qk" else ("gate_vo" if c.part == "vo" else "gate"),
                (torch.arange(c.full) < c.chosen).float())
    with torch.no_grad():
        gated = model(x)
    for c in choices:
        setattr(c.module, "gate_qk" if c.part == "qk" else ("gate_vo" if c.part == "vo" else "gate"), None)
    method.resvd(choices, {id(c): c.chosen for c in choices})
    with torch.no_grad():
        assert torch.allclose(model(x), gated, rtol=1e-4, atol=1e-4)
    block = model.blocks[0]
    assert block.attn.q.out_features == block.attn.num_heads * choices[0].chosen
    assert all(c.candidates == [c.chosen] for c in choices)   # ranks only go down: larger candidates are gone


def test_resvd_between_rank_changes_gives_the_best_truncation_of_trained_factors():
    from compress_run.core.factorized import LowRankLinear

    torch.manual_seed(0)
    low = LowRankLinear.from_linear(torch.nn.Linear(64, 48), 32)
    with torch.no_grad():  # training moves the factors off their SVD form
        low.first.weight.add_(0.3 * torch.randn_like(low.first.weight))
        low.second.weight.add_(0.3 * torch.randn_like(low.second.weight))
    product = (low.second.weight @ low.first.weight).double()
    s = torch.linalg.svdvals(product)
    prefix = (low.second.weight[:, :8] @ low.first.weight[:8]).double()  # cutting the old factors
    low.resvd(8)
    cut = (low.second.weight @ low.first.weight).double()
    best = (s[8:] ** 2).sum().item()
    assert torch.linalg.matrix_norm(product - cut).item() ** 2 == pytest.approx(best, rel=1e-4)
    assert torch.linalg.matrix_norm(product - prefix).item() ** 2 > 1.2 * best


def test_alignment_weight_follows_the_released_codes_cumulative_cosine_decay():
    weights = alignment_weights(0.5, 30)
    expected, w = [], 0.5
    for epoch in range(30):
        w = max(w * math.cos(math.pi * 0.5 * epoch / 30), 0.01)
        expected.append(w)
    assert weights == expected and weights[0] == 0.5 and weights[-1] == 0.01


def _block_outputs(net: torch.nn.Module, x: torch.Tensor, blocks=(0, 1, 10, 11)) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []
    hooks = [net.get_submodule(f"blocks.{i}").register_forward_hook(lambda _m, _a, out: outputs.append(out))
             for i in blocks]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return outputs


def test_finetune_aligns_blocks_with_its_teacher_at_the_released_constant_weight():
    teacher = _vit().eval()
    model = copy.deepcopy(teacher)
    method = COMCAT(finetune_block_weight=0.01)
    method.factorize(model)  # the finetune trains the factorized network (its largest candidate ranks here)
    assert method.training_callbacks("train", model) == [] and COMCAT().training_callbacks("finetune", model) == []
    [callback] = method.training_callbacks("finetune", model)
    module = ClassifierModule(model, partial(torch.optim.AdamW), lr=1e-4, epochs=1)
    module.distillation = Distillation(teacher, kind="hard", alpha=0.5)
    module.log = lambda *_, **__: None
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    model.train()
    student_blocks, teacher_blocks = _block_outputs(model, x), _block_outputs(teacher, x)
    # the released append_align_loss with blocks [0, 1, -2, -1] at weight 0.01 (the finetune's floor)
    pairs = zip(student_blocks, teacher_blocks, strict=True)
    expected = 0.01 * sum(torch.nn.functional.mse_loss(s, t) for s, t in pairs)
    assert expected > 0
    callback.on_fit_start(None, module)
    loss = module._step((x, y), "train")
    with torch.no_grad():
        distilled = module.distillation.loss(model(x), y, x)
    assert set(auxiliary_losses(model)) == {"block_alignment"}  # that training-mode forward's own term
    assert auxiliary_losses(model) == {}  # handed over once
    assert torch.allclose(loss, distilled + expected, atol=1e-6)
    model.eval()
    model(x)
    assert auxiliary_losses(model) == {}  # evaluation forwards add nothing
    callback.on_fit_end(None, module)
    assert "pop_auxiliary_losses" not in vars(model) and not model._forward_hooks
    assert not any(k.startswith("teacher") for k in model.state_dict())
    refusing = COMCAT(finetune_block_weight=0.01)
    refusing.distill_config = {"teacher": None, "stages": ["finetune"]}
    with pytest.raises(UserError, match="distils no finetune stage"):
        refusing.check_applicable(_vit())


def test_head_is_factorized_when_it_has_rank_candidates():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, num_classes=100)
    choices = COMCAT().factorize(model)
    assert any(c.name == "head" for c in choices) and isinstance(model.head, LowRankLinear)
    small = _vit()  # 10 classes: min(192, 10) < 64, kept dense
    assert not any(c.name == "head" for c in COMCAT().factorize(small))


def test_weight_passes_distil_through_the_shared_path_from_the_dense_model(monkeypatch):
    import compress_run.methods.comcat as comcat_module

    calls = []
    original = comcat_module.distillation_loss

    def spy(student, teacher, labels, **settings):
        calls.append(settings)
        return original(student, teacher, labels, **settings)

    monkeypatch.setattr(comcat_module, "distillation_loss", spy)
    model = _vit()
    method = COMCAT(search_epochs=1, train_fraction=0.01, block_weight=0.0)
    method.distill_config = {"kind": "hard", "alpha": 0.5, "temperature": 1.0}

    class Data:
        def train_dataloader(self):
            return [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))]

        def on_after_batch_transfer(self, batch, _):
            return batch

    method.compress(model, Data())
    assert calls and calls[0] == {"kind": "hard", "alpha": 0.5, "temperature": 1.0}


SEARCH_ARGS = ["dataset=digits", "model=deit_tiny", "model.patch_size=2", "debug=smoke", "logger=none",
               "method=comcat", "method.params_reduction=0.6", "method.arch_lr=0.3", "method.search_fraction=0.3",
               "method.train_fraction=0.1", "evaluate.measure_latency=false", "distill.kind=hard"]


def test_search_reaches_the_params_target_on_digits(tmp_path):
    results = run_pipeline(SEARCH_ARGS, tmp_path)
    m, info = results["metrics"], results["method"]
    history = [h["expected_params"] for h in info["search_history"]]
    assert history[-1] < history[0]
    assert m["model/params_reduction"] >= 0.5
    state = torch.load(tmp_path / "checkpoints" / "compress.ckpt", weights_only=False)["state_dict"]
    heads = 3  # deit_tiny
    assert state["net.blocks.0.attn.q.weight"].shape[0] == heads * info["ranks"]["blocks.0.attn.qk"][-1]
    assert state["net.blocks.0.attn.v.weight"].shape[0] == heads * info["ranks"]["blocks.0.attn.vo"][-1]
    assert state["net.blocks.0.mlp.fc1.first.weight"].shape[0] == info["ranks"]["blocks.0.mlp.fc1"][-1]
    again = run_pipeline([*SEARCH_ARGS, "evaluate.breakdown=3"], tmp_path)
    assert again["metrics"]["test/acc"] == m["test/acc"]


def test_not_applicable_to_cnns(tmp_path):
    with pytest.raises(Exception, match="COMCAT is for ViTs"):
        run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "method=comcat"], tmp_path)


def test_blocks_found_in_timm_vits():
    assert len(transformer_blocks(_vit())) == 12
