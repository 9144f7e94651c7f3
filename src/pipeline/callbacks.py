"""Pipeline callbacks: per-epoch reseeding (for bit-exact resume) and plain-text epoch lines."""

from __future__ import annotations

import random
import sys
import time

import lightning as L
import numpy as np
import torch
from rich.console import Console

from compress_run.pipeline.data import _mix


class EpochSeed(L.Callback):
    """Reseed torch/numpy/random at every train epoch start from (seed, stage, epoch), so any random op
    inside the model (dropout, drop-path, method RNG drawn from the global generator) does not depend on
    what happened before the epoch: a run resumed from an epoch checkpoint continues identically."""

    def __init__(self, seed: int, stage: str) -> None:
        self.seed, self.stage = seed, stage

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        s = _mix(self.seed, sum(map(ord, self.stage)), trainer.current_epoch, 5)
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)


class EpochLine(L.Callback):
    """One line per epoch (used instead of a progress bar when stdout is not a terminal)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.t0 = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        m = trainer.callback_metrics
        parts = [f"{k}={float(m[k]):.4f}" for k in ("train/loss_epoch", "val/loss", "val/acc") if k in m]
        if trainer.global_rank != 0:
            return
        line = (f"\\[{self.stage}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} {' '.join(parts)} "
                f"({time.perf_counter() - self.t0:.1f}s)")
        Console(file=sys.stdout, highlight=False, soft_wrap=True).print(line)

