"""Layer-adaptive magnitude pruning by output rate-distortion and dynamic programming (Xu, Wang, Geng, Lin, Wu,
Li, Lin; "Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks", ICCV 2023),
with the second-order distortion of its detection variant (Xu et al., "DM3D: Distortion-Minimized Weight
Pruning for Lossless 3D Object Detection", 2024).

Reference code: Akimoto-Cris/RD_PRUNE — iterate.py (the prune/retrain loop); tools/pruners.py: ``RDPruner``,
``gen_rd_curves``; tools/algo.py: ``dp_pruning``; tools/modelloaders.py: ``model_and_opt_loader`` (the recipes);
tools/dataloaders.py: ``get_calib_imagenet_dali_loader``; README.md (the results tables). Deviations from it,
with reasons: docs/fidelity.md (section rd).

Algorithm: the per-layer sparsities are chosen to minimise the distortion of the network's output under a
global budget. A calibration set (``calib_size`` images of the train split, or Gaussian-noise images for the
zero-data variant) is run through the trained network once for the reference output. For every prunable
layer alone, the layer is magnitude-pruned (with the run's ``pattern``) at ``levels`` sparsities 0, 1/(L-1),
..., 1, and its distortion D_n(k) is measured: the worst case over the calibration samples of the mean
squared error of the output against the reference. Pruning several layers distorts the output by about the
sum of their single-layer distortions (additivity, reported per run as the ratio measured / predicted), so
the allocation is the knapsack min Σ_n D_n(k_n) subject to Σ_n kept_n(k_n) = budget, solved by dynamic
programming over the surviving budget in buckets: F_n(b) = min_k [D_n(k) + F_{n-1}(b - kept_n(k))], then a
backtrack gives every layer's level. The layers are pruned at their levels and the network is fine-tuned
with the masks fixed. The iterative schedule prunes 20% of the remaining budget per round with a fine-tune
between rounds (curves re-measured on the fine-tuned network), a layer's sparsity never decreasing.

The DP (:func:`allocate_levels`): a state is the bucket floor(C / u) of the surviving budget C used so far,
u = budget / ``buckets``; every state keeps the exact C of its best path, so the final choice satisfies
budget - u <= Σ kept <= budget exactly (never over the budget, at most one bucket under; when no choice of
levels lands in that band, the choice keeping the most that fits), and when every kept_n(k) is a multiple of
u the DP is exact (it equals brute force). Ties go to the path keeping more.

Config keys (conf/method/rd.yaml):
* ``sparsity`` (0.9): fraction of the budget quantity of the prunable layers removed.
* ``budget`` (weights): ``weights`` (surviving weights) or ``macs`` (surviving multiply-accumulates: a kept
  weight of a conv costs one MAC per output position, of a linear layer one per token).
* ``pattern`` (irregular): the mask projection each level uses (block, gather_scatter, filter, channel...);
  N:M is refused (it fixes every layer's density, there is nothing to allocate).
* ``exclude`` ([]): layers kept dense; the paper prunes every conv and linear layer and lets the DP decide.
* ``mask_grads`` (true): as for ``magnitude``.
* ``calib_size`` (1024, the paper's CIFAR value; 256 on ImageNet), ``calib_source`` (train | noise: N(0, 1)
  images in the normalised input space, the zero-data variant), ``calib_batch_size`` (256).
* ``levels`` (101): sparsity levels per curve, 0% to 100%.
* ``distortion`` (worst_mse): ``worst_mse`` (measured, the paper's) or ``taylor``: the second-order Taylor
  expansion of the output MSE, D(δ) ≈ δᵀ(JᵀJ)δ / (N·dim) with the Gauss-Newton Hessian of the calibration
  set, estimated from ``taylor_probes`` (32) random-projection gradients g = Jᵀv, v ~ N(0, I), so a curve
  costs one backward pass per probe instead of one forward pass per level (DM3D's distortion; the Hessian
  estimator is our choice).
* ``output`` (null): the module whose output is distorted (null = the network's output, the logits); any
  module name, e.g. a detection head.
* ``buckets`` (10000): DP resolution over the budget.
* ``iterative`` (false), ``round_fraction`` (0.2): the iterative schedule; rounds = ceil(log(1 - sparsity) /
  log(1 - round_fraction)), the finetune stage split into that many equal cycles (fresh optimizer and LR
  schedule each, as separate retraining jobs), the last round clamped to ``sparsity``; rounds the stage has no
  optimizer steps for are pruned at its end without retraining (warned; ``rounds_without_finetune``).
* ``workers`` (1): threads measuring curves of different layers at once (each on its own copy of the model).

Deviations from the paper: per-level masks come from our pattern projections (the paper: irregular
magnitude); the calibration set is drawn with the run's seed from the train split without augmentation.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from compress_run.core.config import check
from compress_run.core.errors import UserError
from compress_run.core.masks import (
    MaskEnforcer,
    attach_mask,
    get_mask,
    magnitude_scores,
    prunable_layers,
)
from compress_run.core.projections import fixed_density, parse_pattern, project
from compress_run.methods.base import Method, MethodConfig, NotApplicable, check_mask_layers, method_config
from compress_run.methods.calibration import calibration_batches, macs_per_weight
from compress_run.methods.cycles import CycleCallback, geometric_rounds

BUDGETS = ("weights", "macs")
DISTORTIONS = ("worst_mse", "taylor")
CALIB_SOURCES = ("train", "noise")


@method_config("rd")
@dataclass
class RDConfig(MethodConfig):
    sparsity: float = 0.9
    budget: str = "weights"
    pattern: str = "irregular"
    exclude: list[str] = field(default_factory=list)
    mask_grads: bool = True
    calib_size: int = 1024
    calib_source: str = "train"
    calib_batch_size: int = 256
    levels: int = 101
    distortion: str = "worst_mse"
    taylor_probes: int = 32
    output: str | None = None
    buckets: int = 10000
    iterative: bool = False
    round_fraction: float = 0.2
    workers: int = 1

    def __post_init__(self) -> None:
        check(0.0 < self.sparsity < 1.0, "method.sparsity", self.sparsity, "a float in (0, 1)")
        check(self.budget in BUDGETS, "method.budget", self.budget, " | ".join(BUDGETS))
        try:
            parse_pattern(self.pattern)
        except ValueError as exc:
            check(False, "method.pattern", self.pattern, str(exc))
        check(fixed_density(self.pattern) is None, "method.pattern", self.pattern,
              "a pattern whose density can vary per layer (irregular, block:R:C, gather_scatter:B, filter, "
              "channel): N:M fixes every layer at N/M, which leaves no per-layer sparsity to allocate")
        check(self.calib_size >= 1, "method.calib_size", self.calib_size, "an integer >= 1")
        check(self.calib_source in CALIB_SOURCES, "method.calib_source", self.calib_source, " | ".join(CALIB_SOURCES))
        check(self.calib_batch_size >= 1, "method.calib_batch_size", self.calib_batch_size, "an integer >= 1")
        check(self.levels >= 2, "method.levels", self.levels, "an integer >= 2 (0% and 100% at least)")
        check(self.distortion in DISTORTIONS, "method.distortion", self.distortion, " | ".join(DISTORTIONS))
        check(self.taylor_probes >= 1, "method.taylor_probes", self.taylor_probes, "an integer >= 1")
        check(self.buckets >= 1, "method.buckets", self.buckets, "an integer >= 1")
        check(0.0 < self.round_fraction < 1.0, "method.round_fraction", self.round_fraction, "a float in (0, 1)")
        check(self.workers >= 1, "method.workers", self.workers, "an integer >= 1")


# ----------------------------------------------------------------------------------------- the DP
@dataclass
class Allocation:
    levels: list[int]        # chosen level per layer
    distortion: float        # Σ D_n(level_n)
    kept: float              # Σ kept_n(level_n)
    unit: float              # one bucket of the budget


def allocate_levels(distortion: np.ndarray, kept: np.ndarray, budget: float, buckets: int,
                    min_level: Sequence[int] | None = None) -> Allocation:
    """min Σ_n distortion[n, k_n] subject to budget - u <= Σ_n kept[n, k_n] <= budget (u = budget / buckets),
    k_n >= min_level[n]; ``distortion`` and ``kept`` are [layers, levels]. Raises ValueError when no choice of
    levels fits the budget."""
    n_layers, n_levels = distortion.shape
    unit = budget / buckets
    tol = 1e-9 * max(1.0, budget)
    size = buckets + 1
    best = np.full(size, np.inf)
    used = np.full(size, -np.inf)
    best[0], used[0] = 0.0, 0.0
    back_state = np.zeros((n_layers, size), dtype=np.int64)
    back_level = np.zeros((n_layers, size), dtype=np.int64)
    for n in range(n_layers):
        lo = int(min_level[n]) if min_level is not None else 0
        states = np.flatnonzero(np.isfinite(best))
        levels = np.arange(lo, n_levels)
        c = used[states][:, None] + kept[n, levels][None, :]
        f = best[states][:, None] + distortion[n, levels][None, :]
        ok = c <= budget + tol
        if not ok.any():
            raise ValueError(f"layer {n}: no level >= {lo} keeps the network within the budget {budget:g}")
        src, lev = np.nonzero(ok)
        c, f = c[ok], f[ok]
        b = np.minimum(np.floor(c / unit + 1e-9).astype(np.int64), buckets)
        order = np.lexsort((-c, f, b))  # by bucket, then distortion, then the most kept
        b_sorted = b[order]
        first = order[np.r_[True, b_sorted[1:] != b_sorted[:-1]]]
        best, used = np.full(size, np.inf), np.full(size, -np.inf)
        best[b[first]], used[b[first]] = f[first], c[first]
        back_state[n, b[first]] = states[src[first]]
        back_level[n, b[first]] = levels[lev[first]]
    final = np.flatnonzero(np.isfinite(best) & (used >= budget - unit - tol))
    if final.size == 0:
        final = np.flatnonzero(np.isfinite(best))[-1:]  # the budget cannot be filled: keep as much as fits
    state = int(final[np.lexsort((-used[final], best[final]))[0]])
    distortion_total, kept_total = float(best[state]), float(used[state])
    chosen = [0] * n_layers
    for n in range(n_layers - 1, -1, -1):
        chosen[n] = int(back_level[n, state])
        state = int(back_state[n, state])
    return Allocation(chosen, distortion_total, kept_total, unit)


# ------------------------------------------------------------------------------- distortion curves
def output_of(model: nn.Module, x: torch.Tensor, output: str | None) -> torch.Tensor:
    """The distorted output for a batch: the model's output, or that of module ``output``; [B, dim] float."""
    if output is None:
        return model(x).flatten(1).float()
    captured: list[torch.Tensor] = []
    handle = dict(model.named_modules())[output].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        model(x)
    finally:
        handle.remove()
    out = captured[0]
    return (out[0] if isinstance(out, tuple) else out).flatten(1).float()


class WorstCaseMSE:
    """max over calibration samples of the output's mean squared error against the reference network."""

    def __init__(self, model: nn.Module, batches: list[torch.Tensor], output: str | None) -> None:
        self.batches, self.output = batches, output
        with torch.no_grad():
            self.reference = [output_of(model, x, output) for x in batches]

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:
        worst = 0.0
        for x, ref in zip(self.batches, self.reference, strict=True):
            worst = max(worst, float((output_of(model, x, self.output) - ref).pow(2).mean(1).max()))
        return worst

    @torch.no_grad()
    def mean(self, model: nn.Module) -> float:
        """The mean (not worst-case) MSE over the calibration set, the quantity the Taylor option expands."""
        total = sum(float((output_of(model, x, self.output) - ref).pow(2).sum())
                    for x, ref in zip(self.batches, self.reference, strict=True))
        return total / sum(r.numel() for r in self.reference)


def level_masks(module: nn.Module, pattern: str, levels: int) -> list[torch.Tensor]:
    """The layer's keep-masks at sparsities k / (levels - 1): magnitude (already-masked weights score 0)."""
    score = magnitude_scores({"w": module})["w"]
    return [project(pattern, score, 1.0 - k / (levels - 1)) for k in range(levels)]


def measured_curves(model: nn.Module, names: list[str], distortion: WorstCaseMSE, pattern: str, levels: int,
                    workers: int, advance: Callable[[], None]) -> dict[str, list[float]]:
    """D_n(k) for every layer in ``names``, each layer pruned alone; ``workers`` threads on model copies."""
    def run(part: list[str]) -> dict[str, list[float]]:
        net = model if workers == 1 else copy.deepcopy(model)
        modules = dict(net.named_modules())
        curves = {}
        for name in part:
            weight = modules[name].weight
            original = weight.detach().clone()
            curve = []
            with torch.no_grad():
                for mask in level_masks(modules[name], pattern, levels):
                    weight.copy_(original * mask)
                    curve.append(distortion(net))
                    advance()
                weight.copy_(original)
            curves[name] = curve
        return curves

    parts = [names[i::workers] for i in range(workers)]
    if workers == 1:
        return run(names)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(run, parts))
    return {name: curve for result in results for name, curve in result.items()}


def taylor_curves(model: nn.Module, names: list[str], batches: list[torch.Tensor], output: str | None,
                  pattern: str, levels: int, probes: int, seed: int) -> dict[str, list[float]]:
    """Second-order Taylor distortion δᵀ(JᵀJ)δ / (N·dim) per layer and level, δ = the pruned weights' change;
    JᵀJ is estimated with random projections: E[(vᵀJδ)²] = |Jδ|² for v ~ N(0, I), one v per sample."""
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in names]
    grads = {n: [] for n in names}
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for _ in range(probes):
        for w in weights:
            w.grad = None
        count = 0
        for x in batches:
            out = output_of(model, x, output)
            v = torch.randn(out.shape, generator=generator).to(out.device)
            torch.autograd.backward((out * v).sum(), inputs=weights)
            count += out.numel()
        for n, w in zip(names, weights, strict=True):
            grads[n].append(w.grad.detach().flatten().clone())
    for w in weights:
        w.grad = None
    curves = {}
    with torch.no_grad():
        for n, w in zip(names, weights, strict=True):
            g = torch.stack(grads[n]).double()                      # [probes, numel]
            masks = level_masks(modules[n], pattern, levels)
            deltas = torch.stack([(w.detach() * ~m).flatten() for m in masks]).double()  # [levels, numel]
            curves[n] = ((deltas @ g.T) ** 2).mean(1).div(count).tolist()
    return curves


# ------------------------------------------------------------------------------------- the method
class RD(Method):
    plain_train = True  # its train stage is ordinary training (see Method.trains_plainly)
    Config = RDConfig
    tasks = ("classification", "causal_lm")  # a causal LM: its block linear layers, distortion on the logits
    state_attributes = ("chosen", "round", "report")

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        self.chosen: dict[str, int] = {}    # layer -> level (sparsity level / (levels - 1))
        self.round = 0
        self.report: dict[str, Any] = {}
        self.seed = torch.initial_seed()    # the pipeline has seeded torch from cfg.seed before building us

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return prunable_layers(model, self.exclude)

    def check_applicable(self, model: nn.Module) -> None:
        check_mask_layers(model, self.exclude, self.pattern, None)  # densities vary per layer
        if self.output is not None and self.output not in dict(model.named_modules()):
            raise NotApplicable(f"method.output={self.output!r} is not a module of the model; give a module name "
                                "(e.g. from `print(model)`) or null for the network's output")

    def check_data(self, train_size: int) -> None:
        if self.calib_source == "train" and self.calib_size > train_size:
            raise NotApplicable(f"method.calib_size={self.calib_size} is larger than the train split ({train_size} "
                                f"images); set method.calib_size <= {train_size} (or method.calib_source=noise)")

    # ---- schedule
    def rounds(self) -> int:
        return geometric_rounds(self.sparsity, self.round_fraction) if self.iterative else 1

    def round_sparsity(self, r: int) -> float:
        """Target after round r (1-based): 1 - (1 - f)^r, the last clamped to ``sparsity``."""
        return self.sparsity if r >= self.rounds() else 1.0 - (1.0 - self.round_fraction) ** r

    def lr_cycles(self, stage: str) -> int:
        return self.rounds() if stage == "finetune" else 1

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        if stage != "finetune":
            return []
        callbacks: list[L.Callback] = [MaskEnforcer(self.mask_grads)]
        if self.rounds() > 1:
            callbacks.append(RDRounds(self))
        return callbacks

    def next_round(self, k: int, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if k + 1 <= self.round:  # already pruned for this round (resumed after the boundary)
            return
        was_training = pl_module.net.training
        self.prune_round(pl_module.net, trainer.datamodule, k + 1)
        pl_module.net.train(was_training)

    # ---- one round
    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        self.prune_round(model, datamodule, 1)
        return model

    def prune_round(self, model: nn.Module, datamodule: L.LightningDataModule | None, r: int) -> None:
        model.eval()
        layers = self.layers(model)
        names = list(layers)
        device = next(model.parameters()).device
        batches = calibration_batches(datamodule, self.calib_source, self.calib_size, self.calib_batch_size,
                                      tuple(self.input_shape), self.seed + 7919 * r, device)
        worst = WorstCaseMSE(model, batches, self.output)
        if self.distortion == "taylor":
            curves = taylor_curves(model, names, batches, self.output, self.pattern, self.levels,
                                   self.taylor_probes, self.seed + r)
        else:
            with Progress(transient=True) as progress:
                task = progress.add_task(f"RD curves, round {r}", total=len(names) * self.levels)
                curves = measured_curves(model, names, worst, self.pattern, self.levels, self.workers,
                                         lambda: progress.advance(task))
        masks = {n: level_masks(layers[n], self.pattern, self.levels) for n in names}
        per_unit = (macs_per_weight(model, names, batches[0]) if self.budget == "macs"
                    else dict.fromkeys(names, 1.0))
        kept = np.array([[float(m.sum()) * per_unit[n] for m in masks[n]] for n in names])
        distortion = np.array([curves[n] for n in names])
        total = float(sum(layers[n].weight.numel() * per_unit[n] for n in names))
        budget = (1.0 - self.round_sparsity(r)) * total
        min_level = [self.chosen.get(n, 0) for n in names]
        try:
            allocation = allocate_levels(distortion, kept, budget, self.buckets, min_level)
        except ValueError as exc:
            raise UserError(f"method.sparsity={self.sparsity} cannot be met in round {r}: {exc}",
                            "raise method.sparsity or method.levels") from exc
        with torch.no_grad():
            for n, level in zip(names, allocation.levels, strict=True):
                mask = masks[n][level]
                attach_mask(layers[n], mask)
                layers[n].weight.mul_(mask)
        self.chosen = dict(zip(names, allocation.levels, strict=True))
        self.round = r
        joint = worst(model)
        self.report = {
            "round": r, "budget_target": budget, "budget_kept": allocation.kept, "budget_total": total,
            "bucket": allocation.unit, "predicted_distortion": allocation.distortion,
            "measured_distortion": joint,
            "additivity_ratio": joint / allocation.distortion if allocation.distortion > 0 else None,
            "layer_sparsity": {n: 1.0 - float(get_mask(layers[n]).float().mean()) for n in names},
        }

    def finish_rounds(self, model: nn.Module, datamodule: L.LightningDataModule) -> None:
        """Rounds the finetune stage had no steps left for: pruned one after another without retraining, so the
        run still ends at its target (``rounds_without_finetune`` in the summary says how many)."""
        missing = self.rounds() - self.round
        if missing <= 0:
            return
        warnings.warn(f"rd: the finetune stage was too short for {self.rounds()} rounds; the last {missing} are "
                      "pruned without retraining between them (give schedule.finetune more steps)", stacklevel=1)
        for r in range(self.round + 1, self.rounds() + 1):
            self.prune_round(model, datamodule, r)
        self.report["rounds_without_finetune"] = missing

    def summary(self) -> dict[str, Any]:
        return {"target_sparsity": self.sparsity, "budget": self.budget, "pattern": self.pattern,
                "distortion": self.distortion, "calib_size": self.calib_size, "calib_source": self.calib_source,
                "levels": self.levels, "rounds": self.rounds(), **self.report}


class RDRounds(CycleCallback):
    """The iterative schedule: the finetune stage's cycles are the retraining rounds; the next round's pruning
    happens at each cycle boundary, and at the end any round the stage had no steps for."""

    def __init__(self, method: RD) -> None:
        super().__init__(method.rounds(), reset_optimizer=True, name="rd", on_boundary=method.next_round)
        self.method = method

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_training = pl_module.net.training
        self.method.finish_rounds(pl_module.net, trainer.datamodule)
        pl_module.net.train(was_training)

    def state_dict(self) -> dict[str, Any]:  # mid-stage checkpoints carry the rounds done (resume)
        return {**super().state_dict(), **self.method.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.method.load_state_dict(state_dict)
