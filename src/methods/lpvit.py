"""LPViT — hardware-aware block pruning of vision transformers (Xu, Wang, Chen, Geng, Lin, Yang, Wu, Li, Lin;
"LPViT: Low-Power Semi-structured Pruning for Vision Transformers", ECCV 2024, arXiv 2407.02068).

Reference code: the paper's method section was not reachable here, so the released code is the reference,
Akimoto-Cris/LPViT:
* tools/pruners.py — ``gen_rd_curves_block_approx`` (mean gradient, cost and power curves), ``hessian_deltaw`` and
  ``taylor_2nd_order_fischer_approx`` (the second-order term), ``RDPruner.recalc_lamda_power`` (β) and
  ``RDPruner.__call__`` (min_sp, the allocation);
* tools/algo.py — ``get_mask_blockwise_fast`` (block ranking), ``smooth`` (EMA), ``derivative_approx`` and
  ``pareto_condition`` (derivative matching);
* tools/common.py — ``findconv`` (the layer set), ``find_slope`` / ``binary_search`` (the budget search),
  ``get_model_flops`` (the FLOPs count);
* prune_vit.py (arguments and defaults) and scripts/*.sh (the settings of each published row).

Algorithm (``curves: authors``, the default). Every nn.Linear and nn.Conv2d of the model is pruned in R×C blocks
of its [out, in·k·k] weight: the patch embedding, every block's qkv / proj / fc1 / fc2 and the classifier heads.
On the calibration set, ḡ is the mean over calibration batches of the gradient of the batch's mean squared
network output (mean over images and classes). A block's importance is the block mean of |w ⊙ ḡ|. At level
d = 0..L-1 (pruned fraction a = d/(L-1)) a layer keeps its int((1 - a)·blocks) most important blocks; with δ = -w
on the pruned weights its cost is mean((δ ⊙ ḡ)²) over the layer's weights plus the release's second-order term,
which accumulates from level to level: each step Δ (the newly pruned weights, δ the level's) adds
½ (Δ + 2δ)ᵀ(ḡ ḡᵀ Δ + λ·1_Δ), λ = ``damping`` and 1_Δ the indicator of the newly pruned weights. In closed form
this is ½ (ḡᵀδ)² + Σ_steps (ḡᵀΔ)² - 1.5 λ Σ_pruned w (the release's incremental update, kept as it is: the exact
½ δᵀ(ḡḡᵀ + λI)δ would be the first term plus ½ λ‖δ‖²). The cost curve is smoothed by the de-biased EMA of weight
``smooth``. The power term of a layer is P(a) = a · numel / (R·C) · ⌊n_in/16⌋ (n_in: a linear layer's input
features; for a conv, index 1 of its per-sample input shape, i.e. the input height, as released; the release
names the count "survived blocks" but a is the pruned fraction, so P grows with pruning) and is added with
weight β = mean over layers of the largest slope of the smoothed cost / mean over layers of the largest slope of
P (``hardware_weight`` × β). Slopes are the release's finite differences (``derivative_approx``: 5-point with
half-width ``h``, narrower at the ends; β uses half-width 10). Each layer takes, among levels 0..L-2, the one
whose slope of cost + β·P is closest to 2^s, capped at the pruned fraction 1 - min(``min_keep``, (1 - target)/2);
s is bisected in [-100, 100] (at most 40 steps, as ``binary_search``) until the remaining FLOPs are within ±0.02
of ``macs_target``. The FLOPs are the release's count (``get_model_flops``) over every Linear/Conv of the model:
kept weights × output positions (a conv: its output height × width; a linear layer: the first dimension of its
per-sample output, the tokens — for a classifier head on a [batch, classes] output the class count, as
released) plus, for a layer with a bias, its per-sample output size. The masks are applied and the network is
fine-tuned with them fixed (the release: DeiT's recipe with soft distillation from RegNetY-160; here the shared
``distill.*`` path, set by the lpvit experiments). Evaluate runs the block-sparse layers through the host's BSR
kernel wherever it beats dense, and the simulator prices them on every profile.

Extensions (OURS, not the paper's):
* ``hardware_term: simulated``: instead of P, γ·latency_l(level), the latency of the layer alone with its
  remaining blocks on a hardware profile from our roofline simulator (block-sparse formats, the profile's sparse
  efficiencies); γ is auto-scaled so that the most latency all layers can save weighs as much as the cost of
  pruning every layer uniformly to the target, times ``hardware_weight``.
* ``curves: fisher`` (the first version of this module, kept for the published fmnist_vit_block rows): block
  importance the block mean of mean_n |w ⊙ g_n| with g_n the per-sample gradient of ½‖f(x_n)‖²; cost
  Σ_pruned mean_n |w ⊙ g_n| + ½ mean_n (g_nᵀδ)² + ½ λ‖δ‖² (the per-sample empirical Fisher), smoothed to its
  running maximum; levels keep at least ⌈min_keep·blocks⌉ blocks; every layer takes the minimiser of
  objective + μ·budget on the lower convex hull of its curve, μ binary-searched (negative when the hardware
  term alone would prune past the target), the layer whose choice jumps across the target at μ stepping back.
* ``budget: macs``: the target counts every MAC of the model (attention products included), not the release's
  conv/linear FLOPs.

Config keys (conf/method/lpvit.yaml):
* ``macs_target`` (0.5): fraction of ``budget`` that remains (the release's --amount with --flop_budget; its
  "FLOPs" count multiply-accumulates); met within ±0.02 or refused.
* ``budget`` (flops): ``flops`` (the release's conv/linear count above) or ``macs`` (ours).
* ``block`` ([16, 16]): R, C of the blocks (the release: 16×16 for DeiT-S and Swin, 32×32 / 32×64 / 64×32 for
  DeiT-B); edge blocks of a dimension that is not a multiple are partial (ranked by their mean).
* ``layers`` (null): null = every nn.Linear and nn.Conv2d (the release's ``findconv``); a list (ours) = the
  nn.Linear layers whose last name component is listed, e.g. [qkv, proj, fc1, fc2].
* ``curves`` (authors): ``authors`` or ``fisher`` (ours), as above.
* ``smooth`` (0.5): EMA weight of the cost-curve smoothing (the release's --smooth; its scripts use 0.1, 0.5,
  0.9 per row; 0 = none). ``h`` (4): half-width of the slope stencil (the release's --h). Both ``authors`` only.
* ``min_keep`` (0.05): the release's --min_sp, as above (``fisher``: the fraction of blocks every layer keeps).
* ``levels`` (101): levels per curve, pruned fractions 0 to 1 (the release's --maxdeadzones + 1).
* ``calib_size`` (2000, the release's), ``calib_batch`` (64, the release's calibration batch): calibration images
  from the train split (seeded, no augmentation) and images per gradient pass (``authors``: ḡ averages the
  batches' gradients as released; ``fisher``: each pass is one gradient sample of the Fisher).
* ``damping`` (1e-7): λ above.
* ``hardware_term`` (power): ``power`` (the release's --lambda_power > 0), ``simulated`` (ours) or ``none``.
* ``hardware_weight`` (1.0): multiplies the auto-scaled β or γ (1 = the release's β; other values are ours).
* ``hardware`` (null), ``hw_batch`` (1): ``simulated`` only — the profile (null = the run's ``hardware``) and the
  batch at which a layer's latency is simulated.
* ``mask_grads`` (true): as for ``magnitude``.

Deviations from the release (``curves: authors``): the calibration images are a seeded random draw of the train
split through the dataset's evaluation transform (the release, tools/dataloaders.py: a fixed stride over the
ImageNet train files, resized to 256, centre-cropped to 224, normalised with mean = std = 0.5); the gradient is
taken in eval mode (the release calls net.train(); its pretrained models have no active dropout or drop-path, so
the gradient is the same); curves in float64 (the release: float32). When the release's bisection ends off the
target (the remaining FLOPs need not fall monotonically with s: a curve's slopes are not sorted), we try one s in
every interval of s on which no layer's choice changes and take the closest (the release goes on with the slope
its bisection ended at); a target still missed by more than ±0.02 is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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

MAC_TOLERANCE = 0.02  # the remaining budget fraction is met within this (the release's binary_search epsilon)
PRUNED_TYPES = (nn.Linear, nn.Conv2d)  # the release's PARAMETRIZED_MODULE_TYPES
BETA_STENCIL = 10  # half-width of the slopes β compares (RDPruner.recalc_lamda_power)
SLOPE_RANGE, SEARCH_STEPS = 100.0, 40  # log2 slopes searched in [-100, 100], at most 40 halvings (find_slope)


@method_config("lpvit")
@dataclass
class LPViTConfig(MethodConfig):
    macs_target: float = 0.5
    budget: str = "flops"
    block: list[int] = field(default_factory=lambda: [16, 16])
    layers: list[str] | None = None
    curves: str = "authors"
    smooth: float = 0.5
    h: int = 4
    min_keep: float = 0.05
    levels: int = 101
    calib_size: int = 2000
    calib_batch: int = 64
    damping: float = 1e-7
    hardware_term: str = "power"
    hardware_weight: float = 1.0
    hardware: str | None = None
    hw_batch: int = 1
    mask_grads: bool = True

    def __post_init__(self) -> None:
        check(0.0 < self.macs_target < 1.0, "method.macs_target", self.macs_target, "a float in (0, 1)")
        check(self.budget in ("flops", "macs"), "method.budget", self.budget,
              "flops (the release's conv/linear FLOPs) or macs (every MAC of the model)")
        check(len(self.block) == 2 and all(isinstance(b, int) and b >= 1 for b in self.block), "method.block",
              self.block, "two integers >= 1, [rows, cols] of a block (e.g. [16, 16])")
        check(self.layers is None or len(self.layers) >= 1, "method.layers", self.layers,
              "null (every Linear/Conv2d) or a non-empty list of layer names (qkv, fc1, ...)")
        check(self.curves in ("authors", "fisher"), "method.curves", self.curves, "authors or fisher")
        check(0.0 <= self.smooth < 1.0, "method.smooth", self.smooth, "a float in [0, 1) (the EMA weight)")
        check(self.h >= 1, "method.h", self.h, "an integer >= 1 (the slope stencil's half-width)")
        check(0.0 < self.min_keep <= 1.0, "method.min_keep", self.min_keep, "a float in (0, 1]")
        check(self.levels >= 3, "method.levels", self.levels, "an integer >= 3")
        check(self.calib_size >= 1, "method.calib_size", self.calib_size, "an integer >= 1")
        check(self.calib_batch >= 1, "method.calib_batch", self.calib_batch, "an integer >= 1")
        check(self.damping >= 0.0, "method.damping", self.damping, "a float >= 0")
        check(self.hardware_term in ("power", "simulated", "none"), "method.hardware_term", self.hardware_term,
              "power (the release's), simulated (our latency simulator) or none")
        check(self.hardware_weight >= 0.0, "method.hardware_weight", self.hardware_weight, "a float >= 0")
        check(self.hardware is None or self.hardware in available_profiles(), "method.hardware", self.hardware,
              f"null (the run's hardware) or one of {', '.join(available_profiles())}")
        check(self.hw_batch >= 1, "method.hw_batch", self.hw_batch, "an integer >= 1")


# ------------------------------------------------------------------------------------------ blocks
def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The [out, in·k·k] view the blocks tile (the release's reshape_tensor_for_blockwise)."""
    return weight.reshape(weight.shape[0], -1)


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
    """One layer's curves over the levels it may take (level k prunes ``pruned[k]`` blocks, in ``order``)."""
    order: torch.Tensor        # blocks in pruning order (least important first)
    pruned: list[int]          # blocks pruned at each level
    sparsity: list[float]      # nominal pruned fraction of each level (the curves' x)
    cost: np.ndarray           # the accuracy cost, smoothed
    removed: torch.Tensor      # weights removed with the first p blocks of ``order`` (p = 0..blocks), float64
    size: int                  # weights of the layer
    budget: np.ndarray = field(default_factory=lambda: np.zeros(0))  # kept · the budget's cost of one weight
    hw: np.ndarray = field(default_factory=lambda: np.zeros(0))      # the hardware term (zeros when off)

    @property
    def kept(self) -> np.ndarray:
        """Weights kept at each level."""
        return (self.size - self.removed[torch.tensor(self.pruned)]).numpy()

    def kept_at(self, pruned: int) -> float:
        return float(self.size - self.removed[pruned])


def kept_blocks(amount: float, count: int) -> int:
    """Blocks a layer keeps at pruned fraction ``amount``, computed as the release does (get_mask_blockwise_fast:
    int((1 - amount) · blocks), a float times a count tensor, in float32)."""
    return count if amount <= 0 else int((1.0 - amount) * torch.tensor(count))


def removed_weights(grid: BlockGrid, order: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(grid.sizes.double()[order], 0)])


# ------------------------------------------------------------------------------ the release's curves
def mean_gradients(model: nn.Module, layers: dict[str, nn.Module], batches: list[torch.Tensor],
                   progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """ḡ per layer: the mean over ``batches`` of ∂ mean(f(x)²) / ∂w (the batch mean over images and classes)."""
    names = list(layers)
    weights = [layers[n].weight for n in names]
    total = {n: torch.zeros_like(layers[n].weight, dtype=torch.float32) for n in names}
    task = progress.add_task("LPViT gradients", total=len(batches)) if progress else None
    with torch.enable_grad():
        for x in batches:
            grads = torch.autograd.grad(model(x).float().pow(2).mean(), weights)
            for n, g in zip(names, grads, strict=True):
                total[n] += g.float()
            if progress is not None:
                progress.advance(task)
    return {n: t / len(batches) for n, t in total.items()}


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """The release's de-biased EMA (tools/algo.py: smooth)."""
    out, last = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        last = last * weight + (1.0 - weight) * v
        out[i] = last / (1.0 - weight ** (i + 1))
    return out


def authors_curves(weight: torch.Tensor, grad: torch.Tensor, grid: BlockGrid, levels: int, damping: float,
                   smooth: float) -> LayerCurves:
    """The release's cost curve of one layer (weight and ḡ as [out, in·k·k] matrices)."""
    w, g = weight.detach().double(), grad.double()
    wg = w * g
    importance = grid.sums(wg.abs()) / grid.sizes                  # block mean of |w ⊙ ḡ|
    order = torch.argsort(importance, descending=True, stable=True).flip(0)  # the kept top-k are the last
    sparsity = [d / (levels - 1) for d in range(levels)]
    pruned = [grid.count - kept_blocks(a, grid.count) for a in sparsity]
    index = torch.tensor(pruned)
    zero = torch.zeros(1, dtype=torch.float64)

    def cumulative(blocks: torch.Tensor) -> torch.Tensor:
        return torch.cat([zero, torch.cumsum(blocks[order], 0)])[index]

    first = cumulative(grid.sums(wg * wg)) / w.numel()             # mean((δ ⊙ ḡ)²)
    along = -cumulative(grid.sums(wg))                             # ḡᵀδ per level
    steps = torch.diff(along, prepend=zero)                        # ḡᵀΔ of each step from the level before
    second = 0.5 * along**2 + torch.cumsum(steps**2, 0) - 1.5 * damping * cumulative(grid.sums(w))
    cost = ema((first + second).numpy(), smooth)
    return LayerCurves(order=order, pruned=pruned, sparsity=sparsity, cost=cost,
                       removed=removed_weights(grid, order), size=grid.rows * grid.cols)


def derivative_approx(xs: np.ndarray, ys: np.ndarray, h: int) -> np.ndarray:
    """Slopes of ys(xs) at the points but the last, as released (tools/algo.py: derivative_approx)."""
    n, out = len(xs), []
    for i in range(n - 1):
        w = min(h, i, n - i - 1)
        if w < 2 and i < 2:
            out.append((ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]))
        elif w < 2 and n - i < 3:
            out.append((ys[i + 1] - ys[i - 1]) / (xs[i + 1] - xs[i - 1]))
        else:
            k = int(w / 2)
            out.append((-ys[i + w] + 8 * ys[i + k] - 8 * ys[i - k] + ys[i - w]) / (6 * (xs[i + w] - xs[i])))
    return np.array(out)


def power_curve(sparsity: list[float], numel: int, block: list[int], inputs: int) -> np.ndarray:
    """The release's power cost of a layer per level: a · numel / (R·C) · ⌊inputs / 16⌋ (pow_costs_l)."""
    return np.asarray(sparsity) * numel / (block[0] * block[1]) * float(inputs // 16)


def power_weight(curves: dict[str, LayerCurves]) -> float:
    """β = mean largest slope of the costs / mean largest slope of the power terms (recalc_lamda_power)."""
    cost = np.mean([derivative_approx(np.asarray(c.sparsity), c.cost, BETA_STENCIL).max() for c in curves.values()])
    power = np.mean([derivative_approx(np.asarray(c.sparsity), c.hw, BETA_STENCIL).max() for c in curves.values()])
    return float(cost / power) if power > 0 else 0.0


def release_search(ratio: Callable[[float], float], target: float) -> float:
    """The log2 slope s whose allocation leaves ``target`` of the budget, bisected as released
    (tools/common.py: binary_search on -ratio): stop within the tolerance, else after 40 halvings take the
    midpoint unless an end of the bracket is closer."""
    lo, hi = -SLOPE_RANGE, SLOPE_RANGE
    mid, at_mid = 0.0, math.inf
    for _ in range(SEARCH_STEPS):
        mid = 0.5 * (lo + hi)
        at_mid = ratio(mid)
        if abs(at_mid - target) <= MAC_TOLERANCE:
            return mid
        if at_mid > target:
            lo = mid
        else:
            hi = mid
    off_mid, off_lo, off_hi = abs(at_mid - target), abs(ratio(lo) - target), abs(ratio(hi) - target)
    if off_mid > off_lo and off_hi > off_lo:
        return lo
    if off_mid > off_hi and off_lo > off_hi:
        return hi
    return mid


def slope_candidates(slopes: dict[str, np.ndarray]) -> np.ndarray:
    """log2 of one λ > 0 inside each interval on which every layer's closest slope stays the same: every allocation
    derivative matching can give, whatever λ (ours: the fallback when the release's bisection misses)."""
    bounds = [(u[1:] + u[:-1]) / 2 for u in (np.unique(d) for d in slopes.values())]
    edges = np.unique(np.concatenate(bounds))
    edges = edges[edges > 0]
    if len(edges) == 0:
        return np.zeros(1)
    return np.log2(np.concatenate([[edges[0] / 2], (edges[1:] + edges[:-1]) / 2, [edges[-1] * 2]]))


# -------------------------------------------------------------------------- our first version (fisher)
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


def gradient_statistics(model: nn.Module, layers: dict[str, nn.Module], batches: list[torch.Tensor],
                        grids: dict[str, BlockGrid], progress: Progress | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per layer: mean_n |w ⊙ g_n| [out, in] and the per-sample block sums of w ⊙ g_n [samples, blocks],
    g_n = ∂ ½‖f(x_n)‖² / ∂w for each calibration batch x_n."""
    names = list(layers)
    weights = [layers[n].weight for n in names]
    abs_sum = {n: torch.zeros_like(as_matrix(layers[n].weight), dtype=torch.float32) for n in names}
    block_terms: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    task = progress.add_task("LPViT gradients", total=len(batches)) if progress else None
    with torch.enable_grad():
        for x in batches:
            out = model(x)
            objective = 0.5 * out.float().pow(2).sum() / x.shape[0]
            grads = torch.autograd.grad(objective, weights)
            for n, w, g in zip(names, weights, grads, strict=True):
                wg = as_matrix(w.detach() * g).float()
                abs_sum[n] += wg.abs()
                block_terms[n].append(grids[n].sums(wg))
            if progress is not None:
                progress.advance(task)
    return ({n: s / len(batches) for n, s in abs_sum.items()},
            {n: torch.stack(t).double() for n, t in block_terms.items()})


def fisher_curves(weight: torch.Tensor, grid: BlockGrid, abs_mean: torch.Tensor, block_terms: torch.Tensor,
                  levels: int, min_keep: float, damping: float) -> LayerCurves:
    """Cost curve of one layer (ours): first order + per-sample empirical Fisher, smoothed to its running max."""
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
    return LayerCurves(order=order, pruned=pruned, sparsity=sparsity, cost=cost,
                       removed=removed_weights(grid, order), size=grid.rows * grid.cols)


def uniform_levels(curves: dict[str, LayerCurves], fixed: float, total: float, target: float) -> dict[str, int]:
    """Every layer's level at the lowest common sparsity that brings the network to ``target`` (a layer whose
    allowed levels stop earlier stays at its last)."""
    grid = sorted({s for c in curves.values() for s in c.sparsity})
    choice: dict[str, int] = {}
    for s in grid:
        choice = {n: max(i for i, v in enumerate(c.sparsity) if v <= s + 1e-12) for n, c in curves.items()}
        if (fixed + sum(curves[n].budget[k] for n, k in choice.items())) / total <= target:
            break
    return choice


def auto_gamma(curves: dict[str, LayerCurves], fixed: float, total: float, target: float) -> float:
    """γ (ours) that weighs the latency term like the accuracy cost at the operating point: the cost uniform pruning
    to the target adds, over the most latency the layers can save (0 when no level is faster than dense)."""
    saving = sum(c.hw[0] - c.hw.min() for c in curves.values())
    if saving <= 0:
        return 0.0
    uniform = uniform_levels(curves, fixed, total, target)
    return sum(c.cost[uniform[n]] - c.cost[0] for n, c in curves.items()) / saving


@dataclass
class Allocation:
    pruned: dict[str, int]     # layer -> blocks pruned (the first of its order)
    ratio: float               # remaining budget / dense budget of the whole model
    slope: float               # the common slope (authors: log2 of λ; fisher: μ)


def choose_at(objective: dict[str, np.ndarray], budget: dict[str, np.ndarray], slope: float) -> dict[str, int]:
    """Every layer's level minimising objective + slope · budget (its curve's slope against budget equals -slope)."""
    return {n: int(np.argmin(objective[n] + slope * budget[n])) for n in objective}


def match_slopes(objective: dict[str, np.ndarray], budget: dict[str, np.ndarray], fixed: float, total: float,
                 target: float, tolerance: float = MAC_TOLERANCE) -> tuple[dict[str, int], float, float]:
    """The common slope μ (binary search) at which the network's remaining budget comes to ``target`` ± tolerance:
    (every layer's level, the budget fraction reached, μ). ``budget`` are per-layer remaining units per level
    (decreasing), ``fixed`` those no level changes. Raises ValueError when the levels cannot land within the
    tolerance."""
    scale = {n: budget[n] / total for n in budget}

    def ratio(choice: dict[str, int]) -> float:
        return (fixed + sum(budget[n][k] for n, k in choice.items())) / total

    lowest = (fixed + sum(m[-1] for m in budget.values())) / total
    if target < lowest - tolerance:
        raise ValueError(f"the lowest reachable fraction is {lowest:.3f}")
    lo, hi = -1.0, 1.0  # μ < 0 when the hardware term alone would prune below the target
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
    # the layers whose choice jumps at μ (a long edge of their hull) step back towards their choice just above
    # μ, through the levels in between, as far as the target allows: the biggest jumps first
    for n in sorted(choice, key=lambda n: budget[n][above[n]] - budget[n][choice[n]], reverse=True):
        for k in range(above[n], choice[n]):
            trial = {**choice, n: k}
            if ratio(trial) <= target:
                choice = trial
                break
    achieved = ratio(choice)
    if abs(achieved - target) > tolerance:
        raise ValueError(f"the closest the levels reach is {achieved:.3f}")
    return choice, achieved, hi


# --------------------------------------------------------------------------------------- simulated term
def layer_latencies(layer: nn.Module, grid: BlockGrid, curves: LayerCurves, input_shape: tuple[int, ...],
                    batch: int, profile: HardwareConfig) -> np.ndarray:
    """Simulated ms of ``layer`` alone on ``profile`` with its remaining blocks, per level (ours; the simulator
    picks dense or the profile's best sparse format for each mask)."""
    if isinstance(layer, nn.Linear):
        probe: nn.Module = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    else:
        probe = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, layer.groups, bias=layer.bias is not None)
    trace = trace_model(probe, (batch, *input_shape))
    simulator = Simulator(profile)
    out = []
    for p in curves.pruned:
        keep = torch.ones(grid.count, dtype=torch.bool)
        keep[curves.order[:p]] = False
        mask = grid.mask(keep).reshape(layer.weight.shape)
        info = {"kind": "mask", "pattern": "block", "density": mask.float().mean().item(),
                "shape": list(mask.shape), "formats": mask_formats(mask)}
        out.append(simulator.run(trace, {"": info}).total_ms)
    return np.array(out)


# ------------------------------------------------------------------------------------------- budgets
@dataclass
class Budget:
    """The budget's cost of one kept weight per pruned layer, what no level changes, and the dense total."""
    unit: dict[str, float]
    fixed: float
    total: float

    def ratio(self, kept: dict[str, float]) -> float:
        return (self.fixed + sum(kept[n] * self.unit[n] for n in kept)) / self.total


def layer_shapes(model: nn.Module, sample: torch.Tensor) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per-sample input and output shapes of every Linear/Conv2d the model runs on ``sample`` (batch 1)."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, (tuple(i[0].shape[1:]),
                                                                                      tuple(o.shape[1:]))))
               for n, m in model.named_modules() if isinstance(m, PRUNED_TYPES)]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def flops_budget(model: nn.Module, pruned: list[str], shapes: dict[str, tuple]) -> Budget:
    """The release's FLOPs (get_model_flops) over every Linear/Conv2d the model runs: kept weights × (a conv's
    output height·width, a linear layer's first per-sample output dimension) + the output size of a biased layer."""
    modules = dict(model.named_modules())
    unit, fixed, total = {}, 0.0, 0.0
    for name, (_, out) in shapes.items():
        module = modules[name]
        per_weight = float(math.prod(out[-2:]) if isinstance(module, nn.Conv2d) else out[0])
        bias = float(math.prod(out)) if module.bias is not None else 0.0
        dense = module.weight.numel() * per_weight
        total += dense + bias
        fixed += bias + (0.0 if name in pruned else dense)
        if name in pruned:
            unit[name] = per_weight
    return Budget(unit, fixed, total)


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

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        if self.config.layers is None:
            return {n: m for n, m in model.named_modules() if isinstance(m, PRUNED_TYPES)}
        names = set(self.config.layers)
        return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in names}

    def sample(self, model: nn.Module) -> torch.Tensor:
        return torch.zeros((1, *self.input_shape), device=next(model.parameters()).device)

    def budgets(self, model: nn.Module) -> tuple[Budget, Budget, dict[str, tuple], dict[str, nn.Module]]:
        """The release's FLOPs and the model's MACs as budgets of the pruned layers, every layer's per-sample
        shapes, and the pruned layers: those of ``layers`` the forward pass runs (as the release's hooks filter)."""
        was_training = model.training
        try:
            model.eval()
            shapes = layer_shapes(model, self.sample(model))
            pruned = {n: m for n, m in self.layers(model).items() if n in shapes}
            layers = list(pruned)
            tokens = macs_per_weight(model, layers, self.sample(model))
            total = float(count_macs(model, (1, *self.input_shape)).dense)
        finally:
            model.train(was_training)
        modules = dict(model.named_modules())
        fixed = total - sum(tokens[n] * modules[n].weight.numel() for n in layers)
        return flops_budget(model, layers, shapes), Budget(tokens, fixed, total), shapes, pruned

    def cap(self) -> float:
        """The largest pruned fraction a layer takes (``authors``): 1 - min(min_keep, (1 - target) / 2)."""
        return 1.0 - min(self.min_keep, (1.0 - self.macs_target) / 2)

    def fewest_blocks(self, count: int) -> int:
        if self.curves == "fisher":
            return math.ceil(self.min_keep * count - 1e-9)
        return kept_blocks(min(self.cap(), (self.levels - 2) / (self.levels - 1)), count)

    def check_applicable(self, model: nn.Module) -> None:
        layers = self.layers(model)
        transformer = any(isinstance(m, nn.Linear) and n.rpartition(".")[2] == "qkv" for n, m in model.named_modules())
        if not layers or (self.config.layers is None and not transformer):
            what = ("no attention layer (an nn.Linear named qkv)" if layers else
                    f"no nn.Linear layer named {'/'.join(self.config.layers or [])}")
            raise NotApplicable(f"lpvit prunes the linear and conv layers of a vision transformer and finds {what} in "
                                "this model (method.layers); choose a ViT model (vit_fmnist, deit_*) or set "
                                "method.layers to the names of the model's linear layers")
        flops, macs, _, layers = self.budgets(model)
        budget = flops if self.config.budget == "flops" else macs
        lowest = budget.fixed
        for name, layer in layers.items():
            grid = BlockGrid(as_matrix(layer.weight).shape, *self.block)
            keep = self.fewest_blocks(grid.count)
            lowest += budget.unit[name] * float(torch.sort(grid.sizes).values[:keep].sum())
        if self.macs_target < lowest / budget.total - MAC_TOLERANCE:
            raise NotApplicable(f"method.macs_target={self.macs_target} cannot be reached: with every pruned layer at "
                                f"its fewest blocks the model keeps {lowest / budget.total:.3f} of its "
                                f"{self.config.budget} (the reachable range is [{lowest / budget.total:.3f}, 1)); "
                                "raise method.macs_target, lower method.min_keep or add layers to method.layers")

    def check_data(self, train_size: int) -> None:
        if self.calib_size > train_size:
            raise NotApplicable(f"method.calib_size={self.calib_size} is larger than the train split ({train_size} "
                                f"images); set method.calib_size <= {train_size}")

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        return [MaskEnforcer(self.mask_grads)] if stage == "finetune" else []

    # ---------------------------------------------------------------------------------------- compress
    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        model.eval()
        device = next(model.parameters()).device
        flops, macs, shapes, layers = self.budgets(model)
        grids = {n: BlockGrid(as_matrix(m.weight).shape, *self.block) for n, m in layers.items()}
        batches = calibration_batches(datamodule, "train", self.calib_size, self.calib_batch,
                                      tuple(self.input_shape), self.seed + 7919, device)
        budget = flops if self.config.budget == "flops" else macs
        with Progress(transient=True) as progress:
            if self.curves == "authors":
                grads = mean_gradients(model, layers, batches, progress)
                curves = {n: authors_curves(as_matrix(layers[n].weight).cpu(), as_matrix(grads[n]).cpu(), grids[n],
                                            self.levels, self.damping, self.smooth) for n in layers}
            else:
                abs_mean, block_terms = gradient_statistics(model, layers, batches, grids, progress)
                curves = {n: fisher_curves(as_matrix(layers[n].weight).cpu(), grids[n], abs_mean[n].cpu(),
                                           block_terms[n].cpu(), self.levels, self.min_keep, self.damping)
                          for n in layers}
        for n, c in curves.items():
            c.budget = c.kept * budget.unit[n]
            c.hw = self.hardware_curve(layers[n], grids[n], c, shapes[n][0])
        weight = self.term_weight(curves, budget)
        objective = {n: c.cost + weight * c.hw for n, c in curves.items()}
        fix = "raise method.levels, use smaller method.block, or change method.macs_target"
        if self.curves == "authors":
            allocation = self.derivative_allocation(curves, objective, budget)
        else:
            try:
                levels, reached, slope = match_slopes(objective, {n: c.budget for n, c in curves.items()},
                                                      budget.fixed, budget.total, self.macs_target)
                allocation = Allocation({n: curves[n].pruned[k] for n, k in levels.items()}, reached, slope)
            except ValueError as exc:
                raise UserError(f"method.macs_target={self.macs_target} cannot be met within ±{MAC_TOLERANCE}: "
                                f"{exc}", fix) from exc
        if abs(allocation.ratio - self.macs_target) > MAC_TOLERANCE:
            raise UserError(f"method.macs_target={self.macs_target} cannot be met within ±{MAC_TOLERANCE}: the "
                            f"slope search ends at {allocation.ratio:.3f} of the {self.config.budget}", fix)
        with torch.no_grad():
            for n, p in allocation.pruned.items():
                keep = torch.ones(grids[n].count, dtype=torch.bool)
                keep[curves[n].order[:p]] = False
                layer = layers[n]
                attach_mask(layer, grids[n].mask(keep).reshape(layer.weight.shape).to(layer.weight.device))
        kept = {n: curves[n].kept_at(p) for n, p in allocation.pruned.items()}
        self.report = {
            "flops_ratio": flops.ratio(kept), "macs_ratio": macs.ratio(kept), "slope": allocation.slope,
            "term_weight": weight,
            "hardware_profile": self.profile().name if self.hardware_term == "simulated" else None,
            "hardware_term_flat": bool(all(np.ptp(c.hw) == 0 for c in curves.values())),
            "layer_sparsity": {n: p / grids[n].count for n, p in allocation.pruned.items()},
            "calib_batches": len(batches),
        }
        return model

    def hardware_curve(self, layer: nn.Module, grid: BlockGrid, curves: LayerCurves,
                       input_shape: tuple[int, ...]) -> np.ndarray:
        if self.hardware_term == "power":
            inputs = input_shape[-1] if isinstance(layer, nn.Linear) else input_shape[1]  # as released: conv -> height
            return power_curve(curves.sparsity, layer.weight.numel(), self.block, inputs)
        if self.hardware_term == "simulated" and self.hardware_weight > 0:
            if isinstance(layer, nn.Linear):  # (tokens, in_features), as the first version
                input_shape = (round(math.prod(input_shape[:-1])), input_shape[-1])
            return layer_latencies(layer, grid, curves, input_shape, self.hw_batch, self.profile())
        return np.zeros(len(curves.pruned))

    def term_weight(self, curves: dict[str, LayerCurves], budget: Budget) -> float:
        if self.hardware_term == "power":
            return power_weight(curves) * self.hardware_weight
        if self.hardware_term == "simulated":
            return auto_gamma(curves, budget.fixed, budget.total, self.macs_target) * self.hardware_weight
        return 0.0

    def derivative_allocation(self, curves: dict[str, LayerCurves], objective: dict[str, np.ndarray],
                              budget: Budget) -> Allocation:
        """Each layer at the level whose slope of its objective is closest to 2^s, its pruned fraction capped
        (pareto_condition), s searched for the target (find_slope)."""
        slopes = {n: derivative_approx(np.asarray(c.sparsity), objective[n], self.h) for n, c in curves.items()}
        cap = self.cap()

        def choose(s: float) -> dict[str, int]:
            amounts = {n: min(cap, c.sparsity[int(np.argmin(np.abs(slopes[n] - 2.0**s)))]) for n, c in curves.items()}
            return {n: len(c.order) - kept_blocks(amounts[n], len(c.order)) for n, c in curves.items()}

        def ratio(s: float) -> float:
            return budget.ratio({n: curves[n].kept_at(p) for n, p in choose(s).items()})

        s = release_search(ratio, self.macs_target)
        if abs(ratio(s) - self.macs_target) > MAC_TOLERANCE:  # not monotone in s: every allocation instead (ours)
            s = min(slope_candidates(slopes), key=lambda t: abs(ratio(t) - self.macs_target))
        return Allocation(choose(s), ratio(s), s)

    def summary(self) -> dict[str, Any]:
        return {"macs_target": self.macs_target, "budget": self.config.budget, "block": list(self.block),
                "pattern": self.pattern(), "curves": self.curves, "hardware_term": self.hardware_term,
                "levels": self.levels, "calib_size": self.calib_size, **self.report}
