"""Multi-level nested sparsity (Qin, Zhang, Sun, Chen, Fardad, Wang, Xie, "Compact Multi-level Sparse Neural
Networks with Input Independent Dynamic Rerouting", ICTAI 2022, arXiv 2112.10930): one model, sub-models at
s1 > s2 > ….

Reference code: no release of this paper was found; compared with the same group's pruning library,
boone891214/GaP — Transformer/prune_utils/multi_level_retrain.py: ``MultiLevelRetrain``;
Transformer/prune_utils/utils_pr.py: ``get_frozen_weights``, ``update_one_frozen_weight``, ``apply_masks``
(W·mask + frozen), ``check_hierarchy``; Transformer/prune_utils/prune_main.py: ``prune_init``. The library has
no rerouting code. Deviations from it, with reasons: docs/fidelity.md (section multilevel).

Algorithm: the dense model is trained (train stage). The compress stage scores every prunable weight by
|w| and builds nested masks, sparsest first (:func:`~compress_run.core.nesting.nested_level_maps`:
level k keeps everything levels < k keep plus the best free entries up to (1 − s_k)·N, with the
``pattern`` projection and ``distribution`` allocation), keeps the dense values of the free entries, and
activates level 0. The finetune stage is split into one phase per level (``lr_cycles`` = number of levels,
so each phase has its own LR schedule, warm-up included): phase 0 retrains level 0's weights like a
masked finetune; at the start of phase k the entries that join at level k get their dense trained values
back, every value a lower level holds is frozen (its gradient zeroed, and the values re-imposed after every
optimizer step so weight decay and momentum cannot move it), and only the level-k entries train. Layers
kept dense (``exclude``), biases and — without per-level BN — BatchNorm are shared by all levels and
therefore frozen after phase 0 too. The evaluate stage reports every level (accuracy, sparsity, MACs,
simulated latency, and ``check_hierarchy`` for every pair); ``evaluate.level=<sparsity>`` picks the
level reported as the model.

Our choices, each a deviation from the library: one-shot magnitude pruning per level (on the dense trained
weights, the same scores for every level, so a level's new entries are the best free ones), where the
library's sparsest level comes from its own ADMM/GaP run; level k's mask is the pattern projection with the
lower levels' entries lifted, so each level's density is exact (the library unites a denser level's own
hard-prune mask with the frozen entries); one stored model and one finetune stage split into one LR cycle
per level, where the library retrains each denser level as a separate run from the sparser level's file;
the phase boundaries follow the LR cycles (optimizer steps, not epochs); ``per_level_bn`` (default true):
every BN's weight, bias and running statistics are trainable in every phase and snapshot per level at the
end of its phase (the statistics alone would leave the shared affine parameters un-nested; the library's
``check_hierarchy`` skips BN). As in the library, lower-level values are frozen by zeroing their gradients
and re-imposing them after every step.

Switching level part-way through the network (the paper's input-independent dynamic rerouting, built from
the paper's description alone: the library has no rerouting code): the level layers are split into
consecutive ``segments`` (by default the network's stages); a per-segment level choice runs segment i at its
own level (:func:`~compress_run.core.nesting.mixed_view`; a BN follows the segment of the layer before it).
The evaluate stage reports, next to the pure levels, every two-level switch (the first k segments at one
level, the rest at another), and ``evaluate.level`` takes a list of per-segment sparsities as well as one;
``evaluate.latency_budget_ms`` picks the configuration (pure or switched) with the best validation accuracy
whose simulated batch-1 latency fits the budget.

Config keys (conf/method/multilevel.yaml), besides ``distribution``, ``pattern``, ``exclude``, ``mask_grads``:
* ``levels`` ([0.95, 0.9, 0.8]): the sparsities, strictly decreasing (level 0 = the first = sparsest).
* ``per_level_bn`` (true): BN parameters and statistics per level.
* ``segments`` (by_stage): how the level layers are split for per-segment level choices: ``by_stage`` (the
  top-level stages) or a list of module-name globs, one per segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn

from compress_run.core.config import check
from compress_run.core.masks import MaskEnforcer
from compress_run.core.nesting import (
    BN_BUFFER,
    LEVEL_BUFFER,
    attach_levels,
    level_layers,
    level_sparsity,
    nested_level_maps,
    set_level_mask,
    store_level_bn,
)
from compress_run.core.projections import fixed_density
from compress_run.methods.base import MaskConfig, MaskPruningMethod, NotApplicable, method_config
from compress_run.methods.partitions import PartitionError, by_globs


@method_config("multilevel")
@dataclass
class MultilevelConfig(MaskConfig):
    levels: list[float] = field(default_factory=lambda: [0.95, 0.9, 0.8])
    per_level_bn: bool = True
    segments: Any = "by_stage"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.segments == "by_stage" or (isinstance(self.segments, list) and len(self.segments) >= 2
                                              and all(isinstance(g, str) for g in self.segments)),
              "method.segments", self.segments, "by_stage or a list of at least two module-name globs")
        levels = list(self.levels)
        check(bool(levels) and all(0 < s < 1 for s in levels)
              and all(a > b for a, b in zip(levels, levels[1:], strict=False)), "method.levels", levels,
              "a non-empty list of sparsities in (0, 1), strictly decreasing (sparsest first)")


class LevelPhases(L.Callback):
    """Finetune in one phase per level: activate level k, freeze what lower levels hold, train the rest."""

    def __init__(self, method: Multilevel) -> None:
        self.method = method
        self.level = -1
        self.frozen: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # name -> (values, positions)

    def phase_of(self, trainer: L.Trainer) -> int:
        count = len(self.method.levels)
        phase_len = max(1, int(trainer.estimated_stepping_batches) // count)
        return min(trainer.global_step // phase_len, count - 1)

    def active_level(self, net: nn.Module) -> int:
        """The level the model's masks currently hold (so a resumed phase is not started again)."""
        name, layer = next(iter(level_layers(net).items()))
        kept = int(layer.weight_mask.sum())
        for level in range(len(self.method.levels)):
            if int((layer._buffers[LEVEL_BUFFER] <= level).sum()) == kept:
                return level
        raise RuntimeError(f"layer {name}: its mask matches no level")

    @torch.no_grad()
    def enter(self, net: nn.Module, level: int, fresh: bool) -> None:
        if fresh and level > 0:
            store_level_bn(net, level - 1)
            for name, layer in level_layers(net).items():
                joining = layer._buffers[LEVEL_BUFFER] == level
                layer.weight[joining] = self.method.dense[name].to(layer.weight.device)[joining]
            set_level_mask(net, level)
        self.level = level
        self.frozen = {}
        if level == 0:
            return
        layers = level_layers(net)
        per_level_bn = {f"{n}.{f}" for n, m in net.named_modules() if BN_BUFFER in m._buffers
                        for f in ("weight", "bias")}
        for name, param in net.named_parameters():
            owner = name.rpartition(".")[0]
            if owner in layers and name.endswith(".weight"):
                positions = layers[owner]._buffers[LEVEL_BUFFER] < level
                self.frozen[name] = (param.detach().clone(), positions)
            elif name not in per_level_bn:
                self.frozen[name] = (param.detach().clone(), None)
        for name, buffer in net.named_buffers():
            if name.endswith(("running_mean", "running_var")) and f"{name.rpartition('.')[0]}.weight" \
                    not in per_level_bn:
                self.frozen[name] = (buffer.detach().clone(), None)

    def on_train_start(self, trainer, pl_module) -> None:
        self.enter(pl_module.net, self.active_level(pl_module.net), fresh=False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        phase = self.phase_of(trainer)
        if phase > self.level:
            self.enter(pl_module.net, phase, fresh=True)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = dict(pl_module.net.named_parameters())
        for name, (_, positions) in self.frozen.items():
            grad = params[name].grad if name in params else None
            if grad is None:
                continue
            if positions is None:
                grad.zero_()
            else:
                grad.masked_fill_(positions, 0.0)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tensors = {**dict(pl_module.net.named_parameters()), **dict(pl_module.net.named_buffers())}
        for name, (values, positions) in self.frozen.items():
            if positions is None:
                tensors[name].copy_(values)
            else:
                tensors[name][positions] = values[positions]
        # the active level's BN snapshot follows its BN at every step (a resumed stage with no steps left
        # must not need an end-of-training hook to get it)
        store_level_bn(pl_module.net, self.level)


class Multilevel(MaskPruningMethod):
    plain_train = True  # its train stage is ordinary training (see Method.trains_plainly)
    state_attributes = ('dense', 'achieved')
    Config = MultilevelConfig

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        self.sparsity = self.levels[-1]  # the densest level is the method's sparsity
        self.dense: dict[str, torch.Tensor] = {}

    def segment_groups(self, model: nn.Module) -> list[list[str]]:
        """The level layers split into consecutive segments (``segments``)."""
        layers = self.layers(model)
        if self.segments == "by_stage":
            groups: list[list[str]] = []
            for name in layers:
                if groups and groups[-1][0].split(".", 1)[0] == name.split(".", 1)[0]:
                    groups[-1].append(name)
                else:
                    groups.append([name])
            return groups
        return by_globs(layers, list(self.segments))

    def check_applicable(self, model: nn.Module) -> None:
        super().check_applicable(model)
        try:
            self.segment_groups(model)
        except PartitionError as exc:
            raise NotApplicable(f"method.segments: {exc}") from exc
        if len(self.levels) < 1 or any(a <= b for a, b in zip(self.levels, self.levels[1:], strict=False)):
            raise NotApplicable(f"method.levels={self.levels} must be strictly decreasing sparsities")
        if fixed_density(self.pattern) is not None:
            raise NotApplicable(f"method.pattern={self.pattern} fixes the density (N:M), so its levels cannot "
                                "differ; use irregular, block, gather_scatter, filter or channel")

    def lr_cycles(self, stage: str) -> int:
        return len(self.levels) if stage == "finetune" else 1

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        if stage != "finetune":
            return []
        return [MaskEnforcer(self.mask_grads), LevelPhases(self)]

    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        layers = self.layers(model)
        scores = {n: m.weight.detach().abs() for n, m in layers.items()}
        try:
            maps = nested_level_maps(layers, scores, self.levels, self.distribution, self.pattern)
        except ValueError as exc:
            raise NotApplicable(str(exc)) from exc
        self.dense = {n: m.weight.detach().cpu().clone() for n, m in layers.items()}
        attach_levels(model, maps, len(self.levels), self.per_level_bn)
        set_level_mask(model, 0)
        self.achieved = {f"level {k}": level_sparsity(model, k) for k in range(len(self.levels))}
        return model

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "levels": self.levels, "per_level_bn": self.per_level_bn,
                "segments": self.segments, "achieved_level_sparsity": self.achieved}

