"""Tri-level E-ViT — efficient ViT training by sparsity at three levels of the data (Kong, Ma, Yuan, …, Wang,
"Peeling the Onion: Hierarchical Reduction of Data Redundancy for Efficient Vision Transformer Training",
AAAI 2023).

Reference code: ZLKong/Tri-Level-ViT (the paper's method section was not reachable here; where the abstract is
silent this module follows that code):
* ``models/models_attn_tok.py``: ``VisionTransformerTokenAttn.forward`` (pruning at blocks 3/6/9),
  ``Block.forward`` (token pruning by the class token's attention, then the ``attn_prune`` mask),
  ``Attention.forward`` (the mask applied to the softmax);
* ``engine.py``: ``adjust_keep_rate`` (the keep-rate warm-up) and ``train_one_epoch`` (per-example statistics);
* ``main.py``: the example level (20% held out before training, the swap at epochs 30·k while
  ``putback_batch <= 4``, ``example_stats_train = {}`` after each swap) and the defaults ``--keep_ratio 0.7``,
  ``--attn_ratio 0.3``; ``README.md``: ``--remove-n 64058`` of the 256233 held-out ImageNet examples.

Algorithm: the ViT trains from scratch with three kinds of data sparsity at once, and keeps the token and
attention levels at inference.
* Example level: before training, a random ``example_holdout`` fraction of the train split is held out. At the
  start of each epoch of ``swap_epochs`` (of ``reference_epochs``, scaled to the train stage) the
  ``swap_fraction`` x held-out-pool least-forgotten active examples (fewest forgetting events in the window since
  the previous swap, Toneva et al.; never learned in the window = most forgotten;
  :mod:`compress_run.methods.forgetting`) leave the active set, as many held-out examples drawn at random come
  back, and the forgetting statistics start again. Epochs are shorter by the held-out fraction; the LR schedule
  follows epochs.
* Token level: at ``token_blocks`` (indices in a ``reference_depth``-block ViT, scaled to the model's depth),
  a block keeps the ``token_keep`` fraction of the patch tokens reaching it that its class token attends to most
  (:mod:`compress_run.core.tokens`; ``fuse`` adds EViT's fused token of the others).
* Attention level: each token-pruning block also builds an attention mask from its head-averaged patch-to-patch
  attention among the tokens it keeps: each kept patch query keeps its top ``attention_keep`` fraction of patch
  keys, the class token's row and column stay whole. The blocks after it apply that mask (softmax over the kept
  links) up to and including the next token-pruning block, which builds the next one; blocks before the first
  token-pruning block run dense attention. MACs count only the kept links (the traced gather form); training
  runs the masked form (same output). Simulated latency takes, per profile, the cheaper of the two forms, and the
  host latency is measured in the host profile's.
* Keep-rate warm-up (training only): both ratios start at 1 and follow the authors' ``adjust_keep_rate``: 1 up
  to ``keep_anneal_epochs[0]``, a cosine down to the configured ratio by ``keep_anneal_epochs[1]`` (of
  ``reference_epochs``, scaled to the train stage, per batch), the configured ratio after. Validation and
  inference always run the configured ratios.
The method reports the examples every train epoch visited (``epoch_examples``), the planned and the done swaps;
the training-time saving is the run's ``time/train_cpu_s`` (process CPU seconds of the train epochs) against a
dense run of the same schedule on the same host (the tables put them side by side).

Config keys (conf/method/evit.yaml):
* ``token_keep`` (0.7): fraction of patch tokens kept at each token-pruning block (1.0 = token level off).
* ``token_blocks`` ([3, 6, 9]) of ``reference_depth`` (12): the authors' DeiT locations (0-based), scaled to
  depth d as ``floor(b * d / reference_depth)`` (DeiT: 3, 6, 9; depth 6: 1, 3, 4).
* ``fuse`` (false): fuse the dropped tokens into one (EViT; ours as an option, the authors keep the top tokens
  only); only with ``attention_keep: 1.0``.
* ``attention_keep`` (0.3): fraction of patch links each kept patch query keeps in the masks built at the
  token-pruning blocks (1.0 = attention level off).
* ``reference_epochs`` (300): the authors' schedule length, to which the two epoch lists below refer; each is
  scaled to the train stage's E epochs as ``e x E / reference_epochs`` (a swap epoch rounded half up).
* ``keep_anneal_epochs`` ([10, 110]): the authors' warm-up (``WARM_UP_EPOCH``) and the end of its cosine
  (``WARM_UP_EPOCH + TOTAL_DECAY_EPOCH``); ``[0, 0]`` runs the configured ratios from the first step.
* ``example_holdout`` (0.2): fraction of the train split held out (0 = example level off).
* ``swap_epochs`` ([30, 60, 90, 120, 150]): the authors' swap epochs (only in the first half of training).
* ``swap_fraction`` (0.25): examples swapped each time, as a fraction of the held-out pool (the authors'
  64058 of 256233).

Deviations (ours): schedules given in epochs of a 300-epoch run are scaled to the train stage (9 epochs: swaps
before epochs 1, 2, 3, 4, 5; full keep for the first 0.3 epoch, the cosine until epoch 3.3). Each mask keeps
exactly ``ceil(attention_keep x r)`` links per query (a top-k, ties broken by it), where the authors' threshold
``>=`` the k-th value keeps every link tied with it — in a row with fewer than k links left open by the previous
mask, that is the whole row, since the masked links tie at the smoothing floor. The masked softmax is exact
(dropped links weigh 0), the authors' adds ``1e-6 / N`` to every weight. The class token's attention that ranks
tokens is read from the block's (masked) attention, whose class row is always whole, as in the authors' code.
Tied forgetting counts are broken by a seeded shuffle (the authors' by ``np.argsort``). Example swapping runs in
one process: with several data-parallel processes each would count forgetting on its shard only, so the run is
refused (exit 2) unless ``example_holdout=0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn

from compress_run.core.config import check
from compress_run.core.tokens import attach_token_pruning, set_token_anneal, vit_blocks
from compress_run.methods.base import Method, MethodConfig, NotApplicable, method_config
from compress_run.methods.cycles import seeded_generator
from compress_run.methods.forgetting import ForgettingCounter, least_forgotten, steps_per_epoch, train_batches


@method_config("evit")
@dataclass
class EViTConfig(MethodConfig):
    token_keep: float = 0.7
    token_blocks: list[int] = field(default_factory=lambda: [3, 6, 9])
    reference_depth: int = 12
    fuse: bool = False
    attention_keep: float = 0.3
    reference_epochs: int = 300
    keep_anneal_epochs: list[float] = field(default_factory=lambda: [10.0, 110.0])
    example_holdout: float = 0.2
    swap_epochs: list[int] = field(default_factory=lambda: [30, 60, 90, 120, 150])
    swap_fraction: float = 0.25

    def __post_init__(self) -> None:
        check(0.0 < self.token_keep <= 1.0, "method.token_keep", self.token_keep, "a float in (0, 1]")
        check(self.reference_depth >= 1, "method.reference_depth", self.reference_depth, "an integer >= 1")
        check(all(0 <= b < self.reference_depth for b in self.token_blocks), "method.token_blocks",
              list(self.token_blocks), f"block indices in [0, reference_depth={self.reference_depth})")
        check(0.0 < self.attention_keep <= 1.0, "method.attention_keep", self.attention_keep, "a float in (0, 1]")
        check(not (self.fuse and self.attention_keep < 1.0), "method.fuse", self.fuse,
              "false while method.attention_keep < 1 (the attention masks link patch tokens and the class token "
              "only; Tri-level E-ViT fuses no tokens): set method.attention_keep=1.0 to fuse")
        check(self.reference_epochs >= 1, "method.reference_epochs", self.reference_epochs, "an integer >= 1")
        anneal = list(self.keep_anneal_epochs)
        check(len(anneal) == 2 and 0 <= anneal[0] <= anneal[1] <= self.reference_epochs,
              "method.keep_anneal_epochs", anneal,
              f"[start, end] with 0 <= start <= end <= reference_epochs={self.reference_epochs}")
        check(0.0 <= self.example_holdout < 1.0, "method.example_holdout", self.example_holdout,
              "a float in [0, 1) (fraction of the train split held out)")
        check(all(0 < e < self.reference_epochs for e in self.swap_epochs), "method.swap_epochs",
              list(self.swap_epochs), f"epochs in (0, reference_epochs={self.reference_epochs})")
        check(0.0 < self.swap_fraction <= 1.0, "method.swap_fraction", self.swap_fraction, "a float in (0, 1]")


class EViT(Method):
    stages = ("train", "evaluate")
    state_attributes = ("held_out", "swaps", "epoch_examples", "train_epochs")
    Config = EViTConfig

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        self.seed = torch.initial_seed()
        self.held_out: list[int] = []  # train-split positions currently held out
        self.swaps: list[dict[str, int]] = []
        self.epoch_examples: list[int] = []
        self.train_epochs: int | None = None

    def pruning_blocks(self, depth: int) -> list[int]:
        return sorted({b * depth // self.reference_depth for b in self.token_blocks})

    def scaled_swap_epochs(self, epochs: int) -> list[int]:
        """The epochs of an ``epochs``-epoch train stage at whose start a swap runs."""
        scaled = {math.floor(e * epochs / self.reference_epochs + 0.5) for e in self.swap_epochs}
        return sorted(e for e in scaled if 0 < e < epochs)

    def anneal(self, progress: float, epochs: int) -> float:
        """How far the ratios are moved back towards 1 (1 = keep everything) after ``progress`` epochs of an
        ``epochs``-epoch train stage: the authors' ``adjust_keep_rate`` with its epochs scaled."""
        start, end = (e * epochs / self.reference_epochs for e in self.keep_anneal_epochs)
        if progress < start:
            return 1.0
        if progress >= end:
            return 0.0
        return (math.cos((progress - start) / (end - start) * math.pi) + 1.0) * 0.5

    def check_applicable(self, model: nn.Module) -> None:
        try:
            vit_blocks(model)
        except ValueError as exc:
            raise NotApplicable(str(exc)) from None

    def check_data(self, train_size: int) -> None:
        if self.example_holdout and round(self.example_holdout * train_size) < 1:
            raise NotApplicable(f"method.example_holdout={self.example_holdout} holds out no example of a train "
                                f"split of {train_size}")

    def check_distributed(self) -> None:
        if self.example_holdout > 0:
            raise NotApplicable(
                f"method.example_holdout={self.example_holdout} swaps the least-forgotten examples of the whole train "
                "split, counted on every example's visits; several processes each see only their shard of an epoch, "
                "and that counting is not shared between processes yet (method.example_holdout=0 trains E-ViT's "
                "token and attention levels distributed)")

    def prepare(self, model: nn.Module) -> nn.Module:
        blocks = self.pruning_blocks(len(vit_blocks(model)))
        keep = {b: self.token_keep for b in blocks} if self.token_keep < 1.0 else {}
        links = {b: self.attention_keep for b in blocks} if self.attention_keep < 1.0 else {}
        attach_token_pruning(model, keep, fuse=self.fuse, attention=links)
        return model

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        if stage != "train":
            return []
        callbacks: list[L.Callback] = [KeepRateWarmup(self)]
        return callbacks + ([ExampleSelector(self)] if self.example_holdout > 0 else [])

    def summary(self) -> dict[str, Any]:
        planned = self.scaled_swap_epochs(self.train_epochs) if self.train_epochs and self.example_holdout else []
        return {"token_keep": self.token_keep, "token_blocks": self.token_blocks, "fuse": self.fuse,
                "attention_keep": self.attention_keep, "reference_epochs": self.reference_epochs,
                "keep_anneal_epochs": list(self.keep_anneal_epochs), "example_holdout": self.example_holdout,
                "swap_epochs": list(self.swap_epochs), "swap_fraction": self.swap_fraction,
                "swap_epochs_scaled": planned, "swaps": self.swaps, "epoch_examples": self.epoch_examples,
                "examples_held_out": len(self.held_out)}


class KeepRateWarmup(L.Callback):
    """E-ViT's keep-rate warm-up: each train batch runs the token and link ratios moved towards 1 by the
    method's ``anneal``; after the batch the network is back at its configured ratios."""

    def __init__(self, method: EViT) -> None:
        self.method = method

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.method.train_epochs = trainer.max_epochs
        progress = trainer.current_epoch + batch_idx / train_batches(trainer)
        set_token_anneal(pl_module.net, self.method.anneal(progress, trainer.max_epochs))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        set_token_anneal(pl_module.net, 0.0)


class ExampleSelector(ForgettingCounter):
    """E-ViT's example level: holds out a random fraction before the first epoch, then at the start of each
    scaled swap epoch swaps the least-forgotten active examples (counted since the last swap) for as many
    held-out ones and starts counting again."""

    sampler_api = ("order", "exclude", "include", "num_samples")

    def __init__(self, method: EViT) -> None:
        super().__init__()
        self.method = method

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sampler, method, epoch = self._sampler(trainer), self.method, trainer.current_epoch
        method.train_epochs = trainer.max_epochs
        if not method.held_out and not method.swaps:  # the first epoch of the stage
            count = max(1, round(method.example_holdout * sampler.num_samples))
            held = torch.randperm(sampler.num_samples, generator=seeded_generator(method.seed, 0))[:count]
            method.held_out = sorted(held.tolist())
            sampler.exclude(held)
            pl_module.shorter_epochs_from_now(steps_per_epoch(trainer))
        else:  # a resumed run's new loader
            sampler.include(torch.arange(sampler.num_samples))
            sampler.exclude(torch.tensor(method.held_out, dtype=torch.long))
        if (epoch in method.scaled_swap_epochs(trainer.max_epochs)
                and all(s["epoch"] != epoch for s in method.swaps)):
            self.swap(sampler, epoch)

    def swap(self, sampler: Any, epoch: int) -> None:
        method = self.method
        held = torch.tensor(method.held_out, dtype=torch.long)
        active = torch.ones(sampler.num_samples, dtype=torch.bool)
        active[held] = False
        count = min(max(1, round(method.swap_fraction * len(held))), len(held), int(active.sum()) - 1)
        generator = seeded_generator(method.seed, epoch)
        leaving = least_forgotten(self.forgotten, self.learned, count, generator, among=active)
        returning = held[torch.randperm(len(held), generator=generator)[:count]]
        sampler.include(returning)
        sampler.exclude(leaving)
        method.held_out = sorted((set(method.held_out) - set(returning.tolist())) | set(leaving.tolist()))
        method.swaps.append({"epoch": epoch, "swapped": count})
        self.reset_counts()  # the authors' example_stats_train = {}: the next swap counts its own window
        print(f"[compress-run] E-ViT: swapped {count} least-forgotten examples for held-out ones at epoch {epoch}",
              flush=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.method.epoch_examples[trainer.current_epoch:] = [len(trainer.train_dataloader.sampler)]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "method": self.method.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.method.load_state_dict(state_dict.get("method", {}))
