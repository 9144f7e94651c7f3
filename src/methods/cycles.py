"""Stages made of consecutive "cycles": GaP steps, P-GaP workers, lottery-ticket retraining rounds.

A cycle is what the authors' released scripts run as a separate training job (boone891214/GaP: the
multi_round_gap drivers, one job per step or worker; boone891214/sanity-check-LTH: run_imp_lr0.1.py, one job
per IMP round). Inside one Lightning fit the stage's optimizer steps are split into ``cycles`` equal parts
(``total // cycles`` steps each, the last one absorbing the remainder, the same split
:func:`compress_run.pipeline.lit_module.lr_lambda` uses to restart the LR schedule). At the first optimizer
step of cycle k >= 1 the callback calls ``on_boundary(k, trainer, pl_module)`` and, when asked, clears the
optimizer state (a fresh optimizer, as a new job has).

Everything is a function of ``trainer.global_step``, which Lightning restores on resume; a boundary
falls at a batch start, after any epoch checkpoint of the same step, so a resumed run crosses every
boundary exactly once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import lightning as L
import torch


def geometric_rounds(sparsity: float, fraction: float) -> int:
    """Rounds that remove ``fraction`` of the remaining weights each until ``sparsity`` (the last one clamped)."""
    return max(1, math.ceil(math.log(1.0 - sparsity) / math.log(1.0 - fraction) - 1e-9))


def cycle_length(total_steps: int, cycles: int) -> int:
    return max(1, total_steps // max(1, cycles))


def cycle_of(step: int, total_steps: int, cycles: int) -> int:
    return min(step // cycle_length(total_steps, cycles), cycles - 1)


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integers (e.g. run seed and cycle index): reproducible per cycle."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


Boundary = Callable[[int, L.Trainer, L.LightningModule], None]


class CycleCallback(L.Callback):
    """Calls ``on_boundary(k, trainer, pl_module)`` at the first optimizer step of every cycle k >= 1."""

    def __init__(self, cycles: int, reset_optimizer: bool, name: str, on_boundary: Boundary) -> None:
        self.cycles, self.reset_optimizer, self.name = cycles, reset_optimizer, name
        self.on_boundary = on_boundary
        self.total_steps = 0
        self.last_boundary = 0  # guards gradient accumulation (several batch starts per optimizer step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.total_steps = int(trainer.estimated_stepping_batches)
        if self.total_steps < self.cycles:
            warnings.warn(f"{self.name}: the stage has {self.total_steps} optimizer steps for {self.cycles} "
                          f"cycles; cycles beyond step {self.total_steps} never start", stacklevel=1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step, length = trainer.global_step, cycle_length(self.total_steps, self.cycles)
        if step == 0 or step % length or step // length >= self.cycles:
            return
        k = step // length
        if k <= self.last_boundary:
            return
        self.last_boundary = k
        self.on_boundary(k, trainer, pl_module)
        if self.reset_optimizer:
            for optimizer in trainer.optimizers:
                optimizer.state.clear()
        pl_module.log(f"{self.name}/cycle", float(k), on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"last_boundary": self.last_boundary}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_boundary = state_dict.get("last_boundary", 0)
