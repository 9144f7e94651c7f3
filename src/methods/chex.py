"""CHEX — CHannel EXploration (Hou, Qin, Sun et al., "CHEX: CHannel EXploration for CNN Model Compression",
CVPR 2022).

Reference code: zejiangh/Filter-GaP (the CHEX repository) — CLS/image_classification/training.py: ``train_loop``
(initial masks, the exploration epochs and delta_t) and ``train`` (masks re-applied after every step);
CLS/image_classification/prune_utils.py: ``init_channel_mask``, ``get_layer_ratio`` (one global |BN gamma|
threshold), ``CSS`` (leverage scores), ``IS_update_channel_mask`` (keep, restore, sampled regrowth),
``apply_channel_mask``; CLS/script.sh (the ResNet-50 settings).
Deviations from it, with reasons: docs/fidelity.md (section chex).

Algorithm: channel pruning *during training from scratch*, repeatedly pruning and regrowing channels.
At the start every prunable channel group is masked at the uniform channel sparsity S - delta0. At
epochs t = dT, 2dT, ... and at T_max the network is re-explored with the regrowth ratio
delta_t = delta0 * (1 + cos(pi t / T_max)) / 2: (1) |BN gamma| of all prunable groups is pooled; the
global ranking at sparsity S gives each group its kept count and the ranking at S - delta_t a larger
count, the difference being how many channels the group regrows; (2) within a group the kept channels
are those with the largest leverage scores (row norms of the top-k right singular vectors of the
weight matrix with one column per channel, k = kept count; L1 norm when the matrix has fewer rows than
columns); (3) pruned channels are sampled for regrowth without replacement with probability
softmax(norm of the residual of their weights after projection onto the kept channels' span), and come
back with the producer weights and BN parameters and statistics they had when last pruned. Masks are
re-applied after every optimizer step. After T_max (delta = 0) the sub-network is fixed; the compress stage
physically compacts it (dependency-aware, :mod:`compress_run.core.compaction`) and finetune trains the small
network.

Our choices, each a deviation from the released code:
* Pruning space: with the defaults (``prune_residual: true``, ``exclude: []``) we also prune the stem conv's
  output channels and every residual stream, as one tied unit per stage (all conv3 outputs of the stage
  plus its downsample; gamma score = the mean |gamma| over their BNs; leverage matrix = their weights
  stacked). The authors' code prunes the outputs of conv1 and conv2 of every bottleneck and masks the
  downsample conv's outputs on their own; it never prunes the stem, the conv3 outputs or the residual
  stream. (ours; no reason recorded — see docs/fidelity.md) ``prune_residual: false`` with the stem in
  ``exclude`` comes closest (the downsample outputs then stay whole). Groups fed by an option-A
  (zero-padding) shortcut, and the network output, are never pruned.
* A pruned channel's input columns in the consuming conv are neither masked nor snapshotted and restored;
  the authors' ``apply_channel_mask`` zeroes them and ``IS_update_channel_mask`` restores them with the
  channel. With weight decay a regrown channel's outgoing weights therefore come back shrunk. (ours; no
  reason recorded — see docs/fidelity.md)
* The initial channels are chosen by leverage score; the authors' ``init_channel_mask`` uses the filter L1
  norm. (ours; no reason recorded — see docs/fidelity.md)
* T_max itself is always an exploration step (delta = 0 there), so training ends exactly at the budget
  even when T_max is not a multiple of dT; if T_max falls after the last train epoch, compress does
  that final step.
* After T_max the authors keep training the masked network in the same run; we compact it at the compress
  stage and train the small network in the finetune stage (the pipeline's form).
* Counts come from one global ranking with ``min_channels`` and round(); the authors take int() per layer
  from the gamma threshold. The residual is a QR projection where the authors use the pseudo-inverse (the
  same whenever the kept columns have full column rank).
* ``target: flops`` re-solves S at every exploration step (bisection on the global gamma ranking) so
  the pruned network has ``flops_reduction`` fewer MACs; ``sparsity`` is ignored then (an extension).
* The momentum of regrown weights is kept as the optimizer left it (zero gradients while masked).

Config keys (conf/method/chex.yaml):
* ``sparsity`` (0.5): S, the fraction of prunable channels removed (``target: channels``).
* ``target`` (channels): ``channels`` or ``flops``; ``flops_reduction`` (0.5): MAC reduction for flops.
* ``delta0`` (0.2): initial regrowth ratio (paper: 0.2 with S = 0.5, 0.3 with S = 0.7).
* ``delta_t_epochs`` (2): epochs between exploration steps (dT).
* ``t_max_fraction`` (0.75): T_max as a fraction of the train epochs (the authors' CLS/script.sh: 180 of 250 = 0.72).
* ``min_channels`` (1): channels every group keeps at least.
* ``channel_multiple`` (1): round every group's kept count to a multiple of this (8 suits oneDNN/CUDA
  kernels; 1 = the paper's exact global budget).
* ``prune_residual`` (true): prune residual-tied groups as one unit (false: leave them whole).
* ``exclude`` ([]): globs of producer layers whose groups stay whole.
Masked gradients are always zeroed before each optimizer step, where the authors only re-apply the masks
after it (no ``mask_grads`` key: in conv-BN-ReLU networks a masked channel's gradients are zero anyway, so the
key changed nothing there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from compress_run.core.channel_graph import ChannelGroup
from compress_run.core.channel_masks import channel_mask, prunable_groups, set_channel_mask, unit_rows
from compress_run.core.compaction import compact
from compress_run.core.config import check
from compress_run.core.masks import MaskEnforcer
from compress_run.methods.base import Method, NotApplicable, method_config
from compress_run.methods.channels import (
    ChannelConfig,
    MacModel,
    allocate_counts,
    check_mac_target,
    round_count,
    search_keep_fraction,
)
from compress_run.methods.cycles import seeded_generator


@method_config("chex")
@dataclass
class CHEXConfig(ChannelConfig):
    delta0: float = 0.2
    delta_t_epochs: int = 2
    t_max_fraction: float = 0.75

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 <= self.delta0 <= (self.sparsity if self.target == "channels" else 1.0), "method.delta0",
              self.delta0, f"a float in [0, method.sparsity={self.sparsity}] (S - delta0 is the initial sparsity)")
        check(self.delta_t_epochs >= 1, "method.delta_t_epochs", self.delta_t_epochs, "an integer >= 1 (epochs)")
        check(0.0 < self.t_max_fraction <= 1.0, "method.t_max_fraction", self.t_max_fraction, "a float in (0, 1]")


def regrowth_ratio(epoch: int, t_max: int, delta0: float) -> float:
    return delta0 * (1 + math.cos(math.pi * min(epoch, t_max) / t_max)) / 2 if t_max > 0 else 0.0


def exploration_epochs(delta_t: int, t_max: int) -> list[int]:
    """Epochs (0-based, checked at epoch start) at which CHEX explores: multiples of dT up to T_max, and T_max."""
    return sorted({*range(delta_t, t_max + 1, delta_t), t_max} - {0})


def group_matrix(group: ChannelGroup, modules: dict[str, nn.Module]) -> torch.Tensor:
    """(fan-in features, channels): the producers' weights stacked, one column per channel."""
    return torch.cat([modules[n].weight.detach().reshape(group.size, -1) for n, _ in group.producers], 1).T.float()


def leverage_scores(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Column leverage scores w.r.t. the top-k right singular vectors (L1 column norms if rows < columns)."""
    rows, cols = matrix.shape
    if rows < cols:
        return matrix.abs().sum(0)
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return vh[:k].pow(2).sum(0)


def residual_norms(matrix: torch.Tensor, kept: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Norm of each candidate column's residual after projection onto the span of the kept columns."""
    vectors = matrix[:, candidates]
    if len(kept) == 0:
        return vectors.norm(dim=0)
    q, _ = torch.linalg.qr(matrix[:, kept])
    return (vectors - q @ (q.T @ vectors)).norm(dim=0)


def sample_regrowth(matrix: torch.Tensor, kept: torch.Tensor, candidates: torch.Tensor, n_grow: int,
                    generator: torch.Generator) -> torch.Tensor:
    """``n_grow`` of the pruned ``candidates`` (columns of ``matrix``), sampled without replacement with
    probability softmax(norm of their residual after projection onto the kept columns' span)."""
    residual = residual_norms(matrix, kept, candidates).cpu()
    picked = torch.multinomial(F.softmax(residual.double(), 0), n_grow, replacement=False, generator=generator)
    return candidates[picked]


class CHEX(Method):
    state_attributes = ('history', 'final_done', 'snapshots', 'compacted')
    Config = CHEXConfig

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        self.seed = torch.initial_seed()
        self.history: list[dict[str, Any]] = []   # one entry per exploration step
        self.final_done = False
        self.snapshots: dict[str, torch.Tensor] = {}
        self.compacted: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}

    # ----------------------------------------------------------------------------- structure
    def groups(self, model: nn.Module) -> list[ChannelGroup]:
        groups, self.skipped = prunable_groups(model, self.exclude, self.prune_residual, need_norm=True)
        return groups

    def check_applicable(self, model: nn.Module) -> None:
        groups = self.groups(model)
        if not groups:
            reasons = "; ".join(f"{k}: {v}" for k, v in list(self.skipped.items())[:4])
            raise NotApplicable(f"CHEX found no prunable channel group with BatchNorm ({reasons})")
        if self.target == "flops":
            check_mac_target(model, self.input_shape, groups, self.flops_reduction, self.min_channels, self.skipped)

    def keep_fraction(self, model: nn.Module, groups: list[ChannelGroup],
                      scores: dict[int, torch.Tensor] | None) -> float:
        """1 - S; with ``target: flops`` the fraction whose allocation (``scores``' global ranking, or uniform
        when None) meets the MAC target."""
        if self.target == "channels":
            return 1.0 - self.sparsity
        macs = MacModel(model, self.input_shape, groups)
        if scores is None:
            return search_keep_fraction(lambda f: macs.macs(self.uniform_counts(groups, f)),
                                        (1.0 - self.flops_reduction) * macs.total)
        return search_keep_fraction(lambda f: macs.macs(self.allocate(scores, f)),
                                    (1.0 - self.flops_reduction) * macs.total)

    def allocate(self, scores: dict[int, torch.Tensor], keep: float) -> dict[int, int]:
        return allocate_counts(scores, keep, self.min_channels, self.channel_multiple)

    def uniform_counts(self, groups: list[ChannelGroup], keep: float) -> dict[int, int]:
        return {g.id: round_count(max(min(self.min_channels, g.size), round(keep * g.size)), g.size,
                                  self.channel_multiple) for g in groups}

    @staticmethod
    def gamma_scores(group: ChannelGroup, modules: dict[str, nn.Module]) -> torch.Tensor:
        gammas = [modules[norm].weight.detach().abs().cpu() for _, norm in group.producers]
        return torch.stack(gammas).mean(0)

    # ----------------------------------------------------------------------------- snapshots
    def _tensors(self, group: ChannelGroup, modules: dict[str, nn.Module]):
        """(key, tensor, per-channel rows) of every weight/statistic that a channel owns in the group."""
        for name, norm in group.producers + group.passthrough:
            layer = modules[name]
            yield f"{name}.weight", layer.weight, True
            if layer.bias is not None:
                yield f"{name}.bias", layer.bias, True
            if norm:
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(modules[norm], attr, None) is not None:
                        yield f"{norm}.{attr}", getattr(modules[norm], attr), False

    @torch.no_grad()
    def _snapshot(self, group: ChannelGroup, modules: dict[str, nn.Module], channels: torch.Tensor) -> None:
        for key, tensor, _ in self._tensors(group, modules):
            snap = self.snapshots.setdefault(key, tensor.detach().clone())
            snap[channels.to(snap.device)] = tensor.detach()[channels.to(tensor.device)]

    @torch.no_grad()
    def _restore(self, group: ChannelGroup, modules: dict[str, nn.Module], channels: torch.Tensor) -> None:
        for key, tensor, _ in self._tensors(group, modules):
            if key in self.snapshots:
                tensor[channels.to(tensor.device)] = self.snapshots[key][channels.to(tensor.device)].to(tensor.device)

    # ----------------------------------------------------------------------------- one step
    @torch.no_grad()
    def apply(self, group: ChannelGroup, modules: dict[str, nn.Module], new: torch.Tensor) -> None:
        """Make ``new`` (boolean per channel) the group's active set: snapshot leavers, restore returners."""
        old = channel_mask(group, modules)
        leaving, returning = torch.nonzero(old & ~new).flatten(), torch.nonzero(new & ~old).flatten()
        if len(leaving):
            self._snapshot(group, modules, leaving)
        set_channel_mask(group, modules, new)
        if len(returning):
            self._restore(group, modules, returning)

    def initial_masks(self, model: nn.Module) -> None:
        """Uniform channel sparsity S - delta0 per group, channels chosen by leverage score."""
        groups, modules = self.groups(model), dict(model.named_modules())
        keep = min(1.0, self.keep_fraction(model, groups, None) + self.delta0)
        counts = self.uniform_counts(groups, keep)
        for group in groups:
            k = counts[group.id]
            scores = leverage_scores(group_matrix(group, modules), k)
            new = torch.zeros(group.size, dtype=torch.bool)
            new[torch.topk(scores.cpu(), k).indices] = True
            self.apply(group, modules, new)
        self.history.append({"epoch": 0, "delta": self.delta0, "keep_fraction": keep,
                             "kept": {g.name: counts[g.id] for g in groups}, "regrown": {}})

    def explore(self, model: nn.Module, epoch: int, delta: float) -> dict[str, Any]:
        """One exploration step: global gamma allocation at S and S - delta, leverage keep, sampled regrowth."""
        groups, modules = self.groups(model), dict(model.named_modules())
        scores = {g.id: self.gamma_scores(g, modules) for g in groups}
        keep = self.keep_fraction(model, groups, scores)
        counts = self.allocate(scores, keep)
        grown_counts = self.allocate(scores, min(1.0, keep + delta)) if delta > 0 else counts
        generator = seeded_generator(self.seed, epoch)
        record: dict[str, Any] = {"epoch": epoch, "delta": delta, "keep_fraction": keep, "kept": {}, "regrown": {}}
        for group in groups:
            matrix = group_matrix(group, modules)
            k = counts[group.id]
            kept = torch.topk(leverage_scores(matrix, k).cpu(), k).indices
            new = torch.zeros(group.size, dtype=torch.bool)
            new[kept] = True
            n_grow = max(0, grown_counts[group.id] - k)
            if n_grow:
                candidates = torch.nonzero(~new).flatten()
                snapshot = self._snapshot_matrix(group, modules, matrix)
                new[sample_regrowth(snapshot, kept, candidates, n_grow, generator)] = True
            self.apply(group, modules, new)
            record["kept"][group.name], record["regrown"][group.name] = k, n_grow
        self.history.append(record)
        self.final_done = delta == 0
        return record

    def _snapshot_matrix(self, group: ChannelGroup, modules: dict[str, nn.Module], matrix: torch.Tensor):
        """The group matrix with masked channels replaced by the weights they had when last pruned."""
        active = channel_mask(group, modules)
        parts = []
        for name, _ in group.producers:
            snap = self.snapshots.get(f"{name}.weight")
            current = modules[name].weight.detach()
            if snap is None:
                parts.append(current.reshape(group.size, -1))
            else:
                rows = unit_rows(group, active).to(current.device).view(-1, *[1] * (current.dim() - 1))
                parts.append(torch.where(rows, current, snap.to(current.device)).reshape(group.size, -1))
        return torch.cat(parts, 1).T.float() if parts else matrix

    # ----------------------------------------------------------------------------- the contract
    def t_max(self, train_epochs: int) -> int:
        return max(1, round(self.t_max_fraction * train_epochs))

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        if stage == "train":
            self.initial_masks(model)
            return [ChannelExplorer(self), MaskEnforcer()]
        return [MaskEnforcer()]

    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        if not self.final_done:  # T_max was after the last train epoch: the delta = 0 step happens now
            self.explore(model, 10**6, 0.0)
        self.compacted = {k: list(v) for k, v in compact(model).items()}
        self.snapshots = {}
        return model

    def summary(self) -> dict[str, Any]:
        return {"target": self.target, "sparsity": self.sparsity, "flops_reduction": self.flops_reduction,
                "delta0": self.delta0, "delta_t_epochs": self.delta_t_epochs, "t_max_fraction": self.t_max_fraction,
                "exploration_steps": len(self.history), "final_keep_fraction":
                    self.history[-1]["keep_fraction"] if self.history else None,
                "compacted_groups": self.compacted, "groups_left_whole": self.skipped}


class ChannelExplorer(L.Callback):
    """Runs CHEX's exploration steps at the start of their epochs (state survives resume)."""

    def __init__(self, method: CHEX) -> None:
        self.method = method
        self.last_epoch = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch, t_max = trainer.current_epoch, self.method.t_max(trainer.max_epochs)
        if epoch <= self.last_epoch or epoch not in exploration_epochs(self.method.delta_t_epochs, t_max):
            return
        record = self.method.explore(pl_module.net, epoch, regrowth_ratio(epoch, t_max, self.method.delta0))
        self.last_epoch = epoch
        pl_module.print(f"[chex] epoch {epoch}: delta={record['delta']:.3f} keep={record['keep_fraction']:.3f} "
                        f"regrown={sum(record['regrown'].values())} channels")

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "method": self.method.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = state_dict["last_epoch"]
        self.method.load_state_dict(state_dict["method"])
