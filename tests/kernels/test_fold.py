"""Batch-norm folding for the executed form: same function, fewer modules, refused when it would not be."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress_run.core.frequency_input import select_channels
from compress_run.core.masks import attach_mask, get_mask
from compress_run.kernels.fold import fold_batchnorm
from compress_run.methods.l1_filter import L1Filter
from compress_run.models import cifar_resnet


def _with_statistics(net: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize("form", ["dense", "compacted", "input_selection"])
def test_a_resnet_folds_every_batch_norm_and_computes_the_same(form):
    torch.manual_seed(0)
    net = cifar_resnet.resnet20(10, 3, 32).eval()
    if form == "compacted":  # compacted conv/BN subclasses and the option-A shortcut's gather
        method = L1Filter(target="flops", flops_reduction=0.5)
        method.input_shape = (3, 32, 32)
        net = method.compress(net, None)
    if form == "input_selection":  # the root's input hook, which fx tracing leaves out, still narrows the input
        select_channels(net, [0, 2], (3, 32, 32))
    net = _with_statistics(net)
    x = torch.randn(4, 3, 32, 32)
    folded, note = fold_batchnorm(net, x[:2])
    assert note == "folded 19 of 19 batch norms"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(copy.deepcopy(folded)(x), net(x), rtol=1e-4, atol=1e-4)  # kernels copy it
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the original is left as it was


def test_masks_survive_folding_and_zeros_stay_zero():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    mask = torch.rand(8, 3, 3, 3) > 0.7
    attach_mask(net[0], mask)
    folded, _ = fold_batchnorm(_with_statistics(net), torch.randn(2, 3, 8, 8))
    conv = folded.get_submodule("0")
    assert torch.equal(get_mask(conv), mask) and torch.all(conv.weight[~mask] == 0)


def test_a_batch_norm_after_a_sum_or_without_statistics_is_left_alone():
    class SumThenNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.norm = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.norm(self.a(x) + self.b(x))

    net = _with_statistics(SumThenNorm())
    same, note = fold_batchnorm(net, torch.randn(2, 3, 4, 4))
    assert same is net and note.startswith("not folded: no batch norm with running statistics follows")
    batch_stats = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    assert fold_batchnorm(batch_stats, torch.randn(2, 3, 4, 4))[0] is batch_stats
    linear = nn.Linear(3, 2)
    assert fold_batchnorm(linear, torch.randn(2, 3)) == (linear, "no batch norm")
