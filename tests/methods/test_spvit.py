"""SPViT: selectors at the paper's blocks scaled to the depth with their cumulative targets, refusals of schedules
that cannot hold, the training step adding the selectors' ratio penalty to the task loss, and a pipeline run
whose evaluated network really runs the shorter sequences, fine-tuned with the authors' learning rates (the
backbone frozen, then at 1/100 of the selectors' LR)."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from compress_run.core.soft_tokens import SoftTokenBlock
from compress_run.core.tokens import token_schedule
from compress_run.hardware.macs import count_macs
from compress_run.methods.base import NotApplicable
from compress_run.methods.spvit import SPViT
from compress_run.models.cifar_resnet import resnet20
from compress_run.models.timm_models import vit
from compress_run.pipeline.lit_module import ClassifierModule
from compress_run.pipeline.network_input import finished_run_network
from tests.conftest import run_pipeline

# tests/methods/test_config_keys.py: each key flipped changes the run (digits smoke, a 4-block ViT)
CONFIG_FLIPS = {
    "keep_targets": ("[0.5,0.3,0.1]", []), "selector_blocks": ("[0,6,9]", []), "reference_depth": ("16", []),
    "ratio_weight": ("0.0", []), "gumbel_temperature": ("0.5", []), "backbone_lr_scale": ("0.5", []),
    "backbone_frozen_fraction": ("0.5", []),
}
VIT = ["model=vit_fmnist", "model.embed_dim=32", "model.num_heads=2", "model.depth=4", "model.patch_size=2"]


def small_vit(depth: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    return vit("deit_tiny_patch16_224", 10, 1, 8, patch_size=2, embed_dim=32, num_heads=2, depth=depth).eval()


def test_selectors_sit_at_the_papers_blocks_scaled_to_the_depth_with_cumulative_targets():
    model = SPViT(keep_targets=[0.7, 0.49, 0.343]).compress(small_vit(), None)  # 3, 6, 9 of 12 -> 1, 3, 4 of 6
    assert [i for i, b in enumerate(model.blocks) if "token_selector" in b._modules] == [1, 3, 4]
    # 16 patches -> ceil(0.7 x 16) = 12 -> ceil(0.7 x 12) = 9 -> ceil(0.7 x 9) = 7, plus the class token and one
    # package token per selector so far
    assert [r["attention"] for r in token_schedule(model, 16)] == [17, 14, 14, 12, 11, 11]


@pytest.mark.parametrize(("keys", "model", "message"), [
    ({}, lambda: small_vit(depth=2), "share a block"),
    ({}, lambda: resnet20(10, 1, 8), "timm VisionTransformer"),
])
def test_a_schedule_the_model_cannot_hold_is_refused(keys, model, message):
    with pytest.raises(NotApplicable, match=message):
        SPViT(**keys).check_applicable(model())


@pytest.mark.parametrize(("keys", "message"), [({"keep_targets": [0.5, 0.7, 0.2]}, "non-increasing"),
                                               ({"selector_blocks": [3, 6]}, "one per"),
                                               ({"gumbel_temperature": 0.0}, "> 0")])
def test_bad_keys_are_refused(keys, message):
    with pytest.raises(ValueError, match=message):
        SPViT(**keys)


def test_the_training_step_adds_the_ratio_penalty_to_the_task_loss():
    net = SPViT(keep_targets=[0.5, 0.3, 0.1]).compress(small_vit(), None).train()
    module = ClassifierModule(net, partial(torch.optim.SGD), lr=0.1, epochs=1)
    logged: dict[str, torch.Tensor] = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, value)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss = module._step((x, y), "train")
    ratio = logged["train/token_ratio"]
    assert float(ratio.detach()) > 0
    assert torch.allclose(loss, F.cross_entropy(module.last_train_logits, y) + ratio)


def test_pipeline_evaluates_the_dropped_token_network(tmp_path):
    results = run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "evaluate.measure_latency=false",
                            *VIT, "method=spvit", "method.keep_targets=[0.5,0.25,0.125]"], tmp_path)
    m = results["metrics"]
    assert results["method"]["keep_targets"] == [0.5, 0.25, 0.125]
    assert m["model/macs_effective"] < 0.62 * m["model/macs_dense"]  # 3 package tokens beside the kept ones
    # the probe scripts load a finished run this way: the selectors come back, and so does the evaluated network
    net, _ = finished_run_network(tmp_path, "finetune.ckpt")
    assert not net.training and sum(isinstance(b, SoftTokenBlock) and b.prunes_tokens() for b in net.blocks) == 3
    assert count_macs(net, (1, 1, 8, 8)).effective == pytest.approx(m["model/macs_effective"], abs=1)


class LearningRateSpy(L.Callback):
    """Per finetune step: the LR of the group of a selector weight and of a backbone weight, and whether each
    weight changed in the step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float | bool]] = []

    def weights(self, pl_module) -> dict[str, torch.Tensor]:
        named = dict(pl_module.net.named_parameters())
        return {"selector": named["blocks.1.token_selector.local.0.1.weight"],
                "backbone": named["blocks.0.attn.qkv.weight"]}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = {k: w.detach().clone() for k, w in self.weights(pl_module).items()}
        groups = trainer.optimizers[0].param_groups
        self.lrs = {k: next(g["lr"] for g in groups if any(p is w for p in g["params"]))
                    for k, w in self.weights(pl_module).items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        moved = {f"{k}_moved": not torch.equal(w, self.before[k]) for k, w in self.weights(pl_module).items()}
        self.steps.append({**self.lrs, **moved})


def test_finetune_freezes_the_backbone_then_trains_it_at_a_hundredth_of_the_selectors_lr(tmp_path, monkeypatch):
    spy, original = LearningRateSpy(), SPViT.training_callbacks
    monkeypatch.setattr(SPViT, "training_callbacks", lambda self, stage, model: [
        *original(self, stage, model), *([spy] if stage == "finetune" else [])])
    run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "evaluate.measure_latency=false", *VIT,
                  "method=spvit", "schedule.finetune.epochs=2", "method.backbone_frozen_fraction=0.5",
                  "stages=[train,compress,finetune]"], tmp_path)
    steps = spy.steps
    assert len(steps) == 6 and all(s["selector"] > 0 and s["selector_moved"] for s in steps)
    assert all(s["backbone"] == 0 and not s["backbone_moved"] for s in steps[:3])
    assert all(s["backbone"] == pytest.approx(0.01 * s["selector"]) and s["backbone_moved"] for s in steps[3:])
