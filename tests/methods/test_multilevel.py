"""Multi-level nested sparsity: nested masks per pattern, frozen lower levels during the per-level
phases (check_hierarchy between the level models snapshot at the end of each phase and the final stored
model, and for every pair of levels), per-level BN, and the pipeline's per-level report."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compress_run.core.errors import UserError
from compress_run.core.nesting import (
    LEVEL_BUFFER,
    check_hierarchy,
    level_count,
    level_sparsity,
    level_view,
    nested_level_maps,
)
from compress_run.core.projections import as_matrix, check_gather_scatter
from compress_run.methods.multilevel import LevelPhases, Multilevel
from compress_run.models.cifar_resnet import resnet20
from compress_run.pipeline.lit_module import ClassifierModule
from tests.conftest import run_pipeline


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.conv3(x).mean((2, 3)))


@pytest.mark.parametrize("pattern", ["irregular", "block:4:4", "gather_scatter:16", "filter"])
@pytest.mark.parametrize("distribution", ["uniform", "global"])
def test_level_masks_are_nested_and_follow_the_pattern(pattern, distribution):
    torch.manual_seed(0)
    layers = {"a": nn.Conv2d(32, 64, 3), "b": nn.Linear(128, 64)}
    scores = {n: m.weight.detach().abs() for n, m in layers.items()}
    levels = [0.95, 0.9, 0.8]
    maps = nested_level_maps(layers, scores, levels, distribution, pattern)
    total = sum(m.numel() for m in maps.values())
    for k, sparsity in enumerate(levels):
        kept = sum(int((m <= k).sum()) for m in maps.values())
        assert 1 - kept / total == pytest.approx(sparsity, abs=0.02)
        for name, level_map in maps.items():
            if k and pattern != "filter" and distribution == "uniform":  # each level adds to every layer
                assert ((level_map <= k).sum() > (level_map <= k - 1).sum())
            if pattern == "gather_scatter:16" and distribution == "uniform":
                assert check_gather_scatter(level_map <= k, 16, 1) == [], (name, k)
            if pattern == "block:4:4":  # whole 4x4 blocks of the matrix view
                blocks = as_matrix(level_map <= k).float().unfold(0, 4, 4).unfold(1, 4, 4).sum((-1, -2))
                assert ((blocks == 0) | (blocks == 16)).all()


def _snapshotting_phases(method, snapshots):
    """LevelPhases that records the level model (a copy) just before it moves to the next level."""

    class Snapshot(LevelPhases):
        def enter(self, net, level, fresh):
            if fresh and level > 0:
                level_net = level_view_now(net, level - 1)
                snapshots[level - 1] = level_net
            super().enter(net, level, fresh)

        def on_train_end(self, trainer, pl_module):
            super().on_train_end(trainer, pl_module)
            snapshots[self.level] = level_view_now(pl_module.net, self.level)

    def level_view_now(net, level):
        from compress_run.core.nesting import store_level_bn

        store_level_bn(net, level)
        return level_view(net, level)

    return Snapshot(method)


@pytest.mark.parametrize("per_level_bn", [True, False])
def test_phases_freeze_lower_levels(per_level_bn):
    torch.manual_seed(0)
    net = _Net()
    method = Multilevel(levels=[0.9, 0.7, 0.5], per_level_bn=per_level_bn)
    method.compress(net, None)
    assert level_count(net) == 3
    assert [round(level_sparsity(net, k), 2) for k in range(3)] == [0.9, 0.7, 0.5]
    start = {k: level_view(net, k) for k in range(3)}
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(96, 3, 8, 8, generator=gen), torch.randint(0, 10, (96,), generator=gen))
    snapshots: dict[int, nn.Module] = {}
    callbacks = [method.training_callbacks("finetune", net)[0], _snapshotting_phases(method, snapshots)]
    module = ClassifierModule(net, lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9,
                                                                       weight_decay=5e-3),
                              lr=0.05, epochs=3, lr_cycles=3)
    trainer = L.Trainer(max_epochs=3, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, DataLoader(data, batch_size=16))
    assert sorted(snapshots) == [0, 1, 2]
    for k in range(3):
        final = level_view(net, k)
        assert check_hierarchy(snapshots[k], final) == [], k  # later phases left level k's values alone
        # the level's own entries did train in its phase
        joined = net.conv2._buffers[LEVEL_BUFFER] == k
        assert not torch.equal(start[k].conv2.weight[joined], final.conv2.weight[joined])
        for j in range(k + 1, 3):
            assert check_hierarchy(final, level_view(net, j)) == []
    if not per_level_bn:
        assert torch.equal(level_view(net, 0).bn1.running_mean, snapshots[0].bn1.running_mean)
    # a moved frozen value is caught
    broken = level_view(net, 2)
    with torch.no_grad():
        broken.conv2.weight[net.conv2._buffers[LEVEL_BUFFER] == 0] += 1e-3
    assert any("conv2.weight" in p for p in check_hierarchy(level_view(net, 0), broken))


def test_nm_pattern_is_rejected():
    from compress_run.methods.base import NotApplicable

    with pytest.raises(NotApplicable, match="N:M"):
        Multilevel(levels=[0.75, 0.5], pattern="nm:2:4").check_applicable(_Net())


@pytest.mark.slow  # seven pipeline runs (two minutes): CI runs it in its slow set (Makefile CI_SLOW_TESTS)
def test_pipeline_reports_every_level_and_picks_one(tmp_path):
    base = ["dataset=digits", "debug=smoke", "logger=none", "method=multilevel", "method.levels=[0.9,0.7,0.5]",
            "evaluate.measure_latency=false", "schedule.finetune.epochs=3"]
    results = run_pipeline(base, tmp_path)
    metrics = results["metrics"]
    levels = results["levels"]
    assert [r["target_sparsity"] for r in levels] == [0.9, 0.7, 0.5]
    assert all("test/acc" in r for r in levels)
    assert levels[0]["model/macs_effective"] < levels[1]["model/macs_effective"] < levels[2]["model/macs_effective"]
    assert metrics["levels/hierarchy_ok"] is True and metrics["levels/chosen"] == 2
    assert metrics["test/acc"] == levels[2]["test/acc"]
    assert metrics["model/prunable_sparsity"] == pytest.approx(0.5, abs=0.02)
    # evaluate.level re-runs only the evaluate stage and reports that level as the model
    picked = run_pipeline([*base, "evaluate.level=0.9"], tmp_path)["metrics"]
    assert picked["time/train_s"] == metrics["time/train_s"]  # train/compress/finetune were not redone
    assert picked["levels/chosen"] == 0 and picked["model/prunable_sparsity"] == pytest.approx(0.9, abs=0.02)
    assert picked["test/acc"] == levels[0]["test/acc"]
    with pytest.raises(UserError, match="not one of method.levels"):
        run_pipeline([*base, "evaluate.level=0.8"], tmp_path)
    # switches part-way: 3 stages x 2 switch points x 6 ordered level pairs = 12 configurations, reported
    mixes = results["level_mixes"]
    assert len(mixes) == 12 and metrics["levels/segments"] == [6, 6, 6]
    by_config = {tuple(m["target_sparsity"]): m for m in mixes}
    sparse_first = by_config[(0.9, 0.5, 0.5)]  # the first stage at 90%, the other two at 50%
    assert levels[2]["model/macs_effective"] > sparse_first["model/macs_effective"] > levels[0]["model/macs_effective"]
    switched = run_pipeline([*base, "evaluate.level=[0.9,0.5,0.5]"], tmp_path)["metrics"]
    assert switched["levels/chosen"] == [0, 2, 2] and switched["test/acc"] == sparse_first["test/acc"]
    with pytest.raises(UserError, match="gives 2 levels, but the model has 3 segments"):
        run_pipeline([*base, "evaluate.level=[0.9,0.5]"], tmp_path)
    # a latency budget picks the most accurate configuration that fits it (on validation accuracy)
    key = next(k for k in levels[0] if k.startswith("latency_sim_ms/"))
    budget = sorted(r[key] for r in [*levels, *mixes])[len(mixes) // 2]
    chosen = run_pipeline([*base, f"evaluate.latency_budget_ms={budget}"], tmp_path)["metrics"]
    fitting = [r for r in [*levels, *mixes] if r[key] <= budget]
    assert chosen["val/acc"] == max(r["val/acc"] for r in fitting)
    assert "within" in chosen["levels/chosen_reason"]


def test_a_switched_view_runs_each_segment_at_its_own_level():
    from compress_run.core.nesting import level_view, mixed_view

    torch.manual_seed(0)
    net = resnet20(10, 1, 8)
    method = Multilevel(levels=[0.9, 0.5])
    method.compress(net, None)
    groups = method.segment_groups(net)
    assert [g[0].split(".")[0] for g in groups] == ["layer1", "layer2", "layer3"]
    with torch.no_grad():  # per-level BN snapshots that differ
        for module in net.modules():
            if "level_bn" in module._buffers:
                module._buffers["level_bn"][1].add_(1.0)
    view, sparse, dense = mixed_view(net, groups, [0, 1, 1]), level_view(net, 0), level_view(net, 1)
    modules, sparse_m, dense_m = dict(view.named_modules()), dict(sparse.named_modules()), dict(dense.named_modules())
    for name in groups[0]:
        assert torch.equal(modules[name].weight_mask, sparse_m[name].weight_mask)
    for name in groups[1] + groups[2]:
        assert torch.equal(modules[name].weight_mask, dense_m[name].weight_mask)
    assert torch.equal(modules["layer1.0.bn1"].weight, sparse_m["layer1.0.bn1"].weight)   # follows its segment
    assert torch.equal(modules["layer3.2.bn2"].weight, dense_m["layer3.2.bn2"].weight)
    assert torch.equal(modules["bn1"].weight, sparse_m["bn1"].weight)                    # the stem: first segment


def test_evaluate_level_needs_a_multilevel_method(tmp_path):
    with pytest.raises(UserError, match="single sparsity"):
        run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "method=magnitude", "evaluate.level=0.9"],
                     tmp_path)
