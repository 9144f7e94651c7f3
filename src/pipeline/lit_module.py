"""LightningModule for classification: loss, accuracy, optimizer and per-step LR schedule.

The network is passed in (not saved as a hyperparameter); masks are buffers of the network, and
``on_load_checkpoint`` registers any mask a checkpoint carries before Lightning loads the weights.
With ``batch_mix`` set (Mixup/CutMix, :class:`compress_run.pipeline.data.BatchMix`) a training batch is mixed
before the forward pass and the loss is the cross-entropy on the mixed class probabilities, label smoothing
applied to them (DeiT's soft-target loss on timm's smoothed mixed targets); the train accuracy and the callbacks
compare the mixed batch's logits with the batch's own labels (as E-ViT's released code counts forgetting).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from compress_run.core.auxiliary import auxiliary_losses
from compress_run.core.errors import TrainingDiverged
from compress_run.core.masks import attach_masks_from_state_dict
from compress_run.methods.base import LRScale
from compress_run.methods.distill import Distillation


def lr_lambda(step: int, steps_per_epoch: int, epochs: float, schedule: str, warmup_epochs: float,
              milestones: list[float], gamma: float, cycles: int = 1, total_steps: int = 0,
              segments: list[tuple[int, int, int]] | None = None) -> float:
    """LR multiplier at optimizer step ``step`` (linear warm-up, then cosine / step / constant).

    ``cycles > 1`` restarts the whole schedule (warm-up included) every ``total_steps // cycles`` steps,
    each cycle spanning ``epochs / cycles`` epochs: what separate training runs per cycle would do
    (GaP steps, lottery-ticket retraining rounds). The last cycle absorbs the remainder steps.
    ``segments`` — (from step, from epoch, steps per epoch) entries appended when epochs get shorter
    mid-stage (data removal): the schedule then follows epochs, not the step count of full epochs.
    """
    later = [seg for seg in segments or [] if seg[0] <= step]
    if later and cycles == 1:
        start_step, start_epoch, per_epoch = later[-1]
        step = int((start_epoch + (step - start_step) / max(1, per_epoch)) * steps_per_epoch)
    if cycles > 1:
        cycle_len = max(1, total_steps // cycles)
        step -= min(step // cycle_len, cycles - 1) * cycle_len
        epochs = epochs / cycles
    epoch = step / max(1, steps_per_epoch)
    warm = warmup_epochs
    if warm > 0 and epoch < warm:
        return (step + 1) / max(1.0, warm * steps_per_epoch)
    if schedule == "cosine":
        progress = (epoch - warm) / max(1e-8, epochs - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        return gamma ** sum(epoch >= m for m in milestones)
    return 1.0


def schedule_lr(parameter: str) -> LRScale:
    """The default :class:`LRScale` of every parameter: the stage's schedule."""
    return LRScale()


def scaled_lr(step: int, schedule: Callable[[int], float], scale: float, frozen_steps: float) -> float:
    """LR multiplier of a parameter group with its own :class:`LRScale`: 0 for the stage's first ``frozen_steps``
    steps, then ``scale`` x the stage's schedule."""
    return 0.0 if step < frozen_steps else scale * schedule(step)


class ClassifierModule(L.LightningModule):
    def __init__(self, net: nn.Module, optimizer: Any, lr: float, epochs: int, lr_schedule: str = "cosine",
                 warmup_epochs: float = 0.0, milestones: list[float] | None = None, gamma: float = 0.1,
                 label_smoothing: float = 0.0, decay_norm_and_bias: bool = True, lr_cycles: int = 1,
                 example_input_shape: tuple[int, ...] | None = None,
                 lr_scale: Callable[[str], LRScale] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "example_input_shape", "lr_scale"])
        self.lr_scale = lr_scale or schedule_lr  # a parameter's LR relative to the schedule
        if example_input_shape:
            self.example_input_array = torch.zeros(example_input_shape)
        self.net = net
        self.optimizer_factory = optimizer
        self.lr_segments: list[tuple[int, int, int]] = []   # see lr_lambda; saved in checkpoints
        self.last_train_logits: torch.Tensor | None = None  # for callbacks tracking per-example outcomes
        self.distillation: Distillation | None = None        # set by the pipeline: the training loss distils
        self.batch_mix: Callable | None = None                # set by the pipeline: (x, y, epoch, rank) -> mixed
        self.stage = "train"                                  # set by the pipeline: the stage this module trains

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, prefix: str) -> torch.Tensor:
        x, y = batch
        targets = y  # class indices, or class probabilities of a mixed batch
        if prefix == "train" and self.batch_mix is not None:
            x, targets = self.batch_mix(x, y, self.current_epoch, self.global_rank)
        logits = self(x)
        smoothing = self.hparams.label_smoothing if prefix == "train" else 0.0
        if prefix == "train" and self.distillation is not None:
            loss = self.distillation.loss(logits, targets, x, label_smoothing=smoothing)
        else:
            loss = F.cross_entropy(logits, targets, label_smoothing=smoothing)
        if prefix == "train":
            self.last_train_logits = logits.detach()
        return self.finish_step(prefix, loss, "acc", (logits.argmax(1) == y).float().mean(), len(y))

    def finish_step(self, prefix: str, loss: torch.Tensor, accuracy_name: str, accuracy: torch.Tensor,
                    batch_size: int) -> torch.Tensor:
        """Add the network's own training goals (token selectors) to a training loss, log loss and accuracy."""
        if prefix == "train":
            for name, term in auxiliary_losses(self.net).items():
                loss = loss + term
                self.log(f"train/{name}", term, on_step=True, on_epoch=True, batch_size=batch_size)
        on_step = prefix == "train"
        self.log(f"{prefix}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=prefix != "test",
                 batch_size=batch_size, sync_dist=not on_step)
        self.log(f"{prefix}/{accuracy_name}", accuracy, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch_size, sync_dist=True)
        return loss

    def on_fit_start(self) -> None:
        if self.distillation is not None:
            self.distillation.teacher.to(self.device).eval().requires_grad_(False)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        diverged = not bool(torch.isfinite(loss.detach()))
        if self.trainer.world_size > 1:  # every rank stops at the same step, none waits in an all-reduce
            diverged = self.trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if diverged:
            raise TrainingDiverged(self.stage, self.current_epoch, self.global_step, float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        groups: dict[tuple[bool, LRScale], list[nn.Parameter]] = {(True, LRScale()): [], (False, LRScale()): []}
        for name, p in self.net.named_parameters():
            if not p.requires_grad:
                continue
            exempt = not hp.decay_norm_and_bias and (p.ndim <= 1 or name.endswith(".bias"))
            groups.setdefault((not exempt, self.lr_scale(name)), []).append(p)
        optimizer = self.optimizer_factory([{"params": params, **({} if decays else {"weight_decay": 0.0})}
                                            for (decays, _), params in groups.items()], lr=hp.lr)
        total_steps = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, math.ceil(total_steps / max(1, hp.epochs)))
        fn = partial(lr_lambda, steps_per_epoch=steps_per_epoch, epochs=hp.epochs, schedule=hp.lr_schedule,
                     warmup_epochs=hp.warmup_epochs, milestones=list(hp.milestones or []), gamma=hp.gamma,
                     cycles=hp.lr_cycles, total_steps=total_steps, segments=self.lr_segments)
        scales = [partial(scaled_lr, schedule=fn, scale=lr.scale, frozen_steps=lr.frozen_fraction * total_steps)
                  for _, lr in groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scales)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def shorter_epochs_from_now(self, steps_per_epoch: int) -> None:
        """Epochs from the next one on have ``steps_per_epoch`` optimizer steps (data was removed)."""
        self.lr_segments.append((self.trainer.global_step, self.trainer.current_epoch, steps_per_epoch))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["compress_run"] = getattr(self, "run_meta", {})
        checkpoint["lr_segments"] = list(self.lr_segments)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        attach_masks_from_state_dict(self.net, checkpoint["state_dict"], prefix="net.")
        self.lr_segments[:] = [tuple(seg) for seg in checkpoint.get("lr_segments", [])]  # the lambda holds this list
