"""CHEX: kept channels sum to the global budget, regrown channels come back with exactly their
pre-pruning weights and BN statistics, the regrowth ratio follows the cosine, nothing is explored after
T_max, and the compress stage leaves a physically smaller network at the channel or MAC target."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from compress_run.core.channel_graph import ChannelGroup
from compress_run.core.channel_masks import channel_mask
from compress_run.core.compaction import is_compacted
from compress_run.methods import chex as chex_module
from compress_run.methods.chex import CHEX, exploration_epochs, leverage_scores, regrowth_ratio, sample_regrowth
from compress_run.models.cifar_resnet import resnet20
from tests.conftest import run_pipeline

SMOKE = ["dataset=digits", "debug=smoke", "logger=none", "method=chex", "trainer.limit_train_batches=4"]


def _setup(sparsity: float = 0.5, delta0: float = 0.2) -> tuple[CHEX, nn.Module, list[ChannelGroup], dict]:
    torch.manual_seed(0)
    model = resnet20(10, 1, 8)
    for module in model.modules():  # distinct gammas, as after some training
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.1, 1.0)
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    method = CHEX(sparsity=sparsity, delta0=delta0)
    method.input_shape = (1, 8, 8)
    return method, model, method.groups(model), dict(model.named_modules())


def _active(groups, modules) -> dict[str, int]:
    return {g.name: int(channel_mask(g, modules).sum()) for g in groups}


def test_regrowth_ratio_follows_the_cosine_and_exploration_stops_at_t_max():
    assert regrowth_ratio(0, 10, 0.3) == pytest.approx(0.3)
    assert regrowth_ratio(5, 10, 0.3) == pytest.approx(0.15)
    assert regrowth_ratio(10, 10, 0.3) == 0.0 and regrowth_ratio(14, 10, 0.3) == 0.0
    for t in range(11):
        assert regrowth_ratio(t, 10, 0.2) == pytest.approx(0.1 * (1 + math.cos(math.pi * t / 10)))
    assert exploration_epochs(2, 7) == [2, 4, 6, 7]   # T_max itself is a step (delta = 0 there)
    assert exploration_epochs(3, 9) == [3, 6, 9]


def test_kept_channels_sum_to_the_global_budget():
    method, model, groups, modules = _setup()
    total = sum(g.size for g in groups)
    method.initial_masks(model)
    for group in groups:  # uniform S - delta0 at the start
        assert int(channel_mask(group, modules).sum()) == round(0.7 * group.size)
    record = method.explore(model, 2, 0.1)
    assert sum(_active(groups, modules).values()) == round(0.6 * total)    # S - delta after regrowth
    assert sum(record["kept"].values()) == round(0.5 * total)              # S before regrowth
    record = method.explore(model, 10, 0.0)
    active = _active(groups, modules)
    assert sum(active.values()) == round(0.5 * total) and active == record["kept"]
    assert record["regrown"] == {g.name: 0 for g in groups}


def test_allocation_across_layers_follows_bn_gamma():
    method, model, groups, modules = _setup()
    method.initial_masks(model)
    favoured = groups[3]
    for _name, norm in favoured.producers:
        modules[norm].weight.data.mul_(100)  # its channels now dominate the global ranking
    record = method.explore(model, 10, 0.0)
    assert record["kept"][favoured.name] == int(channel_mask(favoured, modules).sum())
    assert record["kept"][favoured.name] == round(0.7 * favoured.size)  # every channel still active


@torch.no_grad()
def test_regrown_channel_gets_back_its_pre_pruning_weights_and_bn_statistics():
    method, model, groups, modules = _setup()
    group = groups[2]
    (conv, norm), = group.producers
    everything = torch.ones(group.size, dtype=torch.bool)
    method.apply(group, modules, everything)
    keys = {"w": (modules[conv], "weight"), "g": (modules[norm], "weight"), "b": (modules[norm], "bias"),
            "m": (modules[norm], "running_mean"), "v": (modules[norm], "running_var")}
    before = {k: getattr(m, a)[3].clone() for k, (m, a) in keys.items()}
    pruned = everything.clone()
    pruned[3] = False
    method.apply(group, modules, pruned)
    assert (modules[conv].weight[3] == 0).all() and modules[norm].weight[3] == 0 and modules[norm].bias[3] == 0
    for m, a in keys.values():  # training goes on: every value moves (masked ones are masked again)
        getattr(m, a).add_(torch.randn_like(getattr(m, a)))
    method.apply(group, modules, everything)
    for k, (m, a) in keys.items():
        assert torch.equal(getattr(m, a)[3], before[k]), k


@torch.no_grad()
def test_exploration_regrows_channels_with_their_snapshot():
    method, model, groups, modules = _setup()
    method.initial_masks(model)
    old = {g.id: channel_mask(g, modules) for g in groups}
    snapshots = {k: v.clone() for k, v in method.snapshots.items()}
    method.explore(model, 2, 0.15)
    regrown = 0
    for group in groups:
        back = torch.nonzero(channel_mask(group, modules) & ~old[group.id]).flatten()
        for name, _ in group.producers:
            weight = modules[name].weight
            for c in back.tolist():
                assert torch.equal(weight[c], snapshots[f"{name}.weight"][c]) and weight[c].abs().sum() > 0
        regrown += len(back)
    assert regrown > 0


def test_leverage_scores_prefer_independent_columns():
    matrix = torch.zeros(6, 4)
    matrix[0, 0] = matrix[0, 1] = 1.0   # columns 0 and 1 are the same direction
    matrix[1, 2] = 0.5
    matrix[2, 3] = 0.2
    scores = leverage_scores(matrix, 3)
    assert set(torch.topk(scores, 2).indices.tolist()) == {2, 3}   # unique directions, whatever their norm
    assert scores[0] == pytest.approx(0.5) and scores[1] == pytest.approx(0.5)
    assert torch.equal(leverage_scores(torch.ones(2, 4) * torch.arange(4), 2), 2 * torch.arange(4.0))  # L1


def test_regrowth_prefers_channels_orthogonal_to_the_kept_ones():
    matrix = torch.zeros(16, 8)
    for c in range(4):
        matrix[c, c] = 1.0                                # kept: e0..e3
    matrix[0, 4] = 1.0                                    # candidate 4: inside the kept span (residual 0)
    matrix[0, 5], matrix[5, 5] = 0.5, 0.5                 # candidate 5: residual 0.5
    matrix[6, 6] = 1.5                                    # candidate 6: residual 1.5
    matrix[7, 7] = 2.5                                    # candidate 7: residual 2.5
    kept, candidates = torch.arange(4), torch.arange(4, 8)
    draws = torch.cat([sample_regrowth(matrix, kept, candidates, 1, torch.Generator().manual_seed(s))
                       for s in range(2000)])
    freq = torch.bincount(draws - 4, minlength=4).double() / len(draws)
    expected = torch.softmax(torch.tensor([0.0, 0.5, 1.5, 2.5], dtype=torch.float64), 0)
    assert freq[3] > freq[2] > freq[1] > freq[0]
    assert torch.allclose(freq, expected, atol=0.03)     # softmax of the residual norms
    two = sample_regrowth(matrix, kept, candidates, 2, torch.Generator().manual_seed(0))
    assert len(set(two.tolist())) == 2                    # without replacement


class MaskSpy(L.Callback):
    def __init__(self, method: CHEX) -> None:
        self.method, self.masks = method, []

    def on_train_epoch_end(self, trainer, pl_module):
        groups = self.method.groups(pl_module.net)
        modules = dict(pl_module.net.named_modules())
        self.masks.append(torch.cat([channel_mask(g, modules) for g in groups]))


def test_no_exploration_after_t_max_and_compress_compacts(tmp_path, monkeypatch):
    spies: list[MaskSpy] = []
    original = CHEX.training_callbacks

    def with_spy(self, stage, model):
        callbacks = original(self, stage, model)
        if stage == "train":
            spies.append(MaskSpy(self))
            callbacks.append(spies[-1])
        return callbacks

    monkeypatch.setattr(chex_module.CHEX, "training_callbacks", with_spy)
    results = run_pipeline([*SMOKE, "schedule.train.epochs=7", "method.delta_t_epochs=1",
                            "method.t_max_fraction=0.5"], tmp_path)   # T_max = round(3.5) = 4
    history = spies[0].method.history
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]
    assert [h["delta"] for h in history[1:]] == pytest.approx([regrowth_ratio(t, 4, 0.2) for t in (1, 2, 3, 4)])
    masks = spies[0].masks
    assert all(torch.equal(m, masks[4]) for m in masks[4:]) and not torch.equal(masks[0], masks[4])
    assert int(masks[-1].sum()) == round(0.5 * len(masks[-1]))
    metrics = results["metrics"]
    assert metrics["model/params_original"] > metrics["model/params_dense"]
    assert metrics["model/macs_effective"] < metrics["model/macs_dense"]
    assert results["method"]["compacted_groups"]


def test_flops_target_is_met_after_compaction(tmp_path):
    results = run_pipeline([*SMOKE, "method.target=flops", "method.flops_reduction=0.6"], tmp_path)
    metrics = results["metrics"]
    remaining = metrics["model/macs_effective"] / metrics["model/macs_dense"]
    assert 0.37 <= remaining <= 0.4


def test_compress_finishes_exploration_when_t_max_is_after_training(tmp_path, monkeypatch):
    kept: list[nn.Module] = []
    original = CHEX.compress
    monkeypatch.setattr(chex_module.CHEX, "compress",
                        lambda self, model, dm: kept.append(original(self, model, dm)) or kept[-1])
    results = run_pipeline([*SMOKE, "method.t_max_fraction=1.0", "stages=[train,compress,evaluate]"], tmp_path)
    assert is_compacted(kept[0])
    assert results["method"]["final_keep_fraction"] == pytest.approx(0.5)
