"""SPViT — latency-aware soft token pruning of vision transformers (Kong, Dong, Ma, Meng, Niu, Sun, Shen, Yuan,
Ren, Tang, Qin, Wang, "SPViT: Enabling Faster Vision Transformers via Latency-aware Soft Token Pruning", ECCV 2022).

Reference code: PeiyanFlying/SPViT (the paper's method section was not reachable here) —
``vit_l2_3keep_senet.py``: ``VisionTransformerDiffPruning.forward`` (selectors, Gumbel decisions, package tokens),
``MultiheadPredictorLG`` (the selector), ``Attention.softmax_with_policy`` (masked attention); ``losses.py``:
``DistillDiffPruningLoss`` (ratio and distillation terms); ``main_l2_vit_3keep_senet.py`` (learning rates).

Algorithm: a trained ViT gets a token selector before each of a few blocks (compress stage); fine-tuning then trains
the network and the selectors together. Each selector scores the patch tokens per head (a local feature of the token
and a global one of the tokens still kept, through a small MLP per head, the heads weighted by a per-token
importance), samples hard keep/drop decisions with Gumbel-softmax, and the blocks from the first selector on attend
only to the kept tokens (masked attention; nothing leaves the sequence while training). The tokens a selector drops
are merged into a new *package token* appended to the sequence, their sum weighted by keep probability (one per
selector, always kept; PeiyanFlying/SPViT ``vit_l2_3keep_senet.py``: ``VisionTransformerDiffPruning.forward``). The
loss is the task loss (distilled from the unpruned network through the shared ``distill.*`` path when the run sets
it) plus ``ratio_weight`` times the mean squared gap between each selector's kept fraction and its cumulative
target. At inference each selector really drops tokens: it keeps its share of the highest-scoring ones, so the
measured latency, the MACs and the simulated latency are those of the shorter sequence
(:mod:`compress_run.core.soft_tokens`).

Config keys (conf/method/spvit.yaml):
* ``keep_targets`` ([0.617, 0.369, 0.137]): cumulative fraction of the patch tokens kept from each selector on
  (the paper's setting for DeiT), one per selector block, non-increasing.
* ``selector_blocks`` ([3, 6, 9]) of ``reference_depth`` (12): the selectors' blocks (0-based) in the paper's
  12-block DeiT, scaled to depth d as ``floor(b * d / reference_depth)`` (depth 6: 1, 3, 4); the scaled blocks must
  differ.
* ``ratio_weight`` (2.0): weight of the keep-ratio penalty, shared out over the selectors.
* ``gumbel_temperature`` (1.0): temperature of the Gumbel-softmax decisions in training.
* ``backbone_lr_scale`` (0.01) and ``backbone_frozen_fraction`` (5/30): in the finetune stage the selectors train
  at the schedule's LR (``schedule.finetune.lr``, cosine); the rest of the network gets LR 0 for the first
  ``backbone_frozen_fraction`` of the stage's steps, then ``backbone_lr_scale`` x the selectors' LR. This is the
  authors' recipe (their code, after DynamicViT: the predictors at the base LR, the backbone at 0 for the first 5
  of 30 epochs, then at 1/100 of the base LR); the paper's text does not give it. Trained together at one LR of
  2e-4, the Fashion-MNIST ViT's selectors kept every token with about the same probability (spread 0.004 within
  an image), so the network learned to live with random drops: ranking the tokens at random scored 77.8%,
  the selectors' ranking 74.6%, on 5000 test images.

Distillation: the authors add 0.5 x a per-example KL to CE (``losses.py``: ``DistillDiffPruningLoss``);
``distill.teacher=train distill.kind=soft_batchmean distill.alpha=0.333`` weights CE and that KL 2:1, which is their
CE + 0.5 x KD up to a factor 1.5 on the loss (the LR absorbs it). The paper also distils the kept tokens' features
(DynamicViT's token distillation); that term is not implemented.

Choices where the paper leaves a detail open, and deviations: a new selector starts at its target (its decision
biases give each token a keep probability near its relative target; see :mod:`compress_run.core.soft_tokens`
for why); each head has its own scoring MLP (the authors'
code builds the list from one module, so its heads share weights); inference keeps a fixed number of tokens per
selector, ``ceil(relative x patches reaching it)`` with ``relative`` = its target over the previous selector's
(DynamicViT's inference; the authors' evaluation keeps the sampled decisions under a mask, which saves nothing),
so a batch runs one sequence length and the MAC count is per-sample exact. After the freeze the backbone's LR
follows the cosine at 1/100 of the selectors' (the authors hold it at 1/100 of the base LR until the cosine falls
below that). The paper's latency-aware part (a per-block latency model to choose where and how much to prune for
a device) is not searched: blocks and targets come from config, and the run reports simulated latency on every
profile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from compress_run.core.config import check
from compress_run.core.soft_tokens import attach_soft_token_pruning, is_selector_parameter
from compress_run.core.tokens import vit_blocks
from compress_run.methods.base import LRScale, Method, MethodConfig, NotApplicable, method_config


@method_config("spvit")
@dataclass
class SPViTConfig(MethodConfig):
    keep_targets: list[float] = field(default_factory=lambda: [0.617, 0.369, 0.137])
    selector_blocks: list[int] = field(default_factory=lambda: [3, 6, 9])
    reference_depth: int = 12
    ratio_weight: float = 2.0
    gumbel_temperature: float = 1.0
    backbone_lr_scale: float = 0.01
    backbone_frozen_fraction: float = 5 / 30

    def __post_init__(self) -> None:
        targets = list(self.keep_targets)
        check(len(targets) >= 1 and all(0.0 < t <= 1.0 for t in targets)
              and all(b <= a for a, b in zip(targets, targets[1:], strict=False)), "method.keep_targets", targets,
              "a non-empty list of non-increasing fractions in (0, 1] (cumulative keep per selector)")
        check(self.reference_depth >= 1, "method.reference_depth", self.reference_depth, "an integer >= 1")
        blocks = list(self.selector_blocks)
        check(len(blocks) == len(targets) and blocks == sorted(set(blocks))
              and all(0 <= b < self.reference_depth for b in blocks), "method.selector_blocks", blocks,
              f"{len(targets)} increasing block indices in [0, reference_depth={self.reference_depth}), one per "
              "method.keep_targets entry")
        check(self.ratio_weight >= 0.0, "method.ratio_weight", self.ratio_weight, "a float >= 0")
        check(self.gumbel_temperature > 0.0, "method.gumbel_temperature", self.gumbel_temperature, "a float > 0")
        check(self.backbone_lr_scale >= 0.0, "method.backbone_lr_scale", self.backbone_lr_scale, "a float >= 0")
        check(0.0 <= self.backbone_frozen_fraction < 1.0, "method.backbone_frozen_fraction",
              self.backbone_frozen_fraction, "a fraction in [0, 1)")


class SPViT(Method):
    stages = ("train", "compress", "finetune", "evaluate")
    plain_train = True  # its train stage is ordinary training (see Method.trains_plainly)
    Config = SPViTConfig

    def selector_targets(self, depth: int) -> dict[int, float]:
        blocks = [b * depth // self.reference_depth for b in self.selector_blocks]
        if len(set(blocks)) != len(blocks):
            raise NotApplicable(
                f"method.selector_blocks={list(self.selector_blocks)} of {self.reference_depth} scale to blocks "
                f"{blocks} of this {depth}-block ViT: two selectors would share a block (give fewer selectors, "
                "e.g. method.selector_blocks=[3,9] method.keep_targets=[0.6,0.3], or a deeper model)")
        return dict(zip(blocks, (float(t) for t in self.keep_targets), strict=True))

    def check_applicable(self, model: nn.Module) -> None:
        try:
            blocks = vit_blocks(model)
        except ValueError as exc:
            raise NotApplicable(str(exc)) from None
        self.selector_targets(len(blocks))
        head_dim = blocks[0].norm1.weight.shape[0] // blocks[0].attn.num_heads
        if head_dim < 2:
            raise NotApplicable(f"SPViT's selectors split each head's {head_dim} channel(s) into local and global "
                                "features: a head needs at least 2 channels")

    def compress(self, model: nn.Module, datamodule: Any) -> nn.Module:
        attach_soft_token_pruning(model, self.selector_targets(len(vit_blocks(model))), self.ratio_weight,
                                  self.gumbel_temperature)
        return model

    def lr_scale(self, stage: str, parameter: str) -> LRScale:
        if stage != "finetune" or is_selector_parameter(parameter):
            return LRScale()
        return LRScale(self.backbone_lr_scale, self.backbone_frozen_fraction)

    def summary(self) -> dict[str, Any]:
        return {"keep_targets": list(self.keep_targets), "selector_blocks": list(self.selector_blocks),
                "ratio_weight": self.ratio_weight, "gumbel_temperature": self.gumbel_temperature,
                "backbone_lr_scale": self.backbone_lr_scale,
                "backbone_frozen_fraction": self.backbone_frozen_fraction}
