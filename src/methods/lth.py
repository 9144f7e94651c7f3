"""Lottery tickets with the sanity checks (Ma, Yuan, …, Qin et al., "Sanity checks for lottery tickets: does
your winning ticket really win the jackpot?", NeurIPS 2021) — a protocol on top of global magnitude pruning.

Reference code: boone891214/sanity-check-LTH — cifar/scripts/resnet20/iterative_pruning_lth_setting/run_imp_lr0.1.py
(IMP: 20% of the remaining weights per round, retrained from the original init for 160 epochs);
cifar/scripts/resnet20/oneshot_pruning_lth_setting/run_omp_lr_0.1.sh (one-shot ticket);
cifar/scripts/resnet20/oneshot_pruning_retraining/run_prune_lr_0.1.sh (pruning + retraining from trained weights);
cifar/prune_utils/prune_main.py: ``update_prune_ratio`` (one global threshold);
cifar/profiles/resnet20_LTH/irregular/resnet_global.yaml (the layer set: no stem, no classifier). Compared also
with facebookresearch/open_lth — pruning/sparse_global.py: ``Strategy.prune``.
Deviations from it, with reasons: docs/fidelity.md (section lth).

Algorithm: the train stage trains the dense network and keeps the *rewind point*: the original init
(``rewind_epoch: 0``) or the weights after ``rewind_epoch`` epochs. Then
* ``imp`` (iterative magnitude pruning with rewinding): the compress stage prunes ``prune_rate`` (20%)
  of the remaining weights by one global |w| threshold and rewinds the survivors; the finetune stage is
  ``rounds`` retraining runs of equal length (cycles, with fresh optimizer and restarted LR schedule);
  between runs the next 20% of the remaining weights go (masks only shrink) and the survivors rewind
  again. Sparsity after round r is 1 - 0.8^r; the last round is clamped to exactly ``sparsity``, so
  rounds = ceil(log(1 - sparsity) / log(1 - prune_rate)) (ours: the authors run a fixed 15 rounds and
  report each).
* ``oneshot``: prune the trained dense model once to ``sparsity``, rewind, retrain once.
``init`` picks what the survivors are reset to: ``original`` (the ticket: the rewind point),
``random`` (sanity control: the ticket's masks trained from a *different* random init: the pipeline
builds a fresh network from another seed, seed + 1_000_003, so the model's own initializers are used; the
authors rerun with another ``--seed``) or ``trained`` (no rewinding: retrain from the trained weights, i.e.
pruning + fine-tuning).

The random re-init control of IMP must train *the ticket's* masks at every round, not masks found by
pruning its own randomly re-initialised network (from round 2 on those differ). Every IMP run records
for each prunable weight the last round that keeps it (``kept_through``, in its checkpoints), and the
control reads them from ``ticket`` (the output dir of a finished ``init: original`` run, or one of its
stage checkpoints): its masks equal the ticket's, bit for bit, at every round. With a ticket the control
has no train stage (nothing of a trained dense network is used). ``protocol: imp`` with ``init: random``
and no ticket is refused. For ``oneshot`` the ticket is optional (the control's own dense training with
the same seed finds the same mask).
Rewinding restores every parameter and buffer of the network (BN included) from a stored copy; the
authors' scripts rebuild the whole initial state from the same seed, which is equivalent. Masks are kept.

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
* ``ticket`` (null): for ``init: random``, the finished ticket run (output dir or checkpoint) whose masks
  the control trains.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from compress_run.core.config import check
from compress_run.core.masks import MASK_SUFFIX, MaskEnforcer, apply_masks, attach_mask, get_mask
from compress_run.methods.base import MaskPruningConfig, MaskPruningMethod, NotApplicable, method_config
from compress_run.methods.cycles import CycleCallback, geometric_rounds

PROTOCOLS = ("imp", "oneshot")
INITS = ("original", "random", "trained")


imp_rounds = geometric_rounds  # IMP's rounds at prune_rate per round


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


@method_config("lth")
@dataclass
class LTHConfig(MaskPruningConfig):
    sparsity: float = 0.9
    distribution: str = "global"
    protocol: str = "imp"
    prune_rate: float = 0.2
    rewind_epoch: int = 0
    init: str = "original"
    ticket: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.sparsity > 0, "method.sparsity", self.sparsity, "a float in (0, 1)")
        check(self.protocol in PROTOCOLS, "method.protocol", self.protocol, ", ".join(PROTOCOLS))
        check(0 < self.prune_rate < 1, "method.prune_rate", self.prune_rate, "a float in (0, 1)")
        check(self.rewind_epoch >= 0, "method.rewind_epoch", self.rewind_epoch, "an integer >= 0 (0 = init)")
        check(self.init in INITS, "method.init", self.init, ", ".join(INITS))


def load_ticket(path: str) -> dict[str, Any]:
    """The method state of a finished ticket run: its output dir (the finetune checkpoint) or a checkpoint."""
    where = Path(path)
    if where.is_dir():
        where = where / "checkpoints" / "finetune.ckpt"
    if not where.is_file():
        raise NotApplicable(f"method.ticket={path}: {where} does not exist (the ticket run must have finished its "
                            "finetune stage)")
    try:
        ckpt = torch.load(where, map_location="cpu", weights_only=False)
        return dict(ckpt["compress_run"]["method_state"])
    except Exception as exc:  # any unreadable file is the user's input
        raise NotApplicable(f"method.ticket={path}: {where} is not a compress-run checkpoint ({exc})") from exc


class LTH(MaskPruningMethod):
    Config = LTHConfig

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        self.seed = torch.initial_seed()
        self.rewind_state: dict[str, torch.Tensor] = {}
        self.rounds_log: list[dict[str, float]] = []
        self.kept_through: dict[str, torch.Tensor] = {}   # per prunable weight: the last round that keeps it
        self.ticket_masks: dict[str, torch.Tensor] = {}   # the ticket's kept_through, read by the control
        if self.ticket:  # the control trains the ticket's masks from a fresh init: no dense training
            self.stages = ("compress", "finetune", "evaluate")

    def check_applicable(self, model: nn.Module) -> None:
        super().check_applicable(model)
        if self.ticket and self.init != "random":
            raise NotApplicable(f"method.ticket is read by the random re-init control only (method.init=random), "
                                f"not with method.init={self.init}")
        if self.init == "random" and self.protocol == "imp" and not self.ticket:
            raise NotApplicable("the random re-init control of IMP trains the ticket's masks of every round; set "
                                "method.ticket=<output dir of the finished IMP run with method.init=original>")
        if self.ticket:
            state = load_ticket(self.ticket)
            kept = state.get("kept_through", {})
            layers = self.layers(model)
            if state.get("protocol", self.protocol) != self.protocol or set(kept) != set(layers) or any(
                    kept[n].shape != m.weight.shape for n, m in layers.items()):
                raise NotApplicable(f"method.ticket={self.ticket} is not a {self.protocol} ticket of this model "
                                    "(its recorded masks do not match the prunable layers)")
            if state.get("rounds") != self.rounds:
                raise NotApplicable(f"method.ticket={self.ticket} has {state.get('rounds')} prune rounds, this run "
                                    f"{self.rounds}; use the ticket's method.sparsity and method.prune_rate")
            self.ticket_masks = kept

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
        layers = self.layers(model)
        if self.ticket_masks:  # the control: the ticket's round-r masks
            for name, module in layers.items():
                attach_mask(module, self.ticket_masks[name].to(module.weight.device) >= r)
        else:
            self.prune_to(model, self.round_sparsity(r))
        for name, module in layers.items():
            kept = self.kept_through.setdefault(name, torch.zeros(module.weight.shape, dtype=torch.uint8))
            kept[get_mask(module).cpu()] = r
        if self.init != "trained":
            if not self.rewind_state:
                raise RuntimeError("lth: no rewind point was recorded during the train stage")
            model.load_state_dict(self.rewind_state, strict=False)
            apply_masks(model)

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "protocol": self.protocol, "prune_rate": self.prune_rate,
                "rewind_epoch": self.rewind_epoch, "init": self.init, "rounds": self.rounds,
                "round_sparsity": [self.round_sparsity(r) for r in range(1, self.rounds + 1)],
                "rounds_log": self.rounds_log, "ticket": self.ticket}

    def state_dict(self) -> dict[str, Any]:
        return {"rewind_state": self.rewind_state, "rounds_log": self.rounds_log, "kept_through": self.kept_through,
                "protocol": self.protocol, "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rewind_state = dict(state.get("rewind_state", {}))
        self.rounds_log = list(state.get("rounds_log", []))
        self.kept_through = dict(state.get("kept_through", {}))


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
