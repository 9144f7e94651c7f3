"""Forgetting statistics of the train examples (Toneva et al., ICLR 2019), shared by the data-efficient methods:
MEST's data removal and the example level of Tri-level E-ViT.

A forgetting event: an example classified correctly at its previous visit and wrongly now. Every train batch's
logits update the per-example counts; the examples are identified through the train sampler, which must tell
the visit order of an epoch and exclude (and, for swapping, include) examples — the pipeline's
``EpochSeededSampler`` does. Examples never classified correctly count as the most forgotten; ties are broken
by a seeded shuffle.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


def least_forgotten(forgotten: torch.Tensor, learned: torch.Tensor, n: int, generator: torch.Generator,
                    among: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the ``n`` examples with the fewest forgetting events (never learned = most forgotten), chosen
    among the positions where the boolean ``among`` is true (default: all)."""
    counts = torch.where(learned, forgotten.double(), torch.full_like(forgotten, torch.inf, dtype=torch.float64))
    if among is not None:
        candidates = torch.nonzero(among, as_tuple=True)[0]
        return candidates[least_forgotten(forgotten[candidates], learned[candidates], n, generator)]
    shuffled = torch.randperm(counts.numel(), generator=generator)
    order = shuffled[torch.argsort(counts[shuffled], stable=True)]
    return order[:n]


def train_batches(trainer: L.Trainer) -> int:
    """Batches an epoch of the train loader now runs (after examples were excluded or included)."""
    batches = len(trainer.train_dataloader)
    limit = trainer.limit_train_batches
    return max(1, min(batches, int(limit)) if isinstance(limit, int) else int(batches * limit))


def steps_per_epoch(trainer: L.Trainer) -> int:
    """Optimizer steps an epoch of the train loader now takes (after examples were excluded or included)."""
    return max(1, train_batches(trainer) // trainer.accumulate_grad_batches)


class ForgettingCounter(L.Callback):
    """Counts forgetting events per train example; subclasses decide what to do with the counts."""

    sampler_api: tuple[str, ...] = ("order", "exclude", "num_samples")

    def __init__(self) -> None:
        self.forgotten = self.last_correct = self.learned = None
        self.epoch_order: tuple[tuple[int, int] | None, torch.Tensor | None] = (None, None)

    def _sampler(self, trainer: L.Trainer) -> Any:
        """The train loader's sampler, checked for the API the method needs."""
        sampler = trainer.train_dataloader.sampler
        if not all(hasattr(sampler, attr) for attr in self.sampler_api):
            raise RuntimeError(f"{type(self).__name__} needs a train sampler with {', '.join(self.sampler_api)} "
                               "(the pipeline's EpochSeededSampler)")
        if self.forgotten is None:
            n = sampler.num_samples
            self.forgotten, self.last_correct = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
            self.learned = torch.zeros(n, dtype=torch.bool)
        return sampler

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sampler = self._sampler(trainer)
        logits, y = pl_module.last_train_logits, batch[1]
        start = batch_idx * trainer.train_dataloader.batch_size
        key = (trainer.current_epoch, len(sampler))
        if self.epoch_order[0] != key:  # one permutation per epoch, not per batch
            self.epoch_order = (key, sampler.order(trainer.current_epoch))
        positions = self.epoch_order[1][start: start + len(y)]
        correct = (logits.argmax(1) == y).cpu()
        self.forgotten[positions] += (self.last_correct[positions] & ~correct).long()
        self.last_correct[positions] = correct
        self.learned[positions] |= correct

    def reset_counts(self) -> None:
        """Forget the statistics so far: counting starts again at the next visit of each example."""
        for counts in (self.forgotten, self.last_correct, self.learned):
            if counts is not None:
                counts.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"forgotten": self.forgotten, "last_correct": self.last_correct, "learned": self.learned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.forgotten, self.last_correct = state_dict["forgotten"], state_dict["last_correct"]
        self.learned = state_dict["learned"]
