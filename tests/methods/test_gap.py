"""GaP: one partition dense per step and the others at target, grown weights at zero, optimizer reset,
final prune to target (uniform) or budget (global), P-GaP merge, random-partition ablation."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from compress_run.core.masks import get_mask, prunable_layers
from compress_run.methods import gap as gap_module
from compress_run.methods.cycles import cycle_of
from compress_run.methods.gap import GaP
from compress_run.pipeline.lit_module import lr_lambda
from tests.conftest import run_pipeline

SMOKE = ["dataset=digits", "debug=smoke", "logger=none", "method=gap", "method.partitioner=by_stage",
         "method.num_partitions=3", "method.rounds=2", "trainer.limit_train_batches=4",
         "schedule.train.epochs=3", "method.sparsity=0.8"]


class Spy(L.Callback):
    """Records, after every optimizer step, the GaP step index and each layer's mask density; at every
    batch start, whether the optimizer state is empty and the values of weights that were masked."""

    def __init__(self, method: GaP) -> None:
        self.method = method
        self.records: list[tuple[int, dict[str, float], bool]] = []
        self.grown_values: list[float] = []
        self.reset_at_boundary: list[bool] = []
        self.previous_masks: dict[str, torch.Tensor] = {}
        self.numel: dict[str, int] = {}
        self.cycle_starts: list[dict[str, torch.Tensor]] = []  # the network (no masks) at each step's start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        layers = prunable_layers(pl_module.net)
        for name, mask in self.previous_masks.items():
            grown = get_mask(layers[name]) & ~mask
            if grown.any():
                self.grown_values.append(float(layers[name].weight.detach()[grown].abs().max()))
        total = trainer.estimated_stepping_batches
        step = trainer.global_step
        if step == 0 or cycle_of(step, total, self.method.steps) != cycle_of(step - 1, total, self.method.steps):
            state = pl_module.net.state_dict()
            self.cycle_starts.append({k: v.detach().clone() for k, v in state.items() if not k.endswith("_mask")})
        if step and cycle_of(step, total, self.method.steps) != cycle_of(step - 1, total, self.method.steps):
            self.reset_at_boundary.append(len(trainer.optimizers[0].state) == 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = prunable_layers(pl_module.net)
        k = cycle_of(trainer.global_step - 1, trainer.estimated_stepping_batches, self.method.steps)
        densities = {n: float(get_mask(m).float().mean()) for n, m in layers.items()}
        zeros_held = all(bool((m.weight.detach()[~get_mask(m)] == 0).all()) for m in layers.values())
        self.records.append((k, densities, zeros_held))
        self.previous_masks = {n: get_mask(m).clone() for n, m in layers.items()}
        self.numel = {n: m.weight.numel() for n, m in layers.items()}


@pytest.fixture
def spied(monkeypatch):
    spies: list[Spy] = []
    original = GaP.training_callbacks

    def with_spy(self, stage, model):
        callbacks = original(self, stage, model)
        if stage == "train":
            spies.append(Spy(self))
            callbacks.append(spies[-1])
        return callbacks

    monkeypatch.setattr(gap_module.GaP, "training_callbacks", with_spy)
    return spies


def test_cyclic_gap_one_partition_dense_per_step_others_at_target(tmp_path, spied):
    results = run_pipeline([*SMOKE, "stages=[train,compress,evaluate]"], tmp_path)
    spy = spied[0]
    groups = spy.method.groups
    assert len(groups) == 3 and groups[0][0].startswith("layer1") and groups[2][0].startswith("layer3")
    seen_steps = set()
    for k, densities, zeros_held in spy.records:
        seen_steps.add(k)
        assert zeros_held
        for i, group in enumerate(groups):
            for name in group:
                if i == k % 3:
                    assert densities[name] == 1.0, (k, name)
                else:
                    assert abs(densities[name] - 0.2) < 0.01, (k, name, densities[name])
    assert seen_steps == set(range(6))
    assert spy.grown_values and max(spy.grown_values) == 0.0   # grown weights start at exactly zero
    assert len(spy.reset_at_boundary) == 5 and all(spy.reset_at_boundary)
    per_layer = results["sparsity_per_layer"]
    prunable = [n for g in groups for n in g]
    assert all(abs(per_layer[f"{n}.weight"] - 0.8) < 0.01 for n in prunable)   # final prune: all at target


def test_global_gap_meets_the_budget_after_every_step_and_at_the_end(tmp_path, spied):
    results = run_pipeline([*SMOKE, "method.distribution=global", "stages=[train,compress,evaluate]"], tmp_path)
    spy = spied[0]
    sizes = results["sparsity_per_layer"]
    prunable = [n for g in spy.method.groups for n in g]
    numel = spy.numel
    kept = sum((1 - sizes[f"{n}.weight"]) * numel[n] for n in prunable)
    assert abs(kept / sum(numel.values()) - 0.2) < 1e-3
    assert len({round(sizes[f"{n}.weight"], 3) for n in prunable}) > 1  # non-uniform
    for k, densities, _ in spy.records:   # sparse partitions jointly hold exactly their share
        for i, group in enumerate(spy.method.groups):
            if i != k % 3:
                share = sum(densities[n] * numel[n] for n in group) / sum(numel[n] for n in group)
                assert abs(share - 0.2) < 1e-3


def test_random_variant_never_regrows_last_steps_layers(tmp_path, spied):
    run_pipeline([*SMOKE, "method.variant=random", "stages=[train,compress]"], tmp_path)
    method = spied[0].method
    steps = [method.dense_layers(k) for k in range(method.steps)]
    assert all(len(s) == 6 for s in steps)   # 18 prunable layers / 3
    assert all(not set(a) & set(b) for a, b in zip(steps, steps[1:], strict=False))
    assert len({tuple(s) for s in steps}) > 1
    for k, densities, _ in spied[0].records:
        assert {n for n, d in densities.items() if d == 1.0} == set(steps[k])


def test_parallel_merge_takes_partition_i_from_worker_i_and_the_rest_from_worker_0():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3),
                        nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    net(torch.zeros(1, 1, 12, 12))
    method = GaP(variant="parallel", num_partitions=2, partitioner=["2", "[34]"], sparsity=0.5)
    method.check_applicable(net)
    assert method.groups == [["2"], ["3", "4"]]
    method.workers = {i: {k: torch.full_like(v, float(i + 1)) if v.is_floating_point() else v
                          for k, v in net.state_dict().items()} for i in range(2)}
    method.merge(net)
    sd = net.state_dict()
    assert (sd["2.weight"] == 1).all() and (sd["3.weight"] == 2).all() and (sd["4.bias"] == 2).all()
    assert (sd["0.weight"] == 1).all() and (sd["1.running_mean"] == 1).all() and (sd["6.weight"] == 1).all()


def test_parallel_gap_runs_workers_from_the_round_start_and_ends_at_target(tmp_path, spied):
    results = run_pipeline([*SMOKE, "method.variant=parallel", "stages=[train,compress,evaluate]"], tmp_path)
    spy = spied[0]
    for k, densities, _ in spy.records:
        dense = {n for n, d in densities.items() if d == 1.0}
        assert dense == set(spy.method.groups[k % 3])
    per_layer = results["sparsity_per_layer"]
    assert all(abs(per_layer[f"{n}.weight"] - 0.8) < 0.01 for g in spy.method.groups for n in g)
    assert results["method"]["variant"] == "parallel"
    # every worker of a round starts from the same merged network (not from the previous worker's result)
    starts = spy.cycle_starts
    assert len(starts) == spy.method.steps == 6
    for first in (0, 3):
        for worker in (first + 1, first + 2):
            assert all(torch.equal(starts[worker][k], v) for k, v in starts[first].items()), worker
    assert not all(torch.equal(starts[3][k], v) for k, v in starts[0].items())  # a new round: merged + pruned


def test_lr_schedule_restarts_every_cycle():
    kwargs = dict(steps_per_epoch=10, epochs=4, schedule="cosine", warmup_epochs=0.5, milestones=[], gamma=0.1)
    single = [lr_lambda(s, **kwargs) for s in range(40)]
    cycled = [lr_lambda(s, **kwargs, cycles=4, total_steps=40) for s in range(40)]
    assert cycled[0] == cycled[10] == cycled[20] == cycled[30] < 1.0   # warm-up again at every cycle start
    assert cycled[:10] == cycled[10:20] and min(cycled[5:10]) < 0.2
    assert single[10] > 0.9 and single[39] < 0.01   # without cycles: one warm-up, one decay
