"""Pipeline callbacks: per-epoch reseeding (for bit-exact resume), the training clock, epochs re-sized after a
method changed the train set, plain-text epoch lines, and the check that distributed ranks hold the same
compression state."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from rich.console import Console

from compress_run.core.masks import masked_parameters
from compress_run.pipeline.data import _mix


def reseed(seed: int, stage: str, epoch: int = -1) -> None:
    """Seed torch/numpy/random from (seed, stage, epoch); ``epoch=-1`` is the start of the stage."""
    s = _mix(seed, sum(map(ord, stage)), epoch, 5)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


class EpochSeed(L.Callback):
    """Reseed torch/numpy/random at every train epoch start from (seed, stage, epoch), so any random op
    inside the model (dropout, drop-path, method RNG drawn from the global generator) does not depend on
    what happened before the epoch: a run resumed from an epoch checkpoint continues identically."""

    def __init__(self, seed: int, stage: str) -> None:
        self.seed, self.stage = seed, stage

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reseed(self.seed, self.stage, trainer.current_epoch)


class TrainingClock(L.Callback):
    """Sums the wall and the process CPU seconds of every train epoch (its validation included) of one fit.

    The sums live in the epoch checkpoints, so a fit resumed after a crash counts the epochs before the crash
    once, and the time between epochs (a paused queue, a restart) is not counted. The CPU seconds are also
    blind to a pause inside an epoch and to other processes sharing the cores, which makes them the
    comparable training cost on a shared host (data-loading worker processes are not included: with
    ``num_workers: 0`` every second of the epoch is this process's)."""

    def __init__(self) -> None:
        self.epochs, self.wall_s, self.cpu_s = 0, 0.0, 0.0
        self._start = (0.0, 0.0)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs += 1
        self.wall_s += time.perf_counter() - self._start[0]
        self.cpu_s += time.process_time() - self._start[1]

    def state_dict(self) -> dict[str, float]:
        return {"epochs": self.epochs, "wall_s": self.wall_s, "cpu_s": self.cpu_s}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.epochs = int(state_dict["epochs"])
        self.wall_s, self.cpu_s = float(state_dict["wall_s"]), float(state_dict["cpu_s"])


class EpochLength(L.Callback):
    """Re-sizes an epoch that a method's callback shortened at the epoch's start (MEST's data removal, E-ViT's
    held-out examples exclude train examples through the sampler).

    Lightning sizes an epoch when it loads the train loader, before ``on_train_epoch_start``, and validates when
    the batch index reaches a multiple of the size it computed (``val_check_batch``); a shortened epoch never
    reaches it, so it would train without ever validating. This callback must come after the method's
    callbacks and before the progress bar. It only shrinks the size: a loader that grew would be cut at the
    size Lightning computed anyway. An integer ``trainer.val_check_interval`` (validate every k batches) is
    the user's and left as it is."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader, loop = trainer.train_dataloader, trainer.fit_loop
        try:
            batches = len(loader)
        except TypeError:  # an iterable without a length: Lightning validates on its last batch already
            return
        limit = trainer.limit_train_batches
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        if not 0 < batches < loop.max_batches:
            return
        loop.max_batches = batches
        interval = trainer.val_check_interval
        if isinstance(interval, float) and trainer.val_check_batch not in (None, float("inf")):
            trainer.val_check_batch = max(1, int(batches * interval))


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


def _fingerprint(value: Any, digest: Any, tensor_bytes: Callable[[torch.Tensor], bytes]) -> None:
    """Feed a canonical encoding of ``value`` (tensors, containers, scalars) into ``digest``."""
    if isinstance(value, torch.Tensor):
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        digest.update(tensor_bytes(value))
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _fingerprint(value[key], digest, tensor_bytes)
        digest.update(b"}")
    elif isinstance(value, (list, tuple, set, frozenset)):
        digest.update(b"[")
        for item in (sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value):
            _fingerprint(item, digest, tensor_bytes)
        digest.update(b"]")
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        digest.update(repr(value).encode())
    elif dataclasses.is_dataclass(value):
        _fingerprint(dataclasses.asdict(value), digest, tensor_bytes)
    else:  # an object without a canonical form: its type only (a repr may hold a memory address)
        digest.update(type(value).__qualname__.encode())


class RankAgreement(L.Callback):
    """Distributed training: the compression state must be identical on every rank, and this checks it, not
    assumes it. After every training batch (once the method's own callbacks have run) each rank hashes its
    masks, the shapes of every parameter and buffer (channel and rank changes), the method's state and the
    state of the method's callbacks (GaP partitions, CHEX channels, ranks, schedules), and the ranks compare
    the hashes through one all-gather of a few integers; at every epoch end the weights themselves are
    compared too (not the buffers: batch-norm running statistics, DDP broadcasts them from rank 0 before
    each forward, so they are rank-local in between). A mismatch stops the run naming the part, stage, epoch and step.

    A tensor is re-hashed only when it changed (its identity, storage or version counter), so a step
    without a mask update costs one small all-gather."""

    def __init__(self, stage: str, method: Any, callbacks: list[L.Callback]) -> None:
        self.stage, self.method = stage, method
        self.callbacks = [c for c in callbacks if c is not self]
        self._hashes: dict[int, tuple[torch.Tensor, tuple[int, int], bytes]] = {}  # last check's tensors
        self._seen: dict[int, tuple[torch.Tensor, tuple[int, int], bytes]] = {}
        self.checks = 0

    @staticmethod
    def _hash(tensor: torch.Tensor) -> bytes:
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        return hashlib.blake2b(flat.view(torch.uint8).numpy().tobytes(), digest_size=8).digest()

    def _tensor_bytes(self, tensor: torch.Tensor) -> bytes:
        # the cache holds the tensor itself, so an id is never another tensor's while it is cached
        key = (tensor.untyped_storage().data_ptr() if tensor.numel() else 0, tensor._version)
        cached = self._hashes.get(id(tensor))
        if cached is None or cached[0] is not tensor or cached[1] != key:
            cached = (tensor, key, self._hash(tensor))
        self._seen[id(tensor)] = cached
        return cached[2]

    def _digest(self, value: Any, cache: bool = True) -> int:
        digest = hashlib.blake2b(digest_size=8)
        _fingerprint(value, digest, self._tensor_bytes if cache else self._hash)
        return int.from_bytes(digest.digest(), "little", signed=True)

    def parts(self, pl_module: L.LightningModule, weights: bool) -> dict[str, int]:
        net = pl_module.net
        found = {"masks": self._digest({name: mask for name, _, mask in masked_parameters(net)}),
                 "shapes": self._digest([(name, tuple(t.shape)) for name, t in
                                         itertools.chain(net.named_parameters(), net.named_buffers())]),
                 "method state": self._digest(self.method.state_dict())}
        for callback in self.callbacks:
            state = callback.state_dict()
            if state:
                found[f"{type(callback).__name__} state"] = self._digest(state)
        if weights:  # parameters only: DDP leaves batch-norm running statistics rank-local between broadcasts
            found["weights"] = self._digest(dict(net.named_parameters()), cache=False)
        self._hashes, self._seen = self._seen, {}
        return found

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule, weights: bool) -> None:
        if trainer.world_size <= 1:
            return
        parts = self.parts(pl_module, weights)
        local = torch.tensor(list(parts.values()), dtype=torch.int64, device=pl_module.device)
        gathered = trainer.strategy.all_gather(local).reshape(trainer.world_size, -1)
        differ = [name for i, name in enumerate(parts) if not torch.all(gathered[:, i] == gathered[0, i])]
        if differ:
            raise RuntimeError(
                f"distributed {self.stage} stage: {', '.join(differ)} differ between ranks at epoch "
                f"{trainer.current_epoch} (global step {trainer.global_step}); a method computed its state from "
                "rank-local data (its own shard of the batch, a rank-local random generator) instead of from "
                "state that every rank shares")
        self.checks += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.check(trainer, pl_module, weights=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module, weights=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.world_size > 1 and trainer.global_rank == 0:
            print(f"[compress-run] stage {self.stage}: compression state identical on {trainer.world_size} ranks at "
                  f"all {self.checks} checks (every step; weights at every epoch end)", flush=True)
