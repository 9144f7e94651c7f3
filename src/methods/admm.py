"""ADMM pruning (Zhang, Ye, Zhang, Tang, Wen, Fardad, Wang, "A Systematic DNN Weight Pruning Framework using
Alternating Direction Method of Multipliers", ECCV 2018, in the form of the ADMM library the pattern papers
share), for any pattern.

Reference code: KaiqiZhang/admm-pruning — tensorflow-mnist-code/admm_pruning.py: ``main`` (dense training first,
then Z = Proj(W), U = 0 and the Z/U updates, hard prune, masked retraining); tensorflow-mnist-code/solver.py:
``AdmmSolver`` (ρ = 1e-4); tensorflow-mnist-code/prune_utility.py: ``projection``. boone891214/GaP —
Transformer/prune_utils/admm.py: ``ADMM.init``, ``ADMM.prune_update``, ``ADMM.prune_update_combined_loss``,
``ADMM.prune_harden``, ``ADMM.weight_pruning_irregular_global``; Transformer/scripts/run_admm_and_mag_prune.sh
(ADMM resumes a pretrained dense checkpoint); Transformer/profiles/*/*.yaml (``rho: 0.001``).
Deviations from it, with reasons: docs/fidelity.md (section admm).

Algorithm: during the train stage, every prunable weight W has an auxiliary Z (W's projection onto the
pattern at the target sparsity) and a scaled dual U. Z = Proj(W), U = 0 at ``start_epoch``; the loss
gets ρ/2·‖W − Z + U‖² (its gradient ρ(W − Z + U) is added before each optimizer step); every
``update_epochs`` epochs Z ← Proj(W + U), U ← U + W − Z. The compress stage *hardens*: W is projected
(masks attached, the same projection and per-layer densities); finetune retrains with the masks fixed.
Proj is the ``pattern`` projection (``irregular``, ``nm:2:4``, ``block:4:4``, ``gather_scatter:16``, …)
with the ``distribution`` allocation of densities, scored by magnitude.

Our choices, each a deviation from the reference code:
* Starting point: ADMM starts at ``start_epoch`` (default 0) of our train stage, so without ``init_ckpt`` or
  ``start_from`` the first Z is the projection of the *random initialisation*, and dense training and ADMM
  share one schedule. Both reference codes start ADMM from a trained dense model (Z = Proj(W_trained)).
  (ours; no reason recorded — see docs/fidelity.md)
* ρ = 1e-3 is the GaP library's profile value; Zhang et al.'s released TF code uses 1e-4. ρ is fixed (the
  library's optional rising-ρ scheduler is not offered).
* The per-layer densities of ``global``/``erk`` are computed once, from the weights at ``start_epoch``; the
  library's ``irregular_global`` recomputes the global threshold at every update.
* One ``project(pattern, …)`` serves every pattern; the library has one projection per sparsity type (the two
  agree for irregular magnitude). The first conv and the classifier are excluded by default; the references
  prune the layers their profile lists.
* Z and U live in the ADMM callback's state (saved in every Lightning checkpoint, so a resumed run continues
  the same iteration); the residual ‖W − Z‖/‖W‖ after each update is logged (``train/admm_residual``) and the
  last one is in the summary.

Config keys (conf/method/admm.yaml), besides those of ``magnitude`` (sparsity, distribution, pattern, exclude,
mask_grads):
* ``rho`` (1e-3): ρ of the augmented Lagrangian.
* ``update_epochs`` (1): epochs between Z/U updates.
* ``start_epoch`` (0): first epoch of ADMM (earlier epochs train without the penalty).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from compress_run.core.allocation import allocate
from compress_run.core.config import check
from compress_run.core.masks import magnitude_scores, prune_by_score
from compress_run.core.projections import project
from compress_run.methods.base import MaskPruningConfig, MaskPruningMethod, method_config


@method_config("admm")
@dataclass
class ADMMConfig(MaskPruningConfig):
    sparsity: float = 0.9
    rho: float = 1e-3
    update_epochs: int = 1
    start_epoch: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.rho > 0, "method.rho", self.rho, "a float > 0")
        check(self.update_epochs >= 1, "method.update_epochs", self.update_epochs, "an integer >= 1")
        check(self.start_epoch >= 0, "method.start_epoch", self.start_epoch, "an integer >= 0")


class ADMMCallback(L.Callback):
    def __init__(self, method: ADMM) -> None:
        self.method = method
        self.z: dict[str, torch.Tensor] = {}
        self.u: dict[str, torch.Tensor] = {}
        self.residual: float | None = None

    def update(self, net: nn.Module) -> None:
        """Z ← Proj(W + U), U ← U + W − Z (at the first update: Z = Proj(W), U = 0)."""
        method, layers = self.method, self.method.layers(net)
        with torch.no_grad():
            first = not self.u
            if first:
                self.u = {n: torch.zeros_like(m.weight) for n, m in layers.items()}
            targets = {n: layers[n].weight + self.u[n] for n in layers}
            if method.densities is None:
                method.densities = allocate({n: t.abs() for n, t in targets.items()}, method.sparsity,
                                            method.distribution)
            self.z = {n: t * project(method.pattern, t.abs(), method.densities[n]) for n, t in targets.items()}
            if not first:
                for n, layer in layers.items():
                    self.u[n] += layer.weight - self.z[n]
            num = sum(float((layers[n].weight - self.z[n]).norm() ** 2) for n in layers)
            den = sum(float(layers[n].weight.norm() ** 2) for n in layers)
            self.residual = (num / max(den, 1e-30)) ** 0.5
        method.residual = self.residual

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        epoch, method = trainer.current_epoch, self.method
        if epoch >= method.start_epoch and (epoch - method.start_epoch) % method.update_epochs == 0:
            self.update(pl_module.net)
            pl_module.log("train/admm_residual", self.residual)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.z:
            return
        with torch.no_grad():
            for n, layer in self.method.layers(pl_module.net).items():
                if layer.weight.grad is not None:
                    layer.weight.grad.add_(layer.weight - self.z[n] + self.u[n], alpha=self.method.rho)

    def state_dict(self) -> dict[str, Any]:
        return {"z": self.z, "u": self.u, "residual": self.residual, "densities": self.method.densities}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.z, self.u = dict(state_dict.get("z", {})), dict(state_dict.get("u", {}))
        self.residual = state_dict.get("residual")
        self.method.densities = state_dict.get("densities")


class ADMM(MaskPruningMethod):
    state_attributes = ('densities', 'residual')
    Config = ADMMConfig

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        self.densities: dict[str, float] | None = None
        self.residual: float | None = None

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        return [ADMMCallback(self)] if stage == "train" else super().training_callbacks(stage, model)

    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        """Harden: project W onto the pattern (masks attached) at the ADMM densities."""
        layers = self.layers(model)
        self.achieved = prune_by_score(layers, magnitude_scores(layers), self.sparsity, self.distribution,
                                       self.pattern, densities=self.densities)
        return model

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "rho": self.rho, "update_epochs": self.update_epochs,
                "last_residual": self.residual}

