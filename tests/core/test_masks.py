"""The shared mask core: buffers in state_dict, masked gradients, re-masking, layer selection, allocation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compress_run.core.allocation import allocate, erk
from compress_run.core.masks import (
    LayerSelectionError,
    apply_masks,
    attach_mask,
    attach_masks_from_state_dict,
    magnitude_scores,
    mask_gradients,
    masked_parameters,
    prunable_layers,
    prune_by_score,
    sparsity_report,
)
from compress_run.core.projections import irregular
from compress_run.models.cifar_resnet import resnet20


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))


def test_a_module_registered_under_two_names_is_not_tied_but_a_shared_matrix_is():
    from compress_run.core.masks import prunable_layers, tied_layers

    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    net.alias = net[0]  # one module, two names
    assert tied_layers(net) == [] and set(prunable_layers(net, [])) == {"0", "1"}
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight  # an LM head tied to its embedding
    lm = nn.ModuleDict({"embed": embedding, "head": head})
    assert tied_layers(lm) == ["head"] and prunable_layers(lm, []) == {}


def test_masks_are_buffers_that_travel_with_the_state_dict():
    model = tiny()
    mask = torch.rand(model[2].weight.shape) > 0.5
    attach_mask(model[2], mask)
    state = model.state_dict()
    assert torch.equal(state["2.weight_mask"], mask)
    fresh = tiny()
    assert attach_masks_from_state_dict(fresh, state) == 1
    fresh.load_state_dict(state)
    assert torch.equal(fresh[2].weight_mask, mask) and torch.all(fresh[2].weight[~mask] == 0)


def test_optimizer_steps_keep_masked_weights_zero_and_their_momentum_zero():
    torch.manual_seed(0)
    model = tiny()
    layers = prunable_layers(model, [])
    prune_by_score(layers, magnitude_scores(layers), 0.6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(4, 1, 8, 8)).sum().backward()
        mask_gradients(model)
        for _, p, m in masked_parameters(model):
            assert torch.all(p.grad[~m] == 0)
        opt.step()
        apply_masks(model)
    for _, p, m in masked_parameters(model):
        assert torch.all(p[~m] == 0)
        assert torch.all(opt.state[p]["momentum_buffer"][~m] == 0)


def test_prunable_layers_exclude_stem_and_classifier_by_default():
    model = resnet20(num_classes=10, in_channels=3, image_size=32)
    layers = prunable_layers(model)
    assert "conv1" not in layers and "fc" not in layers and len(layers) == 18
    assert set(prunable_layers(model, ["layer3.*"])) == {n for n, m in model.named_modules()
                                                         if isinstance(m, nn.Conv2d | nn.Linear)
                                                         and not n.startswith("layer3.")}
    with pytest.raises(LayerSelectionError, match="'layer9\\*' matches no conv/linear layer"):
        prunable_layers(model, ["layer9*"])


@pytest.mark.parametrize("shape", [(7,), (3, 5), (8, 4, 3, 3), (1, 1, 1, 1)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.93, 1.0])
def test_irregular_keeps_exactly_the_top_scores(shape, density):
    scores = torch.randn(shape).abs()
    mask = irregular(scores, density)
    k = round(density * scores.numel())
    assert mask.shape == scores.shape and int(mask.sum()) == k
    if 0 < k < scores.numel():
        assert scores[mask].min() >= scores[~mask].max()


def test_uniform_and_global_allocation():
    torch.manual_seed(0)
    scores = {"a": torch.rand(100) * 2, "b": torch.rand(400), "c": torch.rand(50) * 0.1}
    assert allocate(scores, 0.8, "uniform") == pytest.approx({"a": 0.2, "b": 0.2, "c": 0.2})
    dens = allocate(scores, 0.8, "global")
    assert sum(dens[n] * s.numel() for n, s in scores.items()) == pytest.approx(0.2 * 550)
    assert dens["a"] > dens["b"] > dens["c"] == 0.0  # one threshold: about 0.87 here


def test_erk_allocation_matches_budget_and_favours_small_layers():
    shapes = {"conv1": (16, 3, 3, 3), "conv2": (64, 16, 3, 3), "conv3": (256, 64, 3, 3), "fc": (10, 256)}
    scores = {n: torch.ones(s) for n, s in shapes.items()}
    dens = erk(scores, 0.9)
    total = sum(math.prod(s) for s in shapes.values())
    assert sum(dens[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(0.1 * total)
    assert all(0 < d <= 1 for d in dens.values())
    assert dens["conv1"] == 1.0  # raw ERK density > 1: kept dense and the rest rescaled
    assert dens["conv2"] > dens["conv3"]


def test_prune_by_score_reports_achieved_sparsity_and_report_counts():
    torch.manual_seed(0)
    model = tiny()
    layers = prunable_layers(model)  # conv 4->8 and linear 128->16
    achieved = prune_by_score(layers, magnitude_scores(layers), 0.75)
    assert set(achieved) == {"2", "5"}
    for name, module in layers.items():
        assert achieved[name] == pytest.approx(1 - round(0.25 * module.weight.numel()) / module.weight.numel())
    report = sparsity_report(model)
    masked = sum(m.weight.numel() for m in layers.values())
    kept = sum(round(0.25 * m.weight.numel()) for m in layers.values())
    assert report.params_dense == sum(p.numel() for p in model.parameters())
    assert report.params_nonzero == report.params_dense - (masked - kept)
    assert report.prunable_sparsity == pytest.approx(1 - kept / masked)


def test_pruning_again_only_shrinks_masks():
    torch.manual_seed(0)
    model = tiny()
    layers = prunable_layers(model, [])
    prune_by_score(layers, magnitude_scores(layers), 0.5)
    before = {n: m.weight_mask.clone() for n, m in layers.items()}
    prune_by_score(layers, magnitude_scores(layers), 0.8)
    for n, m in layers.items():
        assert torch.all(before[n] | ~m.weight_mask)  # new mask is a subset of the old one
