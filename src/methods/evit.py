"""Tri-level E-ViT — efficient ViT training by sparsity at three levels of the data (Kong, Ma, Yuan, …, Wang,
"Peeling the Onion: Hierarchical Reduction of Data Redundancy for Efficient Vision Transformer Training",
AAAI 2023).

Algorithm: the ViT trains from scratch with three kinds of data sparsity at once, and keeps the token and
attention levels at inference.
* Example level: before training, a random ``example_holdout`` fraction of the train split is held out; every
  ``swap_every`` epochs the least-forgotten active examples (fewest forgetting events so far, Toneva et al.; the
  counts MEST's data removal uses, :mod:`compress_run.methods.forgetting`) leave the active set and as many
  held-out examples come back. Epochs are shorter by the held-out fraction; the LR schedule follows epochs.
* Token level: at ``token_blocks`` (indices in a ``reference_depth``-block ViT, scaled to the model's depth),
  a block keeps the ``token_keep`` fraction of the patch tokens its class token attends to most
  (:mod:`compress_run.core.tokens`; ``fuse`` adds EViT's fused token of the others).
* Attention level: in every block each query keeps only its top ``attention_keep`` fraction of attention
  links (softmax over those). MACs count only the kept links (the traced gather form); training runs the masked
  form of :func:`compress_run.core.tokens.sparse_attention`, which has the same output and is 4.5x faster on CPU,
  so on CPU the attention level saves no training compute (a sparse-attention kernel would). Simulated latency
  takes, per profile, the cheaper of the two forms, and the host latency is measured in the host profile's.
The method reports the examples every train epoch visited (``epoch_examples``) and its swaps; the training-time
saving is the run's ``time/train_cpu_s`` (process CPU seconds of the train epochs) against a dense run of the same
schedule on the same host (the tables put
them side by side).

Config keys (conf/method/evit.yaml):
* ``token_keep`` (0.7): fraction of patch tokens kept at each token-pruning block (1.0 = token level off).
* ``token_blocks`` ([3, 6, 9]) of ``reference_depth`` (12): the paper's DeiT locations (0-based), scaled to
  depth d as ``floor(b * d / reference_depth)`` (DeiT: 3, 6, 9; depth 6: 1, 3, 4).
* ``fuse`` (false): fuse the dropped tokens into one (EViT); the paper keeps the top tokens only.
* ``attention_keep`` (0.3): fraction of attention links each query keeps, in every block (1.0 = off).
* ``example_holdout`` (0.2): fraction of the train split held out (0 = example level off).
* ``swap_every`` (null): epochs between swaps; null = the paper's 30 of 300 epochs, i.e. a tenth of the train
  stage (at least 1).
* ``swap_fraction`` (0.5): examples swapped each time, as a fraction of the held-out pool.

Choices where the paper leaves a detail open: how many examples a swap exchanges (``swap_fraction``), that the
returning examples are a seeded random draw from the held-out pool, and that the attention level covers every
block. The class-token attention that ranks tokens is the full (pre-sparsification) softmax row. Example
swapping runs in one process: with several data-parallel processes each would count forgetting on its shard
only, so the run is refused (exit 2) unless ``example_holdout=0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn

from compress_run.core.config import check
from compress_run.core.tokens import attach_token_pruning, vit_blocks
from compress_run.methods.base import Method, MethodConfig, NotApplicable, method_config
from compress_run.methods.cycles import seeded_generator
from compress_run.methods.forgetting import ForgettingCounter, least_forgotten, steps_per_epoch


@method_config("evit")
@dataclass
class EViTConfig(MethodConfig):
    token_keep: float = 0.7
    token_blocks: list[int] = field(default_factory=lambda: [3, 6, 9])
    reference_depth: int = 12
    fuse: bool = False
    attention_keep: float = 0.3
    example_holdout: float = 0.2
    swap_every: int | None = None
    swap_fraction: float = 0.5

    def __post_init__(self) -> None:
        check(0.0 < self.token_keep <= 1.0, "method.token_keep", self.token_keep, "a float in (0, 1]")
        check(self.reference_depth >= 1, "method.reference_depth", self.reference_depth, "an integer >= 1")
        check(all(0 <= b < self.reference_depth for b in self.token_blocks), "method.token_blocks",
              list(self.token_blocks), f"block indices in [0, reference_depth={self.reference_depth})")
        check(0.0 < self.attention_keep <= 1.0, "method.attention_keep", self.attention_keep, "a float in (0, 1]")
        check(0.0 <= self.example_holdout < 1.0, "method.example_holdout", self.example_holdout,
              "a float in [0, 1) (fraction of the train split held out)")
        check(self.swap_every is None or self.swap_every >= 1, "method.swap_every", self.swap_every,
              "null or an integer >= 1 (epochs)")
        check(0.0 < self.swap_fraction <= 1.0, "method.swap_fraction", self.swap_fraction, "a float in (0, 1]")


class EViT(Method):
    stages = ("train", "evaluate")
    state_attributes = ("held_out", "swaps", "epoch_examples")
    Config = EViTConfig

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        self.seed = torch.initial_seed()
        self.held_out: list[int] = []  # train-split positions currently held out
        self.swaps: list[dict[str, int]] = []
        self.epoch_examples: list[int] = []

    def pruning_blocks(self, depth: int) -> list[int]:
        return sorted({b * depth // self.reference_depth for b in self.token_blocks})

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
        depth = len(vit_blocks(model))
        keep = {b: self.token_keep for b in self.pruning_blocks(depth)} if self.token_keep < 1.0 else {}
        links = {b: self.attention_keep for b in range(depth)} if self.attention_keep < 1.0 else {}
        attach_token_pruning(model, keep, fuse=self.fuse, attention=links)
        return model

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        if stage != "train":
            return []
        return [ExampleSelector(self)] if self.example_holdout > 0 else []

    def summary(self) -> dict[str, Any]:
        return {"token_keep": self.token_keep, "token_blocks": self.token_blocks, "fuse": self.fuse,
                "attention_keep": self.attention_keep, "example_holdout": self.example_holdout,
                "swap_every": self.swap_every, "swap_fraction": self.swap_fraction, "swaps": self.swaps,
                "epoch_examples": self.epoch_examples, "examples_held_out": len(self.held_out)}


class ExampleSelector(ForgettingCounter):
    """E-ViT's example level: holds out a random fraction before the first epoch, then every ``swap_every``
    epochs swaps the least-forgotten active examples for as many held-out ones."""

    sampler_api = ("order", "exclude", "include", "num_samples")

    def __init__(self, method: EViT) -> None:
        super().__init__()
        self.method = method

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sampler, method, epoch = self._sampler(trainer), self.method, trainer.current_epoch
        if not method.held_out and not method.swaps:  # the first epoch of the stage
            count = max(1, round(method.example_holdout * sampler.num_samples))
            held = torch.randperm(sampler.num_samples, generator=seeded_generator(method.seed, 0))[:count]
            method.held_out = sorted(held.tolist())
            sampler.exclude(held)
            pl_module.shorter_epochs_from_now(steps_per_epoch(trainer))
        else:  # a resumed run's new loader
            sampler.include(torch.arange(sampler.num_samples))
            sampler.exclude(torch.tensor(method.held_out, dtype=torch.long))
        every = method.swap_every or max(1, round(30 / 300 * trainer.max_epochs))
        if epoch > 0 and epoch % every == 0 and all(s["epoch"] != epoch for s in method.swaps):
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
        print(f"[compress-run] E-ViT: swapped {count} least-forgotten examples for held-out ones at epoch {epoch}",
              flush=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.method.epoch_examples[trainer.current_epoch:] = [len(trainer.train_dataloader.sampler)]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "method": self.method.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.method.load_state_dict(state_dict.get("method", {}))
