"""SPViT's soft token pruning: masked attention sees only the kept tokens, each selector appends a new package
token, the keep-probability weighted sum of the tokens it drops (PeiyanFlying/SPViT vit_l2_3keep_senet.py,
VisionTransformerDiffPruning.forward), inference really drops tokens (MACs equal the analytic count), the ratio
penalty trains the selectors toward their targets, and a checkpoint restores the selectors."""

from __future__ import annotations

import pytest
import torch

from compress_run.core.auxiliary import auxiliary_losses
from compress_run.core.soft_tokens import SoftTokenBlock, attach_soft_token_pruning, policy_attention
from compress_run.core.tokens import every_token_kept, token_schedule
from compress_run.hardware.macs import count_macs
from tests.core.test_tokens import CLASSES, DEPTH, DIM, HEADS, PATCHES, analytic_macs, small_vit


def selector_macs(patches: int) -> int:
    """One selector on ``patches`` tokens: per head LayerNorm-free linears d->d, d->d/2, d/2->d/4, d/4->2, and the
    head-importance MLP heads->heads/2->heads."""
    d, squeeze = DIM // HEADS, max(1, HEADS // 2)
    return patches * (HEADS * (d * d + d * (d // 2) + (d // 2) * (d // 4) + (d // 4) * 2) + 2 * HEADS * squeeze)


def test_masked_attention_of_a_kept_query_is_attention_over_the_kept_tokens_alone():
    model = small_vit().eval()
    attn, x = model.blocks[1].attn, torch.randn(2, 9, DIM)
    policy = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 1], [1, 1, 1, 0, 0, 1, 0, 1, 1]], dtype=torch.float)
    with torch.no_grad():
        out = policy_attention(attn, x, policy)
        for b in range(2):
            kept = policy[b].nonzero().flatten()
            alone = attn(x[b:b + 1, kept])  # timm's own attention on the kept tokens only
            assert torch.allclose(out[b, kept], alone[0], atol=1e-5)
            for i in (policy[b] == 0).nonzero().flatten().tolist():  # a dropped query: the kept tokens and itself
                seen = torch.cat([kept, torch.tensor([i])])
                assert torch.allclose(out[b, i], attn(x[b:b + 1, seen])[0, -1], atol=1e-5)


def test_inference_keeps_the_top_tokens_in_order_and_each_selector_appends_its_own_package_token():
    model = small_vit().eval()
    attach_soft_token_pruning(model, {1: 0.5, 3: 0.25})
    first, second = model.blocks[1], model.blocks[3]
    x = torch.randn(2, 1 + PATCHES, DIM)
    with torch.no_grad():
        _, keep = first.token_selector(x[:, 1:], None)
        out = first.drop_tokens(x, first.token_selector)
        assert out.shape == (2, 1 + 8 + 1, DIM)
        for b in range(2):
            order = keep[b].argsort(descending=True)
            kept, dropped = order[:8].sort().values, order[8:]
            assert torch.equal(out[b, 0], x[b, 0]) and torch.equal(out[b, 1:9], x[b, 1 + kept])
            package = (keep[b, dropped][:, None] * x[b, 1 + dropped]).sum(0)  # a sum, not normalised
            assert torch.allclose(out[b, 9], package, atol=1e-6)
        # the second selector scores the 8 patches with the package token, keeps 4 patches, passes the first
        # package on unchanged and appends its own
        y = torch.randn(2, 1 + 8 + 1, DIM)
        _, keep2 = second.token_selector(y[:, 1:], None)
        out2 = second.drop_tokens(y, second.token_selector)
    assert out2.shape == (2, 1 + 4 + 2, DIM) and torch.equal(out2[:, -2], y[:, -1])
    for b in range(2):
        dropped = keep2[b, :8].argsort(descending=True)[4:]
        assert torch.allclose(out2[b, -1], (keep2[b, dropped][:, None] * y[b, 1 + dropped]).sum(0), atol=1e-6)


def test_training_appends_a_package_token_per_selector_from_the_tokens_it_drops_alone():
    """Training form: selector s appends sum_j keep_prob_j x (dropped by s now) x token_j; tokens dropped by an
    earlier selector and the earlier package tokens do not enter it; the package tokens stay in the sequence."""
    torch.manual_seed(0)
    model = small_vit().train()
    attach_soft_token_pruning(model, {1: 0.5, 3: 0.25})
    second = model.blocks[3]
    previous = (torch.rand(2, PATCHES) < 0.6).float()
    second.token_flow.policy = previous.clone()
    x = torch.randn(2, 1 + PATCHES + 1, DIM)
    patches = x[:, 1:1 + PATCHES]
    torch.manual_seed(1)
    out = second.soft_select(x, second.token_selector)
    keep = second.token_flow.policy
    _, keep_probs = second.token_selector(x[:, 1:], torch.cat([previous, torch.ones(2, 1)], dim=1))
    assert out.shape == (2, 1 + PATCHES + 2, DIM) and torch.equal(out[:, :-1], x)
    assert bool((keep <= previous).all())
    dropped_now = previous - keep
    expected = (keep_probs[:, :PATCHES, None] * dropped_now[..., None] * patches).sum(1)
    assert torch.allclose(out[:, -1], expected, atol=1e-5)


def test_macs_of_the_dropped_token_forward_equal_the_analytic_count_and_the_dense_view_is_the_plain_vit():
    model = small_vit().eval()
    x = torch.randn(3, 1, 8, 8)
    reference, names = model(x), set(model.state_dict())
    attach_soft_token_pruning(model, {1: 0.5, 3: 0.25})
    schedule = token_schedule(model, PATCHES)
    # 16 patches -> 8 kept + class + a package token -> 4 kept (half of the 8 reaching block 3) + class + 2 packages
    assert [r["attention"] for r in schedule] == [17, 10, 10, 7]
    selectors = selector_macs(16) + selector_macs(8 + 1)  # the second selector also scores the package token
    assert count_macs(model, (1, 1, 8, 8)).dense == analytic_macs(schedule, set()) + selectors
    assert names < set(model.state_dict())  # the unpruned network's names stay; the selectors are added
    with every_token_kept(model):
        assert torch.allclose(model(x), reference, atol=1e-6)
        assert count_macs(model, (1, 1, 8, 8)).dense == analytic_macs([{"attention": 17, "mlp": 17}] * DEPTH, set())


def forward_capturing_policies(model, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's output and the kept-token policy each selector set during the forward."""
    policies = []
    original = SoftTokenBlock.soft_select

    def capture(self, x, selector):
        out = original(self, x, selector)
        policies.append(self.token_flow.policy.detach().clone())
        return out

    SoftTokenBlock.soft_select = capture
    try:
        return model(x), policies
    finally:
        SoftTokenBlock.soft_select = original


def test_training_decisions_never_revive_a_dropped_token_and_the_ratio_term_is_the_squared_gap():
    model = small_vit().train()
    attach_soft_token_pruning(model, {1: 0.5, 3: 0.25}, loss_weight=2.0)
    logits, policies = forward_capturing_policies(model, torch.randn(4, 1, 8, 8))
    assert logits.shape == (4, CLASSES)
    first, second = policies
    assert set(first.unique().tolist()) <= {0.0, 1.0} and bool((second <= first).all())
    terms = auxiliary_losses(model)
    expected = sum(1.0 * ((p.mean(1) - t) ** 2).mean() for p, t in zip(policies, (0.5, 0.25), strict=True))
    assert torch.allclose(terms["token_ratio"], expected)
    assert auxiliary_losses(model) == {}  # handed over once


def test_the_ratio_penalty_trains_the_selectors_toward_their_targets():
    torch.manual_seed(0)
    model = small_vit().train()
    attach_soft_token_pruning(model, {1: 0.2}, loss_weight=1.0)
    selector = model.blocks[1].token_selector
    selector.start_at(0.5)  # away from the target the selector starts at
    optimizer = torch.optim.Adam(selector.parameters(), lr=0.02)
    x = torch.randn(32, 1, 8, 8)

    def kept_fraction() -> float:  # of the sampled decisions, over 32 x 16 tokens
        with torch.no_grad():
            model(x)
        auxiliary_losses(model)
        return float(model.blocks[1].token_flow.policy.mean())

    before = kept_fraction()
    for _ in range(60):
        model(x)
        loss = auxiliary_losses(model)["token_ratio"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = kept_fraction()
    assert before > 0.35 and after < 0.3, (before, after)


def test_a_checkpoint_gives_a_fresh_network_the_selectors_and_the_same_outputs():
    from compress_run.core.restore import restore_compression

    model = small_vit().eval()
    attach_soft_token_pruning(model, {0: 0.6, 2: 0.3}, loss_weight=3.0, temperature=0.5)
    state = model.state_dict()
    fresh = small_vit().eval()
    assert restore_compression(fresh, state)["token_selectors"] == 2
    fresh.load_state_dict(state)
    x = torch.randn(2, 1, 8, 8)
    assert token_schedule(fresh, PATCHES) == token_schedule(model, PATCHES)
    assert torch.equal(fresh(x), model(x))
    assert float(fresh.blocks[2].token_selector.loss_weight) == 1.5


@pytest.mark.parametrize(("targets", "message"), [({1: 0.5, 2: 0.7}, "non-increasing"), ({7: 0.5}, "blocks 0..3"),
                                                  ({}, "at least one")])
def test_impossible_selector_schedules_are_refused(targets, message):
    with pytest.raises(ValueError, match=message):
        attach_soft_token_pruning(small_vit(), targets)


def test_new_selectors_start_at_their_targets():
    torch.manual_seed(0)
    model = small_vit().train()
    attach_soft_token_pruning(model, {1: 0.7, 3: 0.343})
    with torch.no_grad():
        _, policies = forward_capturing_policies(model, torch.randn(256, 1, 8, 8))
    auxiliary_losses(model)
    fractions = [float(p.mean()) for p in policies]
    assert fractions == pytest.approx([0.7, 0.343], abs=0.08), fractions
