"""Reweighted dynamic group regularization (Zhang, Ma, Zhan, Zhou, Qin, Sun, Chen, Ding, Fardad, Wang, "A Unified
DNN Weight Compression Framework Using Reweighted Optimization Methods", arXiv 2004.05531, 2020 / DAC 2021), for
any pattern.

Reference code: uab-fusion-lab/cifar_reweighted_pruning (by the journal version's first author) — main.py:
``reweighted_training`` (starts from a pretrained dense model; ε = 1e-3; P_g = 1/(‖W_g‖ + ε)), ``train`` (the
penalty λ·Σ_g P_g·‖W_g‖, λ by group type; P recomputed at epochs 40/80/120/160 of 200), ``masked_retrain``;
prune_util.py: ``weight_pruning``, ``hard_prune``. The released code settles the penalty form: reweighted ℓ1 /
group lasso, our ``norm: l1``.
Deviations from it, with reasons: docs/fidelity.md (section reweighted).

Algorithm (default ``norm: l2sq``): during the train stage the loss gets λ·Σ_g P_g·‖W_g‖² over the pattern's
groups g of every prunable layer, with P_g = 1/(‖W_g‖² + ε) recomputed from the current weights every
``reweight_epochs`` epochs (its gradient 2λ·P_g·W_g is added before each optimizer step): groups that are
already small get large penalties and collapse towards zero. ``norm: l1`` is the authors' form:
P_g = 1/(‖W_g‖ + ε) and the penalty λ·Σ_g P_g·‖W_g‖ (reweighted ℓ1 for single weights, reweighted group lasso
for groups; gradient λ·P_g·W_g/‖W_g‖). At the compress stage each layer is hard-pruned to its rate by the
smallest ‖W_g‖ with the pattern's projection; finetune retrains with the masks fixed.

Groups per pattern: single weights for ``irregular``, ``nm`` and ``gather_scatter`` (their structure comes
from the projection at the end); R×C blocks of the matrix view for ``block``; output rows for ``filter``;
input channels for ``channel``.

Our choices, each a deviation from the released code:
* The default form is the squared one (``norm: l2sq``), not the authors' reweighted ℓ1 / group lasso. (ours;
  the reason recorded, that the original's form was open, predates reading the released code — see
  docs/fidelity.md)
* P is recomputed every epoch (``reweight_epochs`` 1) from epoch 0 of our train stage, i.e. from the random
  initialisation unless ``init_ckpt``/``start_from`` is given; the authors start from a pretrained dense model
  and recompute P every 40 epochs. The reweighting phase is the whole train stage (its length:
  ``schedule.train.epochs``). (ours; no reason recorded — see docs/fidelity.md)
* One λ for every group type (the authors' λ depends on the group type and, for columns, on the layer);
  column and kernel groups are not offered and block groups are ours; for single weights P uses |w| (the
  authors' irregular branch omits the absolute value); the hard prune follows ``distribution`` instead of
  per-layer ratios from a profile.

Config keys (conf/method/reweighted.yaml), besides those of ``magnitude`` (sparsity, distribution, pattern,
exclude, mask_grads):
* ``reg_lambda`` (1e-4): λ.
* ``eps`` (1e-3): ε.
* ``reweight_epochs`` (1): epochs between recomputations of P.
* ``norm`` (l2sq): l2sq | l1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from compress_run.core.config import check
from compress_run.core.masks import prune_by_score
from compress_run.core.projections import as_matrix, from_matrix, parse_pattern
from compress_run.methods.base import MaskPruningConfig, MaskPruningMethod, method_config

NORMS = ("l2sq", "l1")


def group_sq_norms(weight: torch.Tensor, pattern: str) -> torch.Tensor:
    """Each entry's group squared norm ‖W_g‖² (same shape as ``weight``)."""
    name, args = parse_pattern(pattern)
    squared = weight.detach() ** 2
    if name == "block":
        r, c = int(args.get("r", 4)), int(args.get("c", 4))
        matrix = as_matrix(squared)
        rows, cols = matrix.shape
        padded = F.pad(matrix, (0, (-cols) % c, 0, (-rows) % r))
        sums = F.avg_pool2d(padded[None, None], (r, c))[0, 0] * (r * c)
        return from_matrix(sums.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols], weight.shape)
    if name == "filter":
        return squared.reshape(len(squared), -1).sum(1).view(-1, *[1] * (weight.dim() - 1)).expand_as(weight)
    if name == "channel":
        dims = (0, 2, 3) if weight.dim() == 4 else (0,)
        return squared.sum(dim=dims, keepdim=True).expand_as(weight)
    return squared


@method_config("reweighted")
@dataclass
class ReweightedConfig(MaskPruningConfig):
    sparsity: float = 0.9
    reg_lambda: float = 1e-4
    eps: float = 1e-3
    reweight_epochs: int = 1
    norm: str = "l2sq"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.reg_lambda >= 0, "method.reg_lambda", self.reg_lambda, "a float >= 0")
        check(self.eps > 0, "method.eps", self.eps, "a float > 0")
        check(self.reweight_epochs >= 1, "method.reweight_epochs", self.reweight_epochs, "an integer >= 1")
        check(self.norm in NORMS, "method.norm", self.norm, ", ".join(NORMS))


class Reweighting(L.Callback):
    def __init__(self, method: Reweighted) -> None:
        self.method = method
        self.penalties: dict[str, torch.Tensor] = {}

    def reweight(self, net: nn.Module) -> None:
        m = self.method
        for name, layer in m.layers(net).items():
            norms = group_sq_norms(layer.weight, m.pattern)
            self.penalties[name] = 1.0 / (norms + m.eps) if m.norm == "l2sq" else 1.0 / (norms.sqrt() + m.eps)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch % self.method.reweight_epochs == 0 or not self.penalties:
            self.reweight(pl_module.net)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        m = self.method
        with torch.no_grad():
            for name, layer in m.layers(pl_module.net).items():
                if layer.weight.grad is None or name not in self.penalties:
                    continue
                if m.norm == "l2sq":
                    layer.weight.grad.add_(2 * m.reg_lambda * self.penalties[name] * layer.weight)
                else:
                    norms = group_sq_norms(layer.weight, m.pattern).sqrt().clamp_min(1e-12)
                    layer.weight.grad.add_(m.reg_lambda * self.penalties[name] * layer.weight / norms)

    def state_dict(self) -> dict[str, Any]:
        return {"penalties": self.penalties}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.penalties = dict(state_dict.get("penalties", {}))


class Reweighted(MaskPruningMethod):
    Config = ReweightedConfig

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        return [Reweighting(self)] if stage == "train" else super().training_callbacks(stage, model)

    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        """Hard-prune each layer to its rate by the smallest group norms (the pattern's projection of W²)."""
        layers = self.layers(model)
        scores = {n: m.weight.detach() ** 2 for n, m in layers.items()}
        self.achieved = prune_by_score(layers, scores, self.sparsity, self.distribution, self.pattern)
        return model

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "reg_lambda": self.reg_lambda, "eps": self.eps, "norm": self.norm,
                "reweight_epochs": self.reweight_epochs}
