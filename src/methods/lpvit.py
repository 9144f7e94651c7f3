"""LPViT — hardware-aware block-structured pruning of vision transformers (Xu, Wang, Chen, Geng, Lin, Yang, Wu,
Li, Lin; "LPViT: Low-Power Semi-structured Pruning for Vision Transformers", ECCV 2024).

Algorithm: post-training pruning of whole R×C blocks of every linear layer of a ViT's blocks (attention qkv
and proj, MLP fc1 and fc2) with a per-layer sparsity chosen under a MAC target. On a calibration set, g_n is
the gradient of ½‖f(x_n)‖² (the squared network output) for each calibration sample n. A block's importance
is the block mean of mean_n |w ⊙ g_n|; each layer prunes its blocks in increasing importance. Per layer and
for each of ``levels`` sparsities, the pruned weights' change δ (−w on the pruned blocks) costs a first-order
term Σ_pruned mean_n |w ⊙ g_n| plus the second-order term ½ δᵀ(F + damping·I)δ with the empirical Fisher
F = mean_n g_n g_nᵀ, i.e. ½ mean_n (g_nᵀδ)² + ½ damping ‖δ‖² — exact for every level from per-sample block
sums, no Hessian is formed; the curve is smoothed to its running maximum (pruning more never costs less).
The hardware-aware objective adds γ·latency_l(level): the latency of the layer alone with its remaining
blocks on the hardware profile, from our latency simulator (block-sparse formats, the profile's sparse
efficiencies); γ is auto-scaled so that the most latency all layers can save weighs as much as the accuracy
cost of pruning every layer uniformly to the target, times ``hardware_weight``. Every layer then takes the
level where its objective's slope against its MACs equals a common λ (the minimiser of objective + λ·MACs, on
the lower convex hull of its curve), and λ is found by binary search (negative when the hardware term alone
would prune past the target) so that the whole network's remaining MACs meet ``macs_target`` within ±0.02 (a
layer whose choice jumps across the target at λ takes the level in between that meets it); every layer keeps
at least ``min_keep`` of its blocks. The blocks are masked and the network is fine-tuned with the masks fixed
(the paper: the DeiT recipe with distillation; here the shared ``distill.*`` path, set by the lpvit
experiments). Evaluate runs the block-sparse layers through the host's BSR kernel wherever it beats dense,
and the simulator prices them on every profile.

Config keys (conf/method/lpvit.yaml):
* ``macs_target`` (0.5): fraction of the whole model's dense MACs that remains (attention products, patch
  embedding and head included: the paper's "50% FLOPs"); met within ±0.02 or refused.
* ``block`` ([16, 16]): R, C of the blocks (the paper: 16×16 for DeiT-S and Swin, 32×32 / 32×64 / 64×32 for
  DeiT-B); edge blocks of a dimension that is not a multiple are partial.
* ``layers`` ([qkv, proj, fc1, fc2]): last name component of the nn.Linear layers pruned.
* ``min_keep`` (0.05): fraction of every layer's blocks that is always kept.
* ``levels`` (101): sparsity levels per curve, 0% to 100% (those keeping fewer than ``min_keep`` are skipped).
* ``calib_size`` (2000, the paper's), ``fisher_batch`` (1): calibration images from the train split (seeded,
  no augmentation) and images per gradient sample (1: the per-sample empirical Fisher; larger: fewer, averaged
  gradients — faster, a coarser Fisher).
* ``damping`` (1e-7): added to the Fisher's diagonal.
* ``hardware`` (null): the profile of the hardware term; null = the run's ``hardware``.
* ``hardware_weight`` (1.0): multiplies the auto-scaled γ; 0 turns the hardware term off.
* ``hw_batch`` (1): batch at which a layer's latency is simulated.
* ``mask_grads`` (true): as for ``magnitude``.

Deviations from the paper: the latency per layer comes from our roofline simulator of the chosen profile (the
paper: a power/speed model of its hardware); "averaged over a calibration set" is read as the mean of the
per-sample |w ⊙ g_n|; the curve smoothing is the running maximum; the MAC target counts the whole network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from compress_run.core.compression_info import mask_formats
from compress_run.core.config import check
from compress_run.core.errors import UserError
from compress_run.core.masks import MaskEnforcer, attach_mask
from compress_run.hardware.macs import count_macs
from compress_run.hardware.profile import HardwareConfig, available_profiles, load_profile
from compress_run.hardware.simulator import Simulator
from compress_run.hardware.trace import trace_model
from compress_run.methods.base import Method, MethodConfig, NotApplicable, method_config
from compress_run.methods.calibration import calibration_batches, macs_per_weight

MAC_TOLERANCE = 0.02  # the remaining-MAC fraction is met within this (the paper's search tolerance)


@method_config("lpvit")
@dataclass
class LPViTConfig(MethodConfig):
    macs_target: float = 0.5
    block: list[int] = field(default_factory=lambda: [16, 16])
    layers: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    min_keep: float = 0.05
    levels: int = 101
    calib_size: int = 2000
    fisher_batch: int = 1
    damping: float = 1e-7
    hardware: str | None = None
    hardware_weight: float = 1.0
    hw_batch: int = 1
    mask_grads: bool = True

    def __post_init__(self) -> None:
        check(0.0 < self.macs_target < 1.0, "method.macs_target", self.macs_target, "a float in (0, 1)")
        check(len(self.block) == 2 and all(isinstance(b, int) and b >= 1 for b in self.block), "method.block",
              self.block, "two integers >= 1, [rows, cols] of a block (e.g. [16, 16])")
        check(len(self.layers) >= 1, "method.layers", self.layers, "a non-empty list of layer names (qkv, fc1, ...)")
        check(0.0 < self.min_keep <= 1.0, "method.min_keep", self.min_keep, "a float in (0, 1]")
        check(self.levels >= 2, "method.levels", self.levels, "an integer >= 2 (0% and 100% at least)")
        check(self.calib_size >= 1, "method.calib_size", self.calib_size, "an integer >= 1")
        check(self.fisher_batch >= 1, "method.fisher_batch", self.fisher_batch, "an integer >= 1")
        check(self.damping >= 0.0, "method.damping", self.damping, "a float >= 0")
        check(self.hardware is None or self.hardware in available_profiles(), "method.hardware", self.hardware,
              f"null (the run's hardware) or one of {', '.join(available_profiles())}")
        check(self.hardware_weight >= 0.0, "method.hardware_weight", self.hardware_weight, "a float >= 0")
        check(self.hw_batch >= 1, "method.hw_batch", self.hw_batch, "an integer >= 1")


# ------------------------------------------------------------------------------------------ blocks
class BlockGrid:
    """The R×C block grid of a [rows, cols] weight: block sums of a matrix and block masks (edge blocks partial)."""

    def __init__(self, shape: torch.Size | tuple[int, int], r: int, c: int) -> None:
        self.rows, self.cols = shape
        self.r, self.c = r, c
        self.grid = (math.ceil(self.rows / r), math.ceil(self.cols / c))
        self.count = self.grid[0] * self.grid[1]
        self.sizes = self.sums(torch.ones(self.rows, self.cols))  # entries per block, row-major

    def sums(self, matrix: torch.Tensor) -> torch.Tensor:
        """Per-block sums of ``matrix`` [..., rows, cols] -> [..., blocks] (row-major over the grid)."""
        lead = matrix.shape[:-2]
        padded = F.pad(matrix.reshape(-1, 1, self.rows, self.cols), (0, -self.cols % self.c, 0, -self.rows % self.r))
        pooled = F.avg_pool2d(padded, (self.r, self.c), divisor_override=1)
        return pooled.reshape(*lead, self.count)

    def mask(self, keep_blocks: torch.Tensor) -> torch.Tensor:
        """Boolean [rows, cols] mask keeping the blocks flagged in ``keep_blocks`` [blocks]."""
        keep = keep_blocks.reshape(self.grid).repeat_interleave(self.r, 0).repeat_interleave(self.c, 1)
        return keep[: self.rows, : self.cols].clone()


@dataclass
class LayerCurves:
    """One layer's pruning curves over the levels it may take (level k prunes ``pruned[k]`` blocks)."""
    order: torch.Tensor        # blocks in increasing importance (pruned first)
    pruned: list[int]          # blocks pruned at each allowed level
    sparsity: list[float]      # nominal sparsity of each allowed level
    cost: np.ndarray           # first + second order, smoothed
    macs: np.ndarray           # the layer's remaining MACs per image
    latency: np.ndarray        # simulated ms of the layer alone (zeros with the hardware term off)


def level_blocks(count: int, levels: int, min_keep: float) -> tuple[list[int], list[float]]:
    """Pruned-block counts of the levels that keep at least ceil(min_keep * count) blocks (duplicates dropped)."""
    floor = math.ceil(min_keep * count - 1e-9)
    pruned, sparsity = [], []
    for k in range(levels):
        s = k / (levels - 1)
        p = int(round(s * count))
        if count - p >= floor and (not pruned or p != pruned[-1]):
            pruned.append(p)
            sparsity.append(s)
    return pruned, sparsity


def gradient_statistics(model: nn.Module, layers: dict[str, nn.Linear], batches: list[torch.Tensor],
                        grids: dict[str, BlockGrid], progress: Progress | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per layer: mean_n |w ⊙ g_n| [out, in] and the per-sample block sums of w ⊙ g_n [samples, blocks],
    g_n = ∂ ½‖f(x_n)‖² / ∂w for each calibration batch x_n."""
    names = list(layers)
    weights = [layers[n].weight for n in names]
    abs_sum = {n: torch.zeros_like(layers[n].weight, dtype=torch.float32) for n in names}
    block_terms: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    task = progress.add_task("LPViT gradients", total=len(batches)) if progress else None
    with torch.enable_grad():
        for x in batches:
            out = model(x)
            objective = 0.5 * out.float().pow(2).sum() / x.shape[0]
            grads = torch.autograd.grad(objective, weights)
            for n, w, g in zip(names, weights, grads, strict=True):
                wg = (w.detach() * g).float()
                abs_sum[n] += wg.abs()
                block_terms[n].append(grids[n].sums(wg))
            if progress is not None:
                progress.advance(task)
    return ({n: s / len(batches) for n, s in abs_sum.items()},
            {n: torch.stack(t).double() for n, t in block_terms.items()})


def layer_curves(weight: torch.Tensor, grid: BlockGrid, abs_mean: torch.Tensor, block_terms: torch.Tensor,
                 tokens: float, levels: int, min_keep: float, damping: float) -> LayerCurves:
    """Cost and MAC curves of one layer (latency filled in later)."""
    importance = grid.sums(abs_mean) / grid.sizes                      # block mean of mean_n |w ⊙ g_n|
    order = torch.argsort(importance, stable=True)
    pruned, sparsity = level_blocks(grid.count, levels, min_keep)
    index = torch.tensor(pruned)
    zero = torch.zeros(1, dtype=torch.float64)
    first = torch.cat([zero, torch.cumsum(grid.sums(abs_mean).double()[order], 0)])[index]
    along = torch.cat([torch.zeros(block_terms.shape[0], 1, dtype=torch.float64),
                       torch.cumsum(block_terms[:, order], 1)], 1)[:, index]   # g_nᵀ(−δ) per sample and level
    norms = torch.cat([zero, torch.cumsum(grid.sums(weight.detach().double().pow(2))[order], 0)])[index]
    second = 0.5 * along.pow(2).mean(0) + 0.5 * damping * norms
    cost = np.maximum.accumulate((first + second).numpy())
    sizes = grid.sizes.double()[order]
    kept = grid.rows * grid.cols - torch.cat([zero, torch.cumsum(sizes, 0)])[index]
    return LayerCurves(order=order, pruned=pruned, sparsity=sparsity, cost=cost,
                       macs=(kept * tokens).numpy(), latency=np.zeros(len(pruned)))


def layer_latencies(layer: nn.Linear, grid: BlockGrid, curves: LayerCurves, tokens: int, batch: int,
                    profile: HardwareConfig) -> np.ndarray:
    """Simulated ms of ``layer`` alone on ``profile`` with its remaining blocks, per level (the simulator picks
    dense or the profile's best sparse format for each mask)."""
    probe = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    trace = trace_model(probe, (batch, tokens, layer.in_features))
    simulator = Simulator(profile)
    out = []
    for p in curves.pruned:
        keep = torch.ones(grid.count, dtype=torch.bool)
        keep[curves.order[:p]] = False
        mask = grid.mask(keep)
        info = {"kind": "mask", "pattern": "block", "density": mask.float().mean().item(),
                "shape": list(mask.shape), "formats": mask_formats(mask)}
        out.append(simulator.run(trace, {"": info}).total_ms)
    return np.array(out)


# -------------------------------------------------------------------------------------- allocation
def uniform_levels(curves: dict[str, LayerCurves], fixed_macs: float, total_macs: float,
                   target: float) -> dict[str, int]:
    """Every layer's level at the lowest common sparsity that brings the network to ``target`` (a layer whose
    allowed levels stop earlier stays at its last)."""
    grid = sorted({s for c in curves.values() for s in c.sparsity})
    choice: dict[str, int] = {}
    for s in grid:
        choice = {n: max(i for i, v in enumerate(c.sparsity) if v <= s + 1e-12) for n, c in curves.items()}
        if (fixed_macs + sum(curves[n].macs[k] for n, k in choice.items())) / total_macs <= target:
            break
    return choice


def auto_gamma(curves: dict[str, LayerCurves], fixed_macs: float, total_macs: float, target: float) -> float:
    """γ that weighs the hardware term like the accuracy cost at the operating point: the cost uniform pruning to
    the target adds, over the most latency the layers can save (0 when no level is faster than dense)."""
    saving = sum(c.latency[0] - c.latency.min() for c in curves.values())
    if saving <= 0:
        return 0.0
    uniform = uniform_levels(curves, fixed_macs, total_macs, target)
    return sum(c.cost[uniform[n]] - c.cost[0] for n, c in curves.items()) / saving


@dataclass
class Allocation:
    choice: dict[str, int]     # layer -> index into its allowed levels
    macs_ratio: float          # remaining MACs / dense MACs of the whole model
    slope: float               # the common λ


def choose_at(objective: dict[str, np.ndarray], macs: dict[str, np.ndarray], slope: float) -> dict[str, int]:
    """Every layer's level minimising objective + slope · MACs (its curve's slope against MACs equals -slope)."""
    return {n: int(np.argmin(objective[n] + slope * macs[n])) for n in objective}


def match_slopes(objective: dict[str, np.ndarray], macs: dict[str, np.ndarray], fixed_macs: float,
                 total_macs: float, target: float, tolerance: float = MAC_TOLERANCE) -> Allocation:
    """The common slope λ (binary search) at which the network's remaining MACs come to ``target`` ± tolerance.
    ``macs`` are per-layer remaining MACs per level (decreasing), ``fixed_macs`` those no level changes.
    Raises ValueError when the levels cannot land within the tolerance."""
    scale = {n: macs[n] / total_macs for n in macs}

    def ratio(choice: dict[str, int]) -> float:
        return (fixed_macs + sum(macs[n][k] for n, k in choice.items())) / total_macs

    lowest = (fixed_macs + sum(m[-1] for m in macs.values())) / total_macs
    if target < lowest - tolerance:
        raise ValueError(f"the lowest reachable MAC fraction is {lowest:.3f}")
    lo, hi = -1.0, 1.0  # λ < 0 when the hardware term alone would prune below the target
    while ratio(choose_at(objective, scale, lo)) <= target and lo > -1e30:
        lo *= 4
    while ratio(choose_at(objective, scale, hi)) > target and hi < 1e30:
        hi *= 4
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if ratio(choose_at(objective, scale, mid)) > target:
            lo = mid
        else:
            hi = mid
    choice, above = choose_at(objective, scale, hi), choose_at(objective, scale, lo)
    # the layers whose choice jumps at λ (a long edge of their hull) step back towards their choice just above
    # λ, through the levels in between, as far as the target allows: the biggest jumps first
    for n in sorted(choice, key=lambda n: macs[n][above[n]] - macs[n][choice[n]], reverse=True):
        for k in range(above[n], choice[n]):
            trial = {**choice, n: k}
            if ratio(trial) <= target:
                choice = trial
                break
    achieved = ratio(choice)
    if abs(achieved - target) > tolerance:
        raise ValueError(f"the closest the levels reach is {achieved:.3f}")
    return Allocation(choice, achieved, hi)


# ------------------------------------------------------------------------------------------ method
class LPViT(Method):
    plain_train = True  # its train stage is ordinary training (see Method.trains_plainly)
    Config = LPViTConfig
    state_attributes = ("report",)

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        self.profile_name = self.config.hardware  # `hardware` is the run's profile the pipeline sets
        self.hardware = None
        self.report: dict[str, Any] = {}
        self.seed = torch.initial_seed()

    def profile(self) -> HardwareConfig:
        return load_profile(self.profile_name) if self.profile_name else (self.hardware or load_profile("host_cpu"))

    def pattern(self) -> str:
        return f"block:{self.block[0]}:{self.block[1]}"

    def layers(self, model: nn.Module) -> dict[str, nn.Linear]:
        return {n: m for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and n.rpartition(".")[2] in self.layers_names()}

    def layers_names(self) -> list[str]:
        return list(self.config.layers)

    def mac_budget(self, model: nn.Module) -> tuple[dict[str, float], float, float]:
        """Tokens per image of every pruned layer, the MACs no level changes and the model's dense MACs."""
        layers = self.layers(model)
        device = next(model.parameters()).device
        sample = torch.zeros((1, *self.input_shape), device=device)
        was_training = model.training
        try:
            tokens = macs_per_weight(model.eval(), list(layers), sample)
            total = float(count_macs(model, (1, *self.input_shape)).dense)
        finally:
            model.train(was_training)
        fixed = total - sum(tokens[n] * layers[n].weight.numel() for n in layers)
        return tokens, fixed, total

    def check_applicable(self, model: nn.Module) -> None:
        layers = self.layers(model)
        if not layers:
            raise NotApplicable(f"no nn.Linear layer named {'/'.join(self.layers_names())} (method.layers): lpvit "
                                "prunes the linear layers of a ViT's blocks; choose a ViT model (vit_fmnist, deit_*) "
                                "or set method.layers to the names of the model's linear layers")
        tokens, fixed, total = self.mac_budget(model)
        lowest = fixed
        for name, layer in layers.items():
            grid = BlockGrid(layer.weight.shape, *self.block)
            keep = math.ceil(self.min_keep * grid.count - 1e-9)
            lowest += tokens[name] * float(torch.sort(grid.sizes).values[:keep].sum())
        if self.macs_target < lowest / total - MAC_TOLERANCE:
            raise NotApplicable(f"method.macs_target={self.macs_target} cannot be reached: with every pruned layer at "
                                f"its minimum of {self.min_keep:g} of its blocks the model keeps {lowest / total:.3f} "
                                f"of its MACs (the reachable range is [{lowest / total:.3f}, 1)); raise "
                                "method.macs_target, lower method.min_keep or add layers to method.layers")

    def check_data(self, train_size: int) -> None:
        if self.calib_size > train_size:
            raise NotApplicable(f"method.calib_size={self.calib_size} is larger than the train split ({train_size} "
                                f"images); set method.calib_size <= {train_size}")

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        return [MaskEnforcer(self.mask_grads)] if stage == "finetune" else []

    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        model.eval()
        layers = self.layers(model)
        device = next(model.parameters()).device
        grids = {n: BlockGrid(m.weight.shape, *self.block) for n, m in layers.items()}
        batches = calibration_batches(datamodule, "train", self.calib_size, self.fisher_batch,
                                      tuple(self.input_shape), self.seed + 7919, device)
        tokens, fixed, total = self.mac_budget(model)
        with Progress(transient=True) as progress:
            abs_mean, block_terms = gradient_statistics(model, layers, batches, grids, progress)
        curves = {n: layer_curves(layers[n].weight.cpu(), grids[n], abs_mean[n].cpu(), block_terms[n].cpu(),
                                  tokens[n], self.levels, self.min_keep, self.damping) for n in layers}
        profile = self.profile()
        if self.hardware_weight > 0:
            for n, c in curves.items():
                c.latency = layer_latencies(layers[n], grids[n], c, round(tokens[n]), self.hw_batch, profile)
        gamma = auto_gamma(curves, fixed, total, self.macs_target) * self.hardware_weight
        latency_range = sum(c.latency[0] - c.latency.min() for c in curves.values())
        objective = {n: c.cost + gamma * c.latency for n, c in curves.items()}
        try:
            allocation = match_slopes(objective, {n: c.macs for n, c in curves.items()}, fixed, total,
                                      self.macs_target)
        except ValueError as exc:
            raise UserError(f"method.macs_target={self.macs_target} cannot be met within ±{MAC_TOLERANCE}: {exc}",
                            "raise method.levels, use smaller method.block, or change method.macs_target") from exc
        with torch.no_grad():
            for n, k in allocation.choice.items():
                keep = torch.ones(grids[n].count, dtype=torch.bool)
                keep[curves[n].order[: curves[n].pruned[k]]] = False
                mask = grids[n].mask(keep).to(layers[n].weight.device)
                attach_mask(layers[n], mask)
                layers[n].weight.mul_(mask)
        chosen = allocation.choice
        self.report = {
            "macs_ratio": allocation.macs_ratio, "slope": allocation.slope, "gamma": gamma,
            "hardware_term": profile.name if self.hardware_weight > 0 else None,
            "hardware_term_flat": latency_range == 0,
            "layer_sparsity": {n: curves[n].pruned[k] / grids[n].count for n, k in chosen.items()},
            "layer_latency_ms": {n: [float(curves[n].latency[0]), float(curves[n].latency[k])]
                                 for n, k in chosen.items()},
            "calib_samples": len(batches),
        }
        return model

    def summary(self) -> dict[str, Any]:
        return {"macs_target": self.macs_target, "block": list(self.block), "pattern": self.pattern(),
                "levels": self.levels, "calib_size": self.calib_size, **self.report}
