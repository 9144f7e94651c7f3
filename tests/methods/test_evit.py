"""Tri-level E-ViT in the form of the authors' code (ZLKong/Tri-Level-ViT): tokens kept and attention masks built at
the scaled blocks and applied by the blocks after them (the network that trains and is evaluated, against an
independent rewrite of the authors' forward), the keep-rate warm-up (``adjust_keep_rate``), the example level's
swaps at the scaled epochs of the first half with statistics counted since the previous swap, and a pipeline
run whose epochs visit only the active examples and still end in validation."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from compress_run.core.tokens import token_schedule
from compress_run.hardware.macs import count_macs
from compress_run.methods.base import NotApplicable
from compress_run.methods.evit import EViT, ExampleSelector
from compress_run.models.cifar_resnet import resnet20
from compress_run.models.timm_models import vit
from compress_run.pipeline.data import EpochSeededSampler
from tests.conftest import run_pipeline

# tests/methods/test_config_keys.py: each key flipped changes the run (digits smoke, the small ViT)
CONFIG_FLIPS = {
    "token_keep": ("0.5", []), "token_blocks": ("[0]", []), "reference_depth": ("24", []),
    "fuse": ("true", ["method.attention_keep=1.0"]), "attention_keep": ("0.6", []), "reference_epochs": ("600", []),
    "keep_anneal_epochs": ("[0,0]", []), "example_holdout": ("0.4", []), "swap_epochs": ("[20]", []),
    "swap_fraction": ("0.5", []),
}
VIT = ["model=vit_fmnist", "model.embed_dim=32", "model.num_heads=2", "model.depth=2", "model.patch_size=2"]


def small_vit(depth: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    return vit("deit_tiny_patch16_224", 10, 1, 8, patch_size=2, embed_dim=32, num_heads=2, depth=depth).eval()


def test_prepare_keeps_tokens_and_builds_masks_at_the_papers_blocks_scaled_to_the_depth():
    model = small_vit()
    dense = count_macs(model, (1, 1, 8, 8)).dense
    EViT().prepare(model)  # 3, 6, 9 of 12 -> 1, 3, 4 of 6; 70% of the tokens, 30% of the patch links
    schedule = token_schedule(model, 16)
    assert [r["mlp"] for r in schedule] == [17, 13, 13, 10, 8, 8]  # patches 16 -> ceil(11.2) = 12 -> 9 -> 7
    # dense up to block 1's attention; then the class key + ceil(0.3 x 12) = 4 links, then ceil(0.3 x 9) = 3 ...
    assert [r["links"] for r in schedule] == [17, 17, 5, 5, 4, 4]
    assert count_macs(model, (1, 1, 8, 8)).dense < dense
    with pytest.raises(NotApplicable, match="timm VisionTransformer"):
        EViT().check_applicable(resnet20(10, 1, 8))


def authors_forward(model: torch.nn.Module, images: torch.Tensor, keep: float, links: float,
                    pruning_loc: list[int]) -> tuple[torch.Tensor, bool]:
    """ZLKong/Tri-Level-ViT models/models_attn_tok.py (VisionTransformerTokenAttn.forward, Block.forward,
    Attention.forward) rewritten on a timm ViT's weights: the mask starts all ones; each block's attention is
    ``(exp(a - max) * mask + eps/N) / (sum + eps)``; at a pruning block the top ``ceil(N x keep)`` patch tokens by
    head-averaged class attention stay, and the new mask keeps, per kept patch query, the patch links ``>=`` its
    ``ceil(rN x links)``-th largest head-averaged attention among the kept tokens, the class row and column whole.
    Also returns whether every mask row had more than k distinct values above the smoothing floor (no ties: the
    authors' threshold then keeps exactly k links, as our top-k does)."""
    eps, heads = 1e-6, model.blocks[0].attn.num_heads
    x = model._pos_embed(model.patch_embed(images))
    batch, tokens, dim = x.shape
    mask, untied = torch.ones(batch, tokens, tokens), True
    for i, blk in enumerate(model.blocks):
        n = x.shape[1]
        q, k, v = blk.attn.qkv(blk.norm1(x)).reshape(batch, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * blk.attn.scale
        attn = (attn - attn.max(-1, keepdim=True)[0]).exp() * mask[:, None]
        attn = (attn + eps / (n - 1)) / (attn.sum(-1, keepdim=True) + eps)
        x = x + blk.attn.proj((attn @ v).transpose(1, 2).reshape(batch, n, dim))
        if i in pruning_loc:
            cls_attn, patch_attn = attn[:, :, 0, 1:].mean(1), attn[:, :, 1:, 1:].mean(1)
            token_idx = cls_attn.topk(math.ceil((n - 1) * keep), dim=1)[1]
            x = torch.cat([x[:, :1], x[:, 1:].gather(1, token_idx[..., None].expand(-1, -1, dim))], dim=1)
            kept = token_idx.shape[1]
            p = patch_attn.gather(1, token_idx[..., None].expand(-1, -1, n - 1))
            p = p.gather(2, token_idx[:, None, :].expand(-1, kept, -1))
            count = math.ceil(kept * links)
            top = p.topk(count, dim=2)[0]
            above_floor = bool((top[..., -1] > 2 * eps).all())
            untied &= above_floor and bool(((p >= top[..., -1:]).sum(-1) == count).all())
            mask = torch.ones(batch, kept + 1, kept + 1)
            mask[:, 1:, 1:] = (p >= top[..., -1:]).float()
        x = x + blk.mlp(blk.norm2(x))
    return model.head(model.norm(x)[:, 0]), untied


@pytest.mark.parametrize("seed", [0, 1])
def test_the_network_computes_the_authors_tri_level_forward(seed):
    """The pruned network's logits equal the authors' forward (up to their 1e-6 smoothing of the softmax) with two
    mask-building blocks, at ratios where their threshold keeps exactly k links per query (where it does not, see
    the ledger: a row with fewer than k links left open ties at the smoothing floor and opens whole); with the
    attention level off both are the token level."""
    model = small_vit()
    torch.manual_seed(seed)
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        reference, untied = authors_forward(model, images, 0.9, 0.5, [1, 4])
        assert untied  # the comparison below is of the same mask
        EViT(token_keep=0.9, attention_keep=0.5, token_blocks=[3, 9]).prepare(model)  # blocks 1 and 4 of 6
        assert torch.allclose(model(images), reference, atol=1e-4)
        only_tokens = EViT(attention_keep=1.0).prepare(small_vit())
        assert torch.allclose(only_tokens(images), authors_forward(small_vit(), images, 0.7, 1.0, [1, 3, 4])[0],
                              atol=1e-4)


def authors_keep_rate(iters: int, epoch: int, iter_per_epoch: int, base: float) -> float:
    """ZLKong/Tri-Level-ViT engine.py adjust_keep_rate with WARM_UP_EPOCH = 10, TOTAL_DECAY_EPOCH = 100."""
    warmup, total = 10, 110
    if epoch < warmup:
        return 1.0
    if epoch >= total:
        return base
    decay_iters = iter_per_epoch * (total - warmup)
    iters = iters - iter_per_epoch * warmup
    return base + (1 - base) * (math.cos(iters / decay_iters * math.pi) + 1) * 0.5


def test_the_keep_rate_warm_up_is_the_authors_adjust_keep_rate_scaled_to_the_stage():
    method, per_epoch = EViT(), 7
    for epoch in (0, 9, 10, 11, 60, 109, 110, 200):
        for step in (0, 3, 6):
            anneal = method.anneal(epoch + step / per_epoch, 300)
            for base in (0.7, 0.3):
                expected = authors_keep_rate(epoch * per_epoch + step, epoch, per_epoch, base)
                assert base + (1 - base) * anneal == pytest.approx(expected, abs=1e-9)
    assert method.anneal(0.2, 9) == 1.0 and method.anneal(0.3, 9) == 1.0  # 10/300 of 9 epochs = 0.3
    assert method.anneal(1.8, 9) == pytest.approx(0.5) and method.anneal(3.3, 9) == 0.0


def test_the_swaps_run_at_the_authors_epochs_in_the_first_half_scaled_to_the_stage():
    method = EViT()
    assert method.scaled_swap_epochs(300) == [30, 60, 90, 120, 150]
    assert method.scaled_swap_epochs(9) == [1, 2, 3, 4, 5]  # 0.9, 1.8, 2.7, 3.6, 4.5 rounded half up
    assert method.scaled_swap_epochs(2) == [1]
    assert method.swap_fraction == 0.25 and method.example_holdout == 0.2  # README: --remove-n 64058 of 256233


def test_a_swap_trades_the_least_forgotten_active_examples_for_held_out_ones():
    method = EViT(example_holdout=0.2, swap_fraction=0.5)
    sampler = EpochSeededSampler(20, seed=0)
    selector = ExampleSelector(method)
    method.held_out = [0, 1, 2, 3]
    sampler.exclude(torch.tensor(method.held_out))
    selector.forgotten = torch.arange(20).flip(0)  # example 19 forgotten least ... 4 most among the active
    selector.learned = torch.ones(20, dtype=torch.bool)
    selector.learned[19] = False  # never learned: counts as the most forgotten
    selector.last_correct = torch.ones(20, dtype=torch.bool)
    selector.swap(sampler, epoch=3)
    assert set(method.held_out) - {0, 1, 2, 3} == {17, 18}  # the two least forgotten of the learned active ones
    assert len(method.held_out) == 4 and len(set(method.held_out) & {0, 1, 2, 3}) == 2
    assert set(torch.nonzero(sampler.excluded).flatten().tolist()) == set(method.held_out)
    assert method.swaps == [{"epoch": 3, "swapped": 2}]
    # the statistics start again after a swap (the authors' example_stats_train = {}): the next window's own
    assert not selector.forgotten.any() and not selector.learned.any() and not selector.last_correct.any()


class ValidationSpy(L.Callback):
    def __init__(self) -> None:
        self.train_batches: dict[int, int] = {}
        self.validated: list[int] = []
        self.anneal: list[float] = []
        self.anneal_at_validation: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.anneal.append(pl_module.net.blocks[1].token_anneal)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_batches[trainer.current_epoch] = batch_idx + 1

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated.append(trainer.current_epoch)
            self.anneal_at_validation.append(pl_module.net.blocks[1].token_anneal)


def test_pipeline_epochs_visit_only_the_active_examples_swap_on_schedule_and_validate(tmp_path, monkeypatch):
    spy, original = ValidationSpy(), EViT.training_callbacks
    monkeypatch.setattr(EViT, "training_callbacks", lambda self, stage, model: [
        *original(self, stage, model), *([spy] if stage == "train" else [])])
    args = ["dataset=digits", "debug=smoke", "logger=none", "evaluate.measure_latency=false", *VIT, "method=evit",
            "schedule.train.epochs=3", "trainer.limit_train_batches=null",
            "schedule.train.epoch_fraction=1.0", "schedule.batch_size=128"]
    results = run_pipeline(args, tmp_path)
    report, m = results["method"], results["metrics"]
    held, active = report["examples_held_out"], report["epoch_examples"]
    assert active == [active[0]] * 3 and held == round(0.2 * (active[0] + held))  # every epoch, swaps included
    full_epoch = (active[0] + held) // 128
    assert spy.train_batches == {epoch: active[0] // 128 for epoch in range(3)} and active[0] // 128 < full_epoch
    assert spy.validated == [0, 1, 2]  # Lightning sized the epochs at the full set: they still end in validation
    # 30..150 of 300 epochs scaled to 3: 0.3, 0.6, 0.9, 1.2, 1.5 -> before epochs 1 and 2
    assert report["swap_epochs_scaled"] == [1, 2]
    assert report["swaps"] == [{"epoch": 1, "swapped": round(0.25 * held)}, {"epoch": 2, "swapped": round(0.25 * held)}]
    # the ratios warm up (10/300 of 3 epochs at full keep, a cosine until 1.1 epochs) and validate at their values
    assert spy.anneal[0] == 1.0 and spy.anneal[-1] == 0.0 and 0.0 < max(a for a in spy.anneal if a < 1.0) < 1.0
    assert spy.anneal_at_validation == [0.0, 0.0, 0.0]
    assert m["model/macs_effective"] < m["model/macs_dense"]
