"""Reweighted group regularization: the penalty weight of a group is 1/(||W_g||^2 + eps) over the pattern's
groups, the added gradient is 2 lambda P W, the penalty collapses small groups, and hardening keeps the
pattern's structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress_run.core.masks import get_mask
from compress_run.core.projections import as_matrix
from compress_run.methods.reweighted import Reweighted, Reweighting, group_sq_norms
from tests.conftest import run_pipeline
from tests.methods.test_admm import _module, _Net


@pytest.mark.parametrize("pattern", ["irregular", "block:4:4", "filter", "channel"])
def test_group_norms_are_constant_on_groups_and_sum_the_squares(pattern):
    w = torch.randn(32, 16, 3, 3)
    norms = group_sq_norms(w, pattern)
    if pattern == "irregular":
        assert torch.equal(norms, w**2)
    elif pattern == "filter":
        assert torch.allclose(norms[:, 0, 0, 0], (w**2).sum((1, 2, 3)))
    elif pattern == "channel":
        assert torch.allclose(norms[0, :, 0, 0], (w**2).sum((0, 2, 3)))
    else:
        matrix, sq = as_matrix(norms), as_matrix(w**2)
        assert torch.allclose(matrix[:4, :4], sq[:4, :4].sum().expand(4, 4))


def test_penalty_gradient_and_collapse_of_small_groups():
    torch.manual_seed(0)
    net = _Net()
    method = Reweighted(sparsity=0.75, pattern="block:4:4", reg_lambda=5e-3, eps=1e-3)
    callback = Reweighting(method)
    callback.reweight(net)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    callback.on_before_optimizer_step(None, _module(net), None)
    w = net.conv2.weight.detach()
    expected = 2 * 5e-3 / (group_sq_norms(w, "block:4:4") + 1e-3) * w
    assert torch.allclose(net.conv2.weight.grad, expected)

    def small_group_share() -> float:  # energy in the 75% smallest blocks
        blocks = as_matrix(group_sq_norms(net.conv2.weight, "block:4:4"))[::4, ::4].flatten().sort().values
        return float(blocks[: int(0.75 * len(blocks))].sum() / blocks.sum())

    before = small_group_share()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _epoch in range(6):
        callback.reweight(net)
        for _ in range(10):
            x, y = torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            callback.on_before_optimizer_step(None, _module(net), optimizer)
            optimizer.step()
    assert small_group_share() < 0.5 * before
    method.compress(net, None)
    mask = as_matrix(get_mask(net.conv2)).float()
    for i in range(0, mask.shape[0], 4):
        for j in range(0, mask.shape[1], 4):
            assert mask[i:i + 4, j:j + 4].min() == mask[i:i + 4, j:j + 4].max()


def test_pipeline_with_filter_groups(tmp_path):
    results = run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "method=reweighted",
                            "method.sparsity=0.5", "method.pattern=filter", "method.norm=l1",
                            "evaluate.measure_latency=false"], tmp_path)
    assert results["metrics"]["model/prunable_sparsity"] == pytest.approx(0.5, abs=0.02)
