"""GaP partitioners: consecutive groups covering every prunable layer once; by_stage, equal_params, globs."""

from __future__ import annotations

import pytest

from compress_run.core.masks import prunable_layers
from compress_run.methods.partitions import PartitionError, describe, partition
from compress_run.models import cifar_resnet, torchvision_models


def _weights(layers, group):
    return sum(layers[n].weight.numel() for n in group)


def test_resnet50_stages_match_the_paper_and_equal_params_balances_them():
    layers = prunable_layers(torchvision_models.resnet50(1000, 3, 224))
    stages = partition(layers, 4, "by_stage")
    # sparse_training.md: ResNet-50's stages are 0.21M / 1.21M / 7.08M / 14.94M weights
    assert [round(_weights(layers, g) / 1e6, 2) for g in stages] == [0.21, 1.21, 7.08, 14.94]
    balanced = partition(layers, 4, "equal_params")
    assert [n for g in balanced for n in g] == list(layers)  # consecutive, every layer once, in order
    sizes = [_weights(layers, g) for g in balanced]
    assert max(sizes) / min(sizes) < 0.5 * (14.94 / 0.21)
    assert "partition 3" in describe(layers, balanced)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 18])
def test_equal_params_gives_k_nonempty_consecutive_groups(k):
    layers = prunable_layers(cifar_resnet.resnet20(10, 3, 32))
    groups = partition(layers, k, "equal_params")
    assert len(groups) == k and all(groups)
    assert [n for g in groups for n in g] == list(layers)


def test_by_stage_and_globs_on_resnet20():
    layers = prunable_layers(cifar_resnet.resnet20(10, 3, 32))
    assert [g[0] for g in partition(layers, 3, "by_stage")] == ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"]
    with pytest.raises(PartitionError, match="by_stage finds 3 stages"):
        partition(layers, 4, "by_stage")
    groups = partition(layers, 2, ["layer1.*", "layer[23].*"])
    assert len(groups[0]) == 6 and len(groups[1]) == 12
    with pytest.raises(PartitionError, match="unmatched"):
        partition(layers, 2, ["layer1.*", "layer2.*"])
    with pytest.raises(PartitionError, match="exceeds"):
        partition(layers, 19, "equal_params")
