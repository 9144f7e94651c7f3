"""MEST: phase table, prune-by-importance then random regrowth at zero, hard bound (EM), exact target at
the end (EM&S), no optimizer reset."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from compress_run.core.masks import get_mask, prunable_layers
from compress_run.methods import mest as mest_module
from compress_run.methods.forgetting import least_forgotten
from compress_run.methods.mest import MEST, phase_targets, prune_and_grow
from tests.conftest import run_pipeline

SMOKE = ["dataset=digits", "debug=smoke", "logger=none", "method=mest", "method.update_every=1",
         "schedule.train.epochs=4", "method.phase_epochs=[2,3]", "stages=[train,compress,evaluate]"]


def test_phase_table_matches_the_paper_at_90_percent():
    prune, grow = phase_targets("em", 0.9)
    assert [round(p, 6) for p in prune] == [0.92, 0.91, 0.9] and grow == [0.9] * 3
    prune, grow = phase_targets("ems", 0.9)
    assert prune == [0.9] * 3 and [round(g, 6) for g in grow] == [0.85, 0.875, 0.9]
    assert [MEST(sparsity=0.9).phase(e, 160) for e in (0, 89, 90, 119, 120, 159)] == [0, 0, 1, 1, 2, 2]


def test_prune_and_grow_keeps_the_most_important_and_grows_only_inactive_positions():
    torch.manual_seed(0)
    mask = torch.rand(30, 40) < 0.2
    weight = torch.randn(30, 40) * mask
    new = prune_and_grow(weight.abs(), mask, keep=100, grow_to=180, generator=torch.Generator().manual_seed(1))
    kept, grown = new & mask, new & ~mask
    assert kept.sum() == 100 and grown.sum() == 80 and new.sum() == 180
    assert weight[kept].abs().min() >= weight[mask & ~new].abs().max()   # dropped the least important
    again = prune_and_grow(weight.abs(), mask, 100, 180, torch.Generator().manual_seed(1))
    assert torch.equal(again, new)                                       # seeded, hence resumable
    other = prune_and_grow(weight.abs(), mask, 100, 180, torch.Generator().manual_seed(2))
    assert not torch.equal(other & ~mask, grown)                         # regrowth is random


def test_update_regrows_at_zero_even_where_the_weight_held_a_value():
    layer = torch.nn.Linear(20, 30)
    method = MEST(sparsity=0.8, mode="ems", exclude=[])
    net = torch.nn.Sequential(layer)
    method.prune_subset(net, ["0"], 0.8)
    old = get_mask(layer).clone()
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight).abs() + 1.0)  # inactive entries hold non-zero values
    method.update(net, epoch=0, train_epochs=10)
    grown = get_mask(layer) & ~old
    assert grown.any() and (layer.weight[grown] == 0).all()


class Spy(L.Callback):
    def __init__(self) -> None:
        self.nonzero: list[int] = []
        self.optimizer_state_sizes: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = prunable_layers(pl_module.net)
        self.nonzero.append(sum(int((m.weight != 0).sum()) for m in layers.values()))
        self.numel = sum(m.weight.numel() for m in layers.values())
        self.optimizer_state_sizes.append(len(trainer.optimizers[0].state))


@pytest.fixture
def spy(monkeypatch):
    spy = Spy()
    original = MEST.training_callbacks
    monkeypatch.setattr(mest_module.MEST, "training_callbacks", lambda self, stage, model: [
        *original(self, stage, model), *([spy] if stage == "train" else [])])
    return spy


def test_em_never_exceeds_the_memory_bound(tmp_path, spy):
    results = run_pipeline([*SMOKE, "method.mode=em", "method.sparsity=0.8"], tmp_path)
    assert spy.nonzero and max(spy.nonzero) <= round(0.2 * spy.numel) + 18   # +1 rounding per layer
    assert results["method"]["mask_updates"] == 4
    assert [round(p, 6) for p in results["method"]["prune_to"]] == [0.84, 0.82, 0.8]
    assert abs(results["metrics"]["model/prunable_sparsity"] - 0.8) < 1e-3


def test_ems_grows_above_the_target_then_ends_exactly_at_it_without_optimizer_resets(tmp_path, spy):
    results = run_pipeline([*SMOKE, "method.mode=ems", "method.sparsity=0.8"], tmp_path)
    density = [n / spy.numel for n in spy.nonzero]
    assert max(density[:3]) > 0.28                      # phase 0: grow-to density 0.3
    assert abs(density[-1] - 0.2) < 2e-3                # last phase: exactly the target
    per_layer = results["sparsity_per_layer"]
    assert all(abs(v - 0.8) < 0.01 for k, v in per_layer.items() if not k.startswith(("conv1", "fc")))
    assert min(spy.optimizer_state_sizes[1:]) > 0       # momentum survives the mask updates
    assert results["method"]["grow_to"][0] == pytest.approx(0.7)


def test_mask_update_uses_the_gradient_term_when_asked():
    layer = torch.nn.Linear(10, 10)
    method = MEST(sparsity=0.5, grad_coefficient=100.0, exclude=[])
    method.prune_subset(torch.nn.Sequential(layer), ["0"], 0.5)
    layer.weight.grad = torch.zeros_like(layer.weight)
    active = get_mask(layer).nonzero()
    smallest = min(active.tolist(), key=lambda ij: abs(layer.weight[ij[0], ij[1]].item()))
    layer.weight.grad[smallest[0], smallest[1]] = 1.0   # large gradient: survives despite the smallest |w|
    method.update(torch.nn.Sequential(layer), epoch=0, train_epochs=10)
    assert get_mask(layer)[smallest[0], smallest[1]]


def test_least_forgotten_prefers_learned_examples_with_few_forgetting_events():
    forgotten = torch.tensor([3, 0, 1, 0, 0, 2])
    learned = torch.tensor([True, True, True, False, True, True])
    chosen = least_forgotten(forgotten, learned, 3, torch.Generator().manual_seed(0)).tolist()
    assert set(chosen[:2]) == {1, 4} and chosen[2] == 2     # never-learned example 3 is kept


class DataSpy(L.Callback):
    def __init__(self) -> None:
        self.steps_per_epoch: dict[int, int] = {}
        self.seen_after_removal: set[int] = set()
        self.lrs: list[float] = []
        self.validated: list[int] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated.append(trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        epoch = trainer.current_epoch
        self.steps_per_epoch[epoch] = self.steps_per_epoch.get(epoch, 0) + 1
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        if epoch >= 2:
            sampler = trainer.train_dataloader.sampler
            start = batch_idx * trainer.train_dataloader.batch_size
            self.seen_after_removal.update(sampler.order(epoch)[start: start + len(batch[1])].tolist())


def test_data_removal_drops_the_examples_shortens_epochs_and_keeps_the_lr_schedule(tmp_path, monkeypatch):
    spy = DataSpy()
    original = MEST.training_callbacks
    monkeypatch.setattr(mest_module.MEST, "training_callbacks", lambda self, stage, model: [
        *original(self, stage, model), *([spy] if stage == "train" else [])])
    run_pipeline(["dataset=digits", "logger=none", "method=mest", "method.update_every=1",
                            "schedule=fmnist", "schedule.batch_size=64", "schedule.train.epochs=4",
                            "schedule.train.warmup_epochs=0", "method.remove_n=600", "method.remove_data_epoch=2",
                            "stages=[train,compress]"], tmp_path)
    removed = set(torch.load(tmp_path / "checkpoints/train.ckpt", weights_only=False)["compress_run"]
                  ["method_state"]["removed"])
    assert len(removed) == 600
    assert spy.seen_after_removal and not spy.seen_after_removal & removed
    full, short = spy.steps_per_epoch[0], spy.steps_per_epoch[3]
    assert spy.steps_per_epoch[1] == full and short < full and abs(short - (full * 64 - 600) // 64) <= 1
    assert spy.lrs[-1] < 0.01 * max(spy.lrs)            # the cosine still reaches its end
    assert spy.lrs[full * 2] < spy.lrs[full * 2 - 1]    # and stays continuous at the removal
    assert spy.validated == [0, 1, 2, 3]                # the shortened epochs still end in validation
