"""Lottery tickets with the sanity checks (Ma, Yuan, …, Qin et al., "Sanity checks for lottery tickets: does
your winning ticket really win the jackpot?", NeurIPS 2021) — a protocol on top of global magnitude pruning.

Algorithm: the train stage trains the dense network and keeps the *rewind point*: the original init
(``rewind_epoch: 0``) or the weights after ``rewind_epoch`` epochs. Then
* ``imp`` (iterative magnitude pruning with rewinding): the compress stage prunes ``prune_rate`` (20%)
  of the remaining weights by one global |w| threshold and rewinds the survivors; the finetune stage is
  ``rounds`` retraining runs of equal length (cycles, with fresh optimizer and restarted LR schedule);
  between runs the next 20% of the remaining weights go (masks only shrink) and the survivors rewind
  again. Sparsity after round r is 1 - 0.8^r; the last round is clamped to exactly ``sparsity``, so
  rounds = ceil(log(1 - sparsity) / log(1 - prune_rate)).
* ``oneshot``: prune the trained dense model once to ``sparsity``, rewind, retrain once.
``init`` picks what the survivors are reset to: ``original`` (the ticket: the rewind point),
``random`` (sanity control: the same masks from a *different* random init: the pipeline builds a
fresh network from another seed, so the model's own initializers are used) or ``trained`` (no
rewinding: retrain from the trained weights, i.e. pruning + fine-tuning).
Rewinding restores every parameter and buffer of the network (BN included),
as the original code rewinds the whole state; masks are kept.

The schedule decides the length: ``schedule.finetune`` is the whole retraining stage, split evenly into
the rounds (the paper's CIFAR recipe retrains 160 epochs per round, so an experiment sets
``schedule.finetune.epochs`` to rounds x 160 with the train stage's LR recipe).

Config keys (conf/method/lth.yaml):
* ``sparsity`` (0.9), ``distribution`` (global, as the paper), ``pattern`` (irregular), ``exclude``
  ([first_conv, classifier]), ``mask_grads`` (true): as for ``magnitude``.
* ``protocol`` (imp): imp | oneshot.
* ``prune_rate`` (0.2): fraction of the remaining weights removed per IMP round.
* ``rewind_epoch`` (0): 0 = original init; k > 0 = weights after k train epochs (late rewinding).
* ``init`` (original): original | random | trained.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from compress_run.methods.base import MaskPruningMethod
from compress_run.methods.cycles import CycleCallback
from compress_run.methods.masks import MASK_SUFFIX, MaskEnforcer, apply_masks

PROTOCOLS = ("imp", "oneshot")
INITS = ("original", "random", "trained")


def imp_rounds(sparsity: float, prune_rate: float) -> int:
    return max(1, math.ceil(math.log(1.0 - sparsity) / math.log(1.0 - prune_rate) - 1e-9))


def weights_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer except masks, cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(MASK_SUFFIX)}


@torch.no_grad()
def random_reinit_state(model: nn.Module, seed: int, factory: Callable[[], nn.Module] | None = None
                        ) -> dict[str, torch.Tensor]:
    """The state of a fresh init of the same architecture drawn from ``seed``: built by ``factory`` (the
    model's own initializers), else by each module's ``reset_parameters`` on a copy of ``model``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if factory is not None:
            return weights_state(factory())
        fresh = copy.deepcopy(model)
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
        return weights_state(fresh)


class LTH(MaskPruningMethod):
    def __init__(self, protocol: str = "imp", prune_rate: float = 0.2, rewind_epoch: int = 0, init: str = "original",
                 distribution: str = "global", **kwargs: Any) -> None:
        super().__init__(distribution=distribution, **kwargs)
        self.protocol, self.prune_rate, self.rewind_epoch, self.init = protocol, prune_rate, rewind_epoch, init
        self.seed = torch.initial_seed()
        self.rewind_state: dict[str, torch.Tensor] = {}
        self.rounds_log: list[dict[str, float]] = []

    @property
    def rounds(self) -> int:
        return imp_rounds(self.sparsity, self.prune_rate) if self.protocol == "imp" else 1

    def round_sparsity(self, r: int) -> float:
        """Target sparsity after prune round ``r`` (1-based)."""
        if self.protocol == "oneshot" or r >= self.rounds:
            return self.sparsity
        return 1.0 - (1.0 - self.prune_rate) ** r

    def lr_cycles(self, stage: str) -> int:
        return self.rounds if stage == "finetune" else 1

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        if stage == "train":
            if self.rewind_epoch == 0:
                self.rewind_state = weights_state(model)  # before any checkpoint restore: the original init
            return [RewindPoint(self)]
        return [MaskEnforcer(self.mask_grads), IMPRounds(self)]

    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        if self.init == "random":
            self.rewind_state = random_reinit_state(model, self.seed + 1_000_003, self.model_factory)
        self.prune_and_rewind(model, 1)
        return model

    @torch.no_grad()
    def prune_and_rewind(self, model: nn.Module, r: int) -> None:
        self.prune_to(model, self.round_sparsity(r))
        if self.init != "trained":
            if not self.rewind_state:
                raise RuntimeError("lth: no rewind point was recorded during the train stage")
            model.load_state_dict(self.rewind_state, strict=False)
            apply_masks(model)

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "protocol": self.protocol, "prune_rate": self.prune_rate,
                "rewind_epoch": self.rewind_epoch, "init": self.init, "rounds": self.rounds,
                "round_sparsity": [self.round_sparsity(r) for r in range(1, self.rounds + 1)],
                "rounds_log": self.rounds_log}

    def state_dict(self) -> dict[str, Any]:
        return {"rewind_state": self.rewind_state, "rounds_log": self.rounds_log}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rewind_state = dict(state.get("rewind_state", {}))
        self.rounds_log = list(state.get("rounds_log", []))


class RewindPoint(L.Callback):
    """Keeps the weights after ``rewind_epoch`` train epochs (late rewinding); resumable."""

    def __init__(self, method: LTH) -> None:
        self.method = method

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.method.rewind_epoch and trainer.current_epoch + 1 == self.method.rewind_epoch:
            self.method.rewind_state = weights_state(pl_module.net)

    def state_dict(self) -> dict[str, Any]:
        return {"rewind_state": self.method.rewind_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.method.rewind_state = state_dict["rewind_state"]


class IMPRounds(CycleCallback):
    """Between retraining rounds: log the round, prune the next fraction globally, rewind the survivors."""

    def __init__(self, method: LTH) -> None:
        super().__init__(method.rounds, reset_optimizer=True, name="lth", on_boundary=self.next_round)
        self.method = method

    def next_round(self, k: int, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_round(k, trainer)
        self.method.prune_and_rewind(pl_module.net, k + 1)

    def on_train_end(self, trainer, pl_module) -> None:
        if len(self.method.rounds_log) < self.method.rounds:
            self.log_round(self.method.rounds, trainer)

    def log_round(self, r: int, trainer: L.Trainer) -> None:
        metrics = trainer.callback_metrics
        self.method.rounds_log.append({"round": r, "sparsity": self.method.round_sparsity(r),
                                       "val/acc": float(metrics["val/acc"]) if "val/acc" in metrics else None})

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.method.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.method.load_state_dict(state_dict)
