"""Token pruning: the real dropped-token forward, its MACs against the analytic count for the schedule, and the
dense view of the same network."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from compress_run.core.tokens import attach_token_pruning, every_token_kept, select_tokens, token_schedule
from compress_run.hardware.macs import count_macs
from compress_run.models.timm_models import vit

DIM, HEADS, DEPTH, PATCHES, CLASSES, MLP = 32, 2, 4, 16, 10, 4


def small_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return vit("deit_tiny_patch16_224", CLASSES, 1, 8, patch_size=2, embed_dim=DIM, num_heads=HEADS, depth=DEPTH)


def analytic_macs(schedule: list[dict[str, int]], hooked: set[int]) -> int:
    """Patch embedding, per block qkv + QK^T + AV (the class query over every key, each patch query over its
    ``links`` keys) + proj on its attention tokens, the class-token scores of the ``hooked`` blocks (pruning with
    timm's fused attention), fc1 + fc2 on its MLP tokens, and the head."""
    macs = PATCHES * DIM * 2 * 2 * 1 + DIM * CLASSES
    for index, row in enumerate(schedule):
        t, m, links = row["attention"], row["mlp"], row.get("links", row["attention"])
        macs += 3 * t * DIM * DIM + 2 * (t + (t - 1) * links) * DIM + t * DIM * DIM + 2 * MLP * m * DIM * DIM
        macs += t * DIM if index in hooked else 0
    return macs


@pytest.mark.parametrize("fuse", [False, True])
def test_macs_of_a_token_pruned_vit_equal_the_analytic_count_for_its_schedule(fuse):
    model = small_vit().eval()
    dense = count_macs(model, (1, 1, 8, 8)).dense
    assert dense == analytic_macs([{"attention": 17, "mlp": 17}] * DEPTH, set())
    attach_token_pruning(model, {1: 0.5, 2: 0.5}, fuse=fuse)
    schedule = token_schedule(model, PATCHES)
    # 16 patches -> 8 kept (+1 fused) -> ceil(0.5 x 9) = 5 (+1) with fusion; 16 -> 8 -> 4 without
    assert [r["mlp"] for r in schedule] == ([17, 10, 7, 7] if fuse else [17, 9, 5, 5])
    assert count_macs(model, (1, 1, 8, 8)).dense == analytic_macs(schedule, {1, 2})
    with every_token_kept(model):
        assert count_macs(model, (1, 1, 8, 8)).dense == dense
    assert count_macs(model, (1, 1, 8, 8)).dense < dense


def test_kept_tokens_are_the_most_attended_in_their_order_and_fusion_is_the_attention_weighted_sum():
    x = torch.arange(2 * 6 * 3, dtype=torch.float).reshape(2, 6, 3)
    scores = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05], [0.4, 0.1, 0.1, 0.1, 0.3]])
    out = select_tokens(x, scores, keep=0.4, fuse=True)
    assert out.shape == (2, 4, 3)
    assert torch.equal(out[0, :3], x[0, [0, 2, 4]]) and torch.equal(out[1, :3], x[1, [0, 1, 5]])
    w = torch.tensor([0.1, 0.05, 0.05])  # the dropped tokens' attention shares, summed as they are (EViT)
    assert torch.allclose(out[0, 3], (w[:, None] * x[0, [1, 3, 5]]).sum(0))


def test_pruning_keeps_parameter_names_and_a_full_keep_changes_nothing():
    model = small_vit().eval()
    x = torch.randn(3, 1, 8, 8)
    reference, names = model(x), set(model.state_dict())
    attach_token_pruning(model, {0: 1.0, 2: 0.7})
    assert set(model.state_dict()) - names == {f"blocks.{i}.token_{k}" for i in (0, 2)
                                               for k in ("keep", "fuse", "attention", "masked")}
    assert names <= set(model.state_dict())
    pruned = model(x)
    assert not torch.allclose(pruned, reference)
    with every_token_kept(model):
        assert torch.allclose(model(x), reference, atol=1e-6)


def random_links(batch: int, patches: int, count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(patches, generator=generator)[:count] for _ in range(patches)])
                        for _ in range(batch)])


@pytest.mark.parametrize("gathered", [False, True])
def test_linked_attention_keeps_the_class_row_and_column_and_each_patch_querys_links(gathered):
    """The mask of Tri-level E-ViT's attention level (ZLKong/Tri-Level-ViT, Block.forward: ``attn_mask[:, 1:, 1:] =
    attn_mask_p`` on a mask of ones): the class query attends to every token, every query to the class token, a
    patch query to its kept patch keys only; without links it is timm's attention."""
    from compress_run.core.tokens import gathered_links, linked_attention

    model = small_vit().eval()
    attn, x = model.blocks[1].attn, torch.randn(3, 17, DIM)
    links = random_links(3, 16, 5)
    form = gathered_links() if gathered else contextlib.nullcontext()
    with torch.no_grad(), form:
        assert torch.allclose(linked_attention(attn, x, None, need_probs=False)[0], attn(x), atol=1e-5)
        assert torch.allclose(linked_attention(attn, x, None, need_probs=True)[0], attn(x), atol=1e-5)
        out, probs = linked_attention(attn, x, links, need_probs=True)
        plain, _ = linked_attention(attn, x, links, need_probs=False)
        q, k, v = attn.qkv(x).reshape(3, 17, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        allowed = torch.ones(3, 17, 17, dtype=torch.bool)
        allowed[:, 1:, 1:] = torch.zeros(3, 16, 16, dtype=torch.bool).scatter(-1, links, True)
        logits = ((q * attn.scale) @ k.transpose(-2, -1)).masked_fill(~allowed[:, None], float("-inf"))
        reference_probs = logits.softmax(-1)
        reference = attn.proj((reference_probs @ v).transpose(1, 2).reshape(3, 17, DIM))
    assert torch.allclose(out, reference, atol=1e-5) and torch.allclose(plain, reference, atol=1e-5)
    assert torch.allclose(probs, reference_probs, atol=1e-6)
    assert (probs[:, :, 0] > 0).all() and (probs[:, :, :, 0] > 0).all()  # the class row and column stay whole
    assert ((probs[:, :, 1:, 1:] > 0).sum(-1) == 5).all()


def test_the_masked_and_the_gathered_linked_attention_have_the_same_gradients():
    from compress_run.core.tokens import gathered_links, linked_attention

    attn, x = small_vit().train().blocks[1].attn, torch.randn(3, 17, DIM)
    links = random_links(3, 16, 5)
    grads = []
    for form in (contextlib.nullcontext(), gathered_links()):
        attn.zero_grad()
        inputs = x.clone().requires_grad_()
        with form:
            out, probs = linked_attention(attn, inputs, links, need_probs=True)
        (out.square().sum() + probs[:, :, 0].sum() + probs[:, :, 1:, 1:].square().sum()).backward()
        grads.append([inputs.grad, attn.qkv.weight.grad.clone(), attn.proj.weight.grad.clone()])
    for masked, gathered in zip(*grads, strict=True):
        assert torch.allclose(masked, gathered, atol=1e-5)
    assert grads[0][1].abs().sum() > 0


@pytest.mark.parametrize("keep", [{}, {1: 0.5}])
def test_macs_with_an_attention_mask_equal_the_analytic_count_for_the_kept_links(keep):
    """Block 1 builds the mask (from the patch tokens it keeps), blocks 2 and 3 apply it: their patch queries
    attend to the class key and ceil(0.3 x patches) patch keys, block 0 (before the first builder) to all."""
    model = small_vit().eval()
    attach_token_pruning(model, keep, attention={1: 0.3})
    schedule = token_schedule(model, PATCHES)
    kept = 8 if keep else 16
    assert [r["links"] for r in schedule] == [17, 17] + [math.ceil(0.3 * kept) + 1] * 2
    assert [r["mlp"] for r in schedule] == [17] + [kept + 1] * 3
    assert count_macs(model, (1, 1, 8, 8)).dense == analytic_macs(schedule, set())
    with every_token_kept(model):
        assert count_macs(model, (1, 1, 8, 8)).dense == analytic_macs([{"attention": 17, "mlp": 17}] * DEPTH, set())


def test_token_fusion_with_an_attention_mask_and_dropping_tokens_under_a_mask_without_a_new_one_are_refused():
    with pytest.raises(ValueError, match="fusion"):
        attach_token_pruning(small_vit(), {1: 0.5}, fuse=True, attention={1: 0.3})
    with pytest.raises(ValueError, match="builds none itself"):
        attach_token_pruning(small_vit(), {1: 0.5, 2: 0.5}, attention={1: 0.3})


def test_a_checkpoint_of_the_former_per_block_attention_level_is_refused():
    from compress_run.core.tokens import restore_token_pruning

    model = small_vit()
    attach_token_pruning(model, {1: 0.5}, attention={1: 0.3})
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("token_masked")}
    with pytest.raises(ValueError, match="retrain"):
        restore_token_pruning(small_vit(), state)


@pytest.mark.parametrize(("keep", "message"), [({9: 0.5}, "blocks 0..3"), ({1: 0.0}, "not in (0, 1]")])
def test_impossible_schedules_are_refused(keep, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]").replace(".", r"\.")):
        attach_token_pruning(small_vit(), keep)


def test_a_model_without_class_token_blocks_is_refused():
    with pytest.raises(ValueError, match="timm VisionTransformer"):
        attach_token_pruning(torch.nn.Sequential(torch.nn.Linear(2, 2)), {0: 0.5})


def test_the_report_counts_dense_with_every_token_and_prices_the_pruned_forward_on_every_profile():
    from compress_run.hardware.profile import load_profile
    from compress_run.hardware.report import hardware_metrics

    profiles = [load_profile("host_cpu"), load_profile("a100")]
    model = small_vit().eval()
    full, _ = hardware_metrics(model, (1, 8, 8), profiles, profiles[0], batch=8, measure=False)
    attach_token_pruning(model, {1: 0.5, 2: 0.5})
    pruned, _ = hardware_metrics(model, (1, 8, 8), profiles, profiles[0], batch=8, measure=False)
    assert pruned["model/macs_dense"] == full["model/macs_dense"] == full["model/macs_effective"]
    assert pruned["model/macs_effective"] == analytic_macs(token_schedule(model, PATCHES), {1, 2})
    for name in ("host_cpu", "a100"):  # priced from the pruned forward's own ops on every profile
        assert pruned[f"latency_sim_ms/{name}"] != full[f"latency_sim_ms/{name}"]


def test_sparse_attention_is_priced_on_its_cheaper_form_per_profile_and_measured_in_the_host_profiles(monkeypatch):
    """Sparse attention runs gathered (the kept links only) or masked (every link, the rest masked out): each
    profile's simulated latency is that of the form it prices cheaper, and the host latency is timed running the
    form the host profile chose, not whichever form the eager forward happens to use."""
    import compress_run.core.tokens as tokens
    import compress_run.hardware.report as report
    from compress_run.hardware.profile import load_profile
    from compress_run.hardware.simulator import simulate
    from compress_run.hardware.trace import trace_model

    profiles = [load_profile("host_cpu"), load_profile("a100")]
    model = small_vit().eval()
    attach_token_pruning(model, {2: 0.5}, attention={1: 0.3, 2: 0.3})
    timed_forms: list[bool] = []
    monkeypatch.setattr(report, "model_latency_ms", lambda *a, **k: timed_forms.append(tokens._GATHERED_LINKS) or 1.0)
    metrics, _ = report.hardware_metrics(model, (1, 8, 8), profiles, profiles[0], batch=4, kernels="simulated")
    for profile in profiles:
        priced = {form: simulate(model, trace_model(model, (1, 1, 8, 8), gathered=form == "gathered"), profile)
                  .total_ms for form in ("gathered", "masked")}
        assert priced["gathered"] != priced["masked"]  # the two forms are priced apart
        chosen = min(priced, key=priced.get)
        assert metrics[f"latency_sim/attention_form/{profile.name}"] == chosen
        assert metrics[f"latency_sim_ms/{profile.name}"] == round(priced[chosen], 4)
    host_form = metrics["latency_sim/attention_form/host_cpu"]
    assert metrics["latency_host/attention_form"] == host_form
    assert timed_forms == [host_form == "gathered"] * 2  # batch 1 and batch 4
    assert metrics["model/macs_effective"] == analytic_macs(token_schedule(model, PATCHES), set())  # kept links
    plain, _ = report.hardware_metrics(small_vit().eval(), (1, 8, 8), profiles, profiles[0], batch=4,
                                       kernels="simulated")
    assert not any("attention_form" in key for key in plain)


def test_halving_the_tokens_of_a_deit_tiny_wide_vit_nearly_halves_its_simulated_host_latency():
    """At DeiT-Tiny width on 64 tokens the host is compute-bound and the pruned forward runs about half the
    MACs; on a tiny ViT, or on an A100 at these sizes, the selection's extra ops (scores, sort, gather) cost
    more than the MACs they save, and the simulator says so (not asserted here)."""
    from compress_run.hardware.profile import load_profile
    from compress_run.hardware.report import hardware_metrics

    torch.manual_seed(0)
    model = vit("deit_tiny_patch16_224", 10, 3, 32, patch_size=4, embed_dim=192, num_heads=3, depth=6).eval()
    host = load_profile("host_cpu")
    full, _ = hardware_metrics(model, (3, 32, 32), [host], host, batch=8, measure=False)
    attach_token_pruning(model, {1: 0.5, 3: 0.5})
    pruned, _ = hardware_metrics(model, (3, 32, 32), [host], host, batch=8, measure=False)
    macs_ratio = full["model/macs_effective"] / pruned["model/macs_effective"]
    speedup = full["latency_sim_ms/host_cpu/b8"] / pruned["latency_sim_ms/host_cpu/b8"]
    assert 1.9 < macs_ratio < 2.1 and 1.5 < speedup <= macs_ratio * 1.05


def test_a_checkpoint_gives_a_fresh_network_the_same_schedule_and_outputs():
    from compress_run.core.restore import restore_compression

    model = small_vit().eval()
    attach_token_pruning(model, {1: 0.4, 3: 0.6}, attention={1: 0.5, 3: 0.3})
    state = model.state_dict()
    fresh = small_vit().eval()
    assert restore_compression(fresh, state)["token_pruned_blocks"] == 3
    fresh.load_state_dict(state)
    x = torch.randn(2, 1, 8, 8)
    assert token_schedule(fresh, PATCHES) == token_schedule(model, PATCHES)
    assert torch.equal(fresh(x), model(x))
