"""Gradual magnitude pruning (Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for
model compression", arXiv 1710.01878, ICLR 2018 workshop).

Reference code: tensorflow/model-optimization (the successor of the TF contrib model_pruning library the paper
names; the contrib code itself was not read) —
tensorflow_model_optimization/python/core/sparsity/keras/pruning_schedule.py: ``PolynomialDecay.__call__`` (the
cubic schedule), ``PruningSchedule._should_prune_in_step``;
tensorflow_model_optimization/python/core/sparsity/keras/pruning_impl.py: ``Pruning._update_mask`` (per layer,
top |w|). Deviations from it, with reasons: docs/fidelity.md (section gmp).

Algorithm: from a dense start, during the train stage the target sparsity follows the cubic schedule
s_t = s * (1 - (1 - (t - t0) / (t_end - t0))^3) for optimizer steps t in [t0, t_end]; every
``frequency`` steps the prunable weights are re-masked by |w| to s_t (already-pruned weights score 0, so
the masks only shrink). Between updates the masks are enforced like in finetuning. The compress stage
checks the final sparsity; finetune trains with the masks frozen.

Our choices, each a deviation from the reference: a prune also happens at the first step >= t_end and at
the end of training, so the final sparsity is reached even when t_end - t0 is not a multiple of
``frequency`` (tfmot prunes only on multiples of ``frequency`` inside [t0, t_end]); the stem conv and the
classifier are excluded (the project default; tfmot prunes every layer the user wraps);
``distribution: global | erk`` are extensions (the paper prunes per layer).

Config keys (conf/method/gmp.yaml):
* ``sparsity`` (0.9), ``distribution`` (uniform), ``pattern`` (irregular), ``exclude``, ``mask_grads``:
  as for ``magnitude``.
* ``start_epoch`` (0.0): t0, in (fractional) train epochs.
* ``end_epoch`` (null): t_end in train epochs; null = 3/4 of the train stage (ours: tfmot has no default
  end step; meant to reach the final sparsity well before the learning rate has decayed).
* ``frequency`` (100): optimizer steps between mask updates (the paper's Delta t).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
from torch import nn

from compress_run.core.config import check
from compress_run.core.masks import MaskEnforcer, attach_mask
from compress_run.methods.base import MaskPruningConfig, MaskPruningMethod, method_config


def cubic_sparsity(step: int, t0: int, t_end: int, final: float, initial: float = 0.0) -> float:
    if step <= t0:
        return initial
    if step >= t_end:
        return final
    frac = (step - t0) / (t_end - t0)
    return final + (initial - final) * (1.0 - frac) ** 3


@method_config("gmp")
@dataclass
class GMPConfig(MaskPruningConfig):
    start_epoch: float = 0.0
    end_epoch: float | None = None
    frequency: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.start_epoch >= 0, "method.start_epoch", self.start_epoch, "a float >= 0")
        if self.end_epoch is not None:
            check(self.end_epoch > self.start_epoch, "method.end_epoch", self.end_epoch,
                  f"null or a float > method.start_epoch={self.start_epoch}")
        check(self.frequency >= 1, "method.frequency", self.frequency, "an integer >= 1 (optimizer steps)")


class GMP(MaskPruningMethod):
    Config = GMPConfig

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        if stage == "train":
            for module in self.layers(model).values():
                attach_mask(module, module.weight.new_ones(module.weight.shape, dtype=bool))
            return [MaskEnforcer(self.mask_grads), GMPScheduler(self)]
        return super().training_callbacks(stage, model)

    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        """Finalize: the train stage ends at the target; prune to it if training stopped early."""
        self.prune_to(model, self.sparsity)
        return model

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "start_epoch": self.start_epoch, "end_epoch": self.end_epoch,
                "frequency": self.frequency}


class GMPScheduler(L.Callback):
    """Applies the cubic schedule at optimizer-step granularity; its position is ``trainer.global_step``,
    which Lightning restores on resume, so a resumed run prunes at the same steps."""

    def __init__(self, method: GMP) -> None:
        self.method = method
        self.current = 0.0
        self.t0 = self.t_end = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps_per_epoch = max(1, trainer.num_training_batches // trainer.accumulate_grad_batches)
        end_epoch = self.method.end_epoch if self.method.end_epoch is not None else 0.75 * trainer.max_epochs
        self.t0 = int(round(self.method.start_epoch * steps_per_epoch))
        self.t_end = max(self.t0 + 1, int(round(end_epoch * steps_per_epoch)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        due = step >= self.t0 and ((step - self.t0) % self.method.frequency == 0 or step >= self.t_end)
        target = cubic_sparsity(step, self.t0, self.t_end, self.method.sparsity)
        if due and target > self.current:
            self.method.prune_to(pl_module.net, target)
            self.current = target
            pl_module.log("gmp/sparsity", target, on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.current < self.method.sparsity and trainer.global_step >= self.t_end:
            self.on_train_batch_start(trainer, pl_module, None, 0)

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current = state_dict["current"]
