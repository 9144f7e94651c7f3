"""The method contract: the hooks a compression method implements (all optional).

* ``stages`` — the pipeline stages the method needs; the others are recorded as skipped.
* ``check_applicable(model)`` — raise :class:`NotApplicable` if the method cannot act on this model.
* ``prepare(model)`` — the network the train stage starts from (default: the model itself); a method
  that trains in another form from scratch (ELRT's Tucker-2 network) builds it here. Deterministic in
  the model's shapes, so a resumed train stage rebuilds the same structure.
* ``training_callbacks(stage, model)`` — Lightning callbacks acting during train/finetune.
* ``lr_cycles(stage)`` — how many times the LR schedule (warm-up included) restarts within a stage
  (default 1): a method whose stage is a sequence of separate training runs says so here.
* ``compress(model, datamodule)`` — the one-shot transformation of the compress stage.
* ``state_dict()/load_state_dict()`` — method state that is not already in the model's state
  (masks are buffers of the model, so they travel with every checkpoint by themselves).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from compress_run.core.allocation import allocate
from compress_run.core.masks import (
    LayerSelectionError,
    MaskEnforcer,
    magnitude_scores,
    prunable_layers,
    prune_by_score,
)
from compress_run.core.projections import pattern_shape_problem

ALL_STAGES = ("train", "compress", "finetune", "evaluate")


class NotApplicable(ValueError):
    """The method cannot act on the chosen model (the message says why)."""


class Method:
    stages: tuple[str, ...] = ALL_STAGES
    model_factory: Callable[[], nn.Module] | None = None  # set by the pipeline: builds a fresh network
    input_shape: tuple[int, ...] = (3, 32, 32)            # set by the pipeline: one sample's (C, H, W)
    hardware: Any = None                                   # set by the pipeline: the run's HardwareConfig
    distill: Any = None          # set by the pipeline: a Distillation when distill.teacher is given, else None
    distill_config: dict[str, Any] = {"kind": "soft", "alpha": 0.5, "temperature": 1.0}  # the run's distill.*

    def distill_settings(self) -> dict[str, Any]:
        """kind, alpha and temperature of the run's ``distill`` config (for a method's own distilled passes)."""
        return {k: self.distill_config[k] for k in ("kind", "alpha", "temperature")}

    def check_applicable(self, model: nn.Module) -> None:
        """Raise :class:`NotApplicable` with the reason if the method cannot act on ``model``."""

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        return []

    def lr_cycles(self, stage: str) -> int:
        return 1

    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        return model

    def summary(self) -> dict[str, Any]:
        """Method-specific facts for results.json (e.g. achieved sparsity per layer)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class MaskPruningMethod(Method):
    """Base of the weight-mask methods: prunable-layer selection, sparsity target, mask enforcement.

    Config keys: ``sparsity`` (fraction of prunable weights removed), ``distribution``
    (uniform | global | erk), ``pattern`` (projection name), ``exclude`` (globs / aliases of layers kept
    dense), ``mask_grads`` (zero masked gradients before each optimizer step: the optimizer state of pruned
    weights stays zero, which changes results when weights regrow — GaP, RigL, MEST, multi-level phases —
    or when the gradient is clipped by its norm, ``trainer.gradient_clip_val``; with masks that only shrink
    and no clipping the trained weights are the same either way).
    """

    def __init__(self, sparsity: float = 0.0, distribution: str = "uniform", pattern: str = "irregular",
                 exclude: list[str] | tuple[str, ...] = ("first_conv", "classifier"),
                 mask_grads: bool = True) -> None:
        self.sparsity = float(sparsity)
        self.distribution = distribution
        self.pattern = pattern
        self.exclude = list(exclude)
        self.mask_grads = mask_grads
        self.achieved: dict[str, float] = {}

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return prunable_layers(model, self.exclude)

    def prune_to(self, model: nn.Module, sparsity: float) -> None:
        """Magnitude-prune the prunable layers to ``sparsity`` with this method's distribution and pattern."""
        self.achieved = {}
        self.prune_subset(model, list(self.layers(model)), sparsity)

    def prune_subset(self, model: nn.Module, names: list[str], sparsity: float,
                     scores: dict[str, torch.Tensor] | None = None) -> None:
        """Prune only the prunable layers ``names`` (scores default to |w|): ``uniform`` per layer,
        ``global`` one threshold over the subset (which then holds exactly its share of the budget), ``erk``
        each layer at the density ERK gives it among all prunable layers."""
        layers = self.layers(model)
        subset = {n: layers[n] for n in names}
        scores = scores if scores is not None else magnitude_scores(subset)
        densities = None
        if self.distribution == "erk":  # ERK depends on shapes only
            densities = allocate({n: m.weight for n, m in layers.items()}, sparsity, "erk")
        self.achieved.update(prune_by_score(subset, scores, sparsity, self.distribution, self.pattern,
                                            densities=densities))

    def check_applicable(self, model: nn.Module) -> None:
        try:
            layers = self.layers(model)
        except LayerSelectionError as exc:
            raise NotApplicable(f"method.exclude: {exc}") from exc
        if not layers:
            raise NotApplicable(f"no prunable conv/linear layer is left after method.exclude={self.exclude}")
        density = 1.0 - self.sparsity if self.distribution == "uniform" and self.sparsity > 0 else None
        problems = {n: pattern_shape_problem(self.pattern, m.weight.shape, density) for n, m in layers.items()}
        bad = {n: problem for n, problem in problems.items() if problem}
        if bad:
            name, problem = next(iter(bad.items()))
            raise NotApplicable(f"method.pattern={self.pattern} cannot hold on {len(bad)} layer(s), e.g. {name}: "
                                f"{problem}; add them to method.exclude (e.g. {list(bad)[:3]}) or choose another "
                                "pattern")

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        return [MaskEnforcer(self.mask_grads)] if stage == "finetune" else []

    def summary(self) -> dict[str, Any]:
        return {"target_sparsity": self.sparsity, "distribution": self.distribution, "pattern": self.pattern}
