"""Tri-level E-ViT: tokens kept at the scaled blocks and attention links kept in every block (the network that
trains and is evaluated), the example level's swap of least-forgotten active examples for held-out ones, and a
pipeline run whose epochs visit only the active examples and still end in validation."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from compress_run.core.tokens import token_schedule
from compress_run.hardware.macs import count_macs
from compress_run.methods.base import NotApplicable
from compress_run.methods.evit import EViT, ExampleSelector
from compress_run.models.cifar_resnet import resnet20
from compress_run.models.timm_models import vit
from compress_run.pipeline.data import EpochSeededSampler
from tests.conftest import run_pipeline

# tests/methods/test_config_keys.py: each key flipped changes the run (digits smoke, the small ViT)
CONFIG_FLIPS = {
    "token_keep": ("0.5", []), "token_blocks": ("[0]", []), "reference_depth": ("24", []), "fuse": ("true", []),
    "attention_keep": ("0.6", []), "example_holdout": ("0.4", []), "swap_every": ("2", []),
    "swap_fraction": ("0.25", []),
}
VIT = ["model=vit_fmnist", "model.embed_dim=32", "model.num_heads=2", "model.depth=2", "model.patch_size=2"]


def small_vit(depth: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    return vit("deit_tiny_patch16_224", 10, 1, 8, patch_size=2, embed_dim=32, num_heads=2, depth=depth).eval()


def test_prepare_keeps_tokens_at_the_papers_blocks_scaled_to_the_depth_and_links_in_every_block():
    model = small_vit()
    dense = count_macs(model, (1, 1, 8, 8)).dense
    EViT().prepare(model)  # 3, 6, 9 of 12 -> 1, 3, 4 of 6; 70% of the tokens, 30% of the links
    schedule = token_schedule(model, 16)
    assert [r["mlp"] for r in schedule] == [17, 13, 13, 10, 8, 8]  # patches 16 -> ceil(11.2) = 12 -> 9 -> 7
    assert [r["links"] for r in schedule] == [6, 6, 4, 4, 3, 3]  # ceil(0.3 x tokens reaching the block)
    assert count_macs(model, (1, 1, 8, 8)).dense < dense
    with pytest.raises(NotApplicable, match="timm VisionTransformer"):
        EViT().check_applicable(resnet20(10, 1, 8))


def test_a_swap_trades_the_least_forgotten_active_examples_for_held_out_ones():
    method = EViT(example_holdout=0.2, swap_fraction=0.5)
    sampler = EpochSeededSampler(20, seed=0)
    selector = ExampleSelector(method)
    method.held_out = [0, 1, 2, 3]
    sampler.exclude(torch.tensor(method.held_out))
    selector.forgotten = torch.arange(20).flip(0)  # example 19 forgotten least ... 4 most among the active
    selector.learned = torch.ones(20, dtype=torch.bool)
    selector.learned[19] = False  # never learned: counts as the most forgotten
    selector.swap(sampler, epoch=3)
    assert set(method.held_out) - {0, 1, 2, 3} == {17, 18}  # the two least forgotten of the learned active ones
    assert len(method.held_out) == 4 and len(set(method.held_out) & {0, 1, 2, 3}) == 2
    assert set(torch.nonzero(sampler.excluded).flatten().tolist()) == set(method.held_out)
    assert method.swaps == [{"epoch": 3, "swapped": 2}]


class ValidationSpy(L.Callback):
    def __init__(self) -> None:
        self.train_batches: dict[int, int] = {}
        self.validated: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_batches[trainer.current_epoch] = batch_idx + 1

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated.append(trainer.current_epoch)


def test_pipeline_epochs_visit_only_the_active_examples_swap_on_schedule_and_validate(tmp_path, monkeypatch):
    spy, original = ValidationSpy(), EViT.training_callbacks
    monkeypatch.setattr(EViT, "training_callbacks", lambda self, stage, model: [
        *original(self, stage, model), *([spy] if stage == "train" else [])])
    args = ["dataset=digits", "debug=smoke", "logger=none", "evaluate.measure_latency=false", *VIT, "method=evit",
            "method.swap_every=1", "schedule.train.epochs=3", "trainer.limit_train_batches=null",
            "schedule.train.epoch_fraction=1.0", "schedule.batch_size=128"]
    results = run_pipeline(args, tmp_path)
    report, m = results["method"], results["metrics"]
    held, active = report["examples_held_out"], report["epoch_examples"]
    assert active == [active[0]] * 3 and held == round(0.2 * (active[0] + held))  # every epoch, swaps included
    full_epoch = (active[0] + held) // 128
    assert spy.train_batches == {epoch: active[0] // 128 for epoch in range(3)} and active[0] // 128 < full_epoch
    assert spy.validated == [0, 1, 2]  # Lightning sized the epochs at the full set: they still end in validation
    assert report["swaps"] == [{"epoch": 1, "swapped": round(0.5 * held)}, {"epoch": 2, "swapped": round(0.5 * held)}]
    assert m["model/macs_effective"] < m["model/macs_dense"]
