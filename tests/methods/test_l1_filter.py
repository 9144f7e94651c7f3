"""L1-norm filter pruning: the same fraction of every prunable group is kept, the kept filters are the
largest by L1 norm, the network is compacted, and target=flops lands at the MAC reduction."""

from __future__ import annotations

import torch
from torch import nn

from compress_run.core.compaction import is_compacted
from compress_run.methods.channels import MacModel
from compress_run.methods.l1_filter import L1Filter
from compress_run.models.cifar_resnet import resnet20
from tests.conftest import run_pipeline


def test_keeps_the_largest_l1_filters_per_group_and_compacts():
    torch.manual_seed(0)
    model = resnet20(10, 1, 8).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)  # tells the channels apart after compaction
    method = L1Filter(sparsity=0.5)
    groups = method.groups(model)
    modules = dict(model.named_modules())
    expected, gammas = {}, {}
    for group in groups:
        l1 = sum(modules[n].weight.detach().abs().reshape(group.size, -1).sum(1) for n, _ in group.producers)
        expected[group.name] = sorted(torch.topk(l1, round(0.5 * group.size)).indices.tolist())
        gammas[group.name] = {norm: modules[norm].weight.detach().clone() for _, norm in group.producers}
    method.compress(model, None)
    assert is_compacted(model)
    after = dict(model.named_modules())
    for group in groups:
        kept = expected[group.name]
        for norm, gamma in gammas[group.name].items():
            assert torch.equal(after[norm].weight.detach(), gamma[kept]), norm


def test_flops_target_meets_the_mac_reduction(tmp_path):
    results = run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "method=l1_filter", "method.target=flops",
                            "method.flops_reduction=0.5"], tmp_path)
    metrics = results["metrics"]
    remaining = metrics["model/macs_effective"] / metrics["model/macs_dense"]
    assert 0.47 <= remaining <= 0.5
    assert metrics["model/params_original"] > metrics["model/params_dense"]
    # the keep fraction is the largest one that meets the target: a little more keeps too many MACs
    keep = results["method"]["keep_fraction"]
    model, method = resnet20(10, 1, 8), L1Filter(target="flops", flops_reduction=0.5)
    method.input_shape = (1, 8, 8)
    groups = method.groups(model)
    macs = MacModel(model, (1, 8, 8), groups)
    assert macs.macs(method.counts(groups, keep)) <= 0.5 * macs.total
    assert macs.macs(method.counts(groups, keep + 0.02)) > 0.5 * macs.total


def test_residual_groups_can_be_left_whole():
    model = resnet20(10, 1, 8)
    method = L1Filter(prune_residual=False)
    groups = method.groups(model)
    assert len(groups) == 9 and not any(g.residual for g in groups)
    assert any("residual" in reason for reason in method.skipped.values())
    method.compress(model, None)
    # the residual stream keeps its width; the inner convs (the groups that were pruned) are halved
    assert model.layer1[0].conv2.out_channels == 16 and model.layer3[2].conv2.out_channels == 64
    assert model.layer1[0].conv1.out_channels == 8 and model.layer3[2].conv1.out_channels == 32
