"""HALOC — hardware-aware automatic low-rank compression (Xiao, Zhang, Gong, Yin, Sui, Xiang, Tao, Yuan, "HALOC:
Hardware-Aware Automatic Low-Rank Compression for Compact Neural Networks", AAAI 2023, arXiv 2301.09422).

Reference code: no HALOC release was found; compared with the same authors' rank search in jinqixiao/ComCAT —
VisionTransformer/engine.py: ``search_rank`` (loss CE·(size/target)^β above the target, β 1.5);
VisionTransformer/main.py (τ 5 annealed per epoch; the rank logits' AdamW, lr 1e-2, wd 5e-4; one search pass
per epoch on its own loader); VisionTransformer/SVDLinear4AutoRank.py: ``SVDLinear4AutoRank.forward``
(Gumbel-softmax over the rank logits). Deviations from it, with reasons: docs/fidelity.md (section haloc).

Algorithm: rank selection as a differentiable architecture search with the target hardware's latency
in the loss. From the trained dense network, every searched conv l gets candidate Tucker-2 branches at
ranks r ∈ {c, 2c, …} ≤ min(C_in, C_out) (equal ranks for both modes, c the hardware's rank granularity),
each initialised by HOSVD, and architecture logits α_l. The search alternates batches: a *weight* step
mixes the branches with Gumbel-softmax(α_l, τ) and minimises CE + feature_weight·(interference term:
every branch's output pulled towards the dense layer's output on the same input); an *architecture* step
updates α only, on loss CE·(Lat/Lat_target)^β when the expected latency Lat = Σ_l Σ_r softmax(α_l)_r ·
LUT_l(r) is above the target, CE otherwise. τ anneals exponentially from ``tau_start`` to ``tau_end``.
Then each layer keeps its argmax branch (with the weights the search trained), and finetune trains the
Tucker-2 network. LUT_l(r) comes from our latency simulator for the hardware profile (``simulated``),
from timing the branch on this host (``measured``), or is the branch's MACs (``macs``, for equal-MAC
comparisons).

Our choices (documented here, configurable):
* Searched layers: groups=1 convs with a kernel larger than 1×1 outside ``exclude`` (Tucker-2 of a 1×1
  conv is a chain of 1×1 convs, which two-factor SVD does better). Candidate ranks whose Tucker-2 form
  has no fewer MACs than the conv are dropped, and so are ranks whose branch is not cheaper than the
  dense conv in the LUT (small layers are overhead-bound: three kernels can cost more than one, and a
  hardware-aware search must never pick a slower layer). A layer left without candidates (e.g. 16
  channels at c = 16, or no rank faster on the target) stays dense and is listed under ``left_dense``
  with the reason.
* Latency target: ``latency_fraction`` × Σ_l LUT_l(dense layer) over the layers with candidates; LUTs are
  per layer in isolation at batch ``lut_batch`` (layers outside the search cost the same for every choice
  and are left out). A target below Σ_l min_r LUT_l(r) cannot be reached: the run is refused before
  training (exit 2) with the reachable range, instead of a search that ends above its target.
* The interference term is the mean over branches of ‖y_r − y_dense‖² / ‖y_dense‖² (scale-free).
* Weight and architecture steps alternate on consecutive training batches (no held-out split); the
  batches are normalised like training batches but not augmented. ComCAT runs a separate search pass per
  epoch instead, and anneals τ per epoch where we anneal it per step over the whole search.
* The LUT comes from our latency simulator by default; the paper measures or estimates latency per platform.
* Optimisers: SGD (momentum 0.9, weight decay 5e-4) at ``weight_lr`` for the weights; AdamW at
  ``arch_lr`` 1e-2, weight decay 5e-4, for the logits, and β = 1.5 (ComCAT's search settings, same authors:
  VisionTransformer/main.py and engine.py). ``search_epochs`` 2 is ours (no reason recorded).

Config keys (conf/method/haloc.yaml):
* ``latency_fraction`` (0.3): target expected latency of the searched layers / their dense latency.
* ``latency_source`` (simulated): simulated | measured | macs.
* ``hardware`` (null): profile whose LUT is used; null = the run's ``hardware``.
* ``granularity`` (null): rank step c; null = the profile's ``rank_granularity``.
* ``search_epochs`` (2.0): passes over the training data (fractions allowed); ``lut_batch`` (1).
* ``tau_start`` (5.0), ``tau_end`` (0.1); ``latency_exponent`` (1.5): β; ``feature_weight`` (1.0).
* ``weight_lr`` (0.01), ``arch_lr`` (0.01); ``exclude`` ([first_conv, classifier]).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from compress_run.core.config import check
from compress_run.core.errors import UserError
from compress_run.core.factorized import Tucker2Conv2d, set_module, tucker2_fraction
from compress_run.core.masks import prunable_layers
from compress_run.hardware.layer_cost import SOURCES, layer_cost, layer_input_shapes
from compress_run.hardware.profile import HardwareConfig, load_profile
from compress_run.methods.base import Method, MethodConfig, NotApplicable, method_config
from compress_run.methods.rank_search import annealed_tau, budget_loss


def candidate_ranks(layer: nn.Conv2d, granularity: int) -> list[int]:
    """Multiples of ``granularity`` up to min(C_in, C_out) at which Tucker-2 has fewer MACs than the conv."""
    top = min(layer.in_channels, layer.out_channels)
    return [r for r in range(granularity, top + 1, granularity)
            if tucker2_fraction(layer.in_channels, layer.out_channels, tuple(layer.kernel_size), r, r,
                                tuple(layer.stride)) < 1.0]


@method_config("haloc")
@dataclass
class HALOCConfig(MethodConfig):
    latency_fraction: float = 0.3
    latency_source: str = "simulated"
    hardware: str | None = None
    granularity: int | None = None
    search_epochs: float = 2.0
    lut_batch: int = 1
    tau_start: float = 5.0
    tau_end: float = 0.1
    latency_exponent: float = 1.5
    feature_weight: float = 1.0
    weight_lr: float = 0.01
    arch_lr: float = 0.01
    exclude: list[str] = field(default_factory=lambda: ["first_conv", "classifier"])

    def __post_init__(self) -> None:
        from compress_run.hardware.profile import available_profiles

        check(0.0 < self.latency_fraction < 1.0, "method.latency_fraction", self.latency_fraction,
              "a float in (0, 1) (target latency of the searched layers / their dense latency)")
        check(self.latency_source in SOURCES, "method.latency_source", self.latency_source, ", ".join(SOURCES))
        check(self.hardware is None or self.hardware in available_profiles(), "method.hardware", self.hardware,
              f"null (the run's hardware) or one of {', '.join(available_profiles())}")
        check(self.granularity is None or self.granularity >= 1, "method.granularity", self.granularity,
              "null (the profile's rank_granularity) or an integer >= 1")
        check(self.search_epochs > 0, "method.search_epochs", self.search_epochs, "a float > 0 (epochs)")
        check(self.lut_batch >= 1, "method.lut_batch", self.lut_batch, "an integer >= 1")
        check(0 < self.tau_end <= self.tau_start, "method.tau_start/tau_end", (self.tau_start, self.tau_end),
              "0 < tau_end <= tau_start")
        check(self.latency_exponent > 0, "method.latency_exponent", self.latency_exponent, "a float > 0")
        check(self.feature_weight >= 0, "method.feature_weight", self.feature_weight, "a float >= 0")
        check(self.weight_lr > 0 and self.arch_lr > 0, "method.weight_lr/arch_lr", (self.weight_lr, self.arch_lr),
              "floats > 0")


class CandidateConv(nn.Module):
    """A searched layer: the frozen dense conv, its Tucker-2 branches, logits α and each branch's cost."""

    def __init__(self, dense: nn.Conv2d, ranks: list[int], costs: list[float]) -> None:
        super().__init__()
        self.reference = dense.requires_grad_(False)
        self.ranks = ranks
        self.branches = nn.ModuleList(Tucker2Conv2d.from_conv(dense, r, r) for r in ranks)
        self.logits = nn.Parameter(torch.zeros(len(ranks), device=dense.weight.device))
        self.register_buffer("costs", torch.tensor(costs, dtype=torch.float32, device=dense.weight.device))
        self.tau = 5.0
        self.interference = torch.zeros(())

    def expected_cost(self) -> torch.Tensor:
        return (F.softmax(self.logits, 0) * self.costs).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = F.gumbel_softmax(self.logits, tau=self.tau)
        outputs = [branch(x) for branch in self.branches]
        with torch.no_grad():
            reference = self.reference(x)
            scale = (reference**2).mean().clamp_min(1e-12)
        self.interference = torch.stack([((y - reference) ** 2).mean() for y in outputs]).mean() / scale
        return sum(g * y for g, y in zip(gates, outputs, strict=True))


class HALOC(Method):
    plain_train = True  # its train stage is ordinary training (see Method.trains_plainly)
    state_attributes = ('ranks', 'luts', 'history', 'left_dense')
    Config = HALOCConfig

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        self.profile_name = self.config.hardware  # `hardware` is the run's profile the pipeline sets
        self.hardware = None
        self.ranks: dict[str, int] = {}
        self.luts: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, float]] = []
        self.left_dense: list[str] = []
        self.target_cost = 0.0

    def layers(self, model: nn.Module) -> dict[str, nn.Conv2d]:
        return {n: m for n, m in prunable_layers(model, self.exclude).items()
                if isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size[0] * m.kernel_size[1] > 1}

    def check_applicable(self, model: nn.Module) -> None:
        if not self.layers(model):
            raise NotApplicable(f"no groups=1 conv2d with a kernel larger than 1x1 outside exclude={self.exclude}")
        self.lookup_tables(model)
        self.check_target()

    def profile(self) -> HardwareConfig:
        return load_profile(self.profile_name) if self.profile_name else (self.hardware or load_profile("host_cpu"))

    def lookup_tables(self, model: nn.Module) -> None:
        """LUT_l(r) of every searched layer's candidate ranks (those that save MACs and are cheaper than the
        dense conv on the target), into ``luts``; layers without candidates into ``left_dense``."""
        layers, profile = self.layers(model), self.profile()
        step = int(self.granularity or profile.rank_granularity)
        shapes = layer_input_shapes(model, layers, (self.lut_batch, *self.input_shape))
        self.luts, self.left_dense = {}, []
        for name, layer in layers.items():
            ranks = candidate_ranks(layer, step)
            if not ranks:
                self.left_dense.append(f"{name}: no rank in multiples of {step} saves MACs")
                continue
            conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                             layer.dilation, bias=layer.bias is not None)
            dense = layer_cost(conv, shapes[name], self.latency_source, profile)
            costs = {r: layer_cost(Tucker2Conv2d.like(conv, r, r), shapes[name], self.latency_source, profile)
                     for r in ranks}
            faster = [r for r in ranks if costs[r] < dense]
            if not faster:
                self.left_dense.append(f"{name}: no rank is cheaper than the dense conv on {profile.name} "
                                       f"({self.latency_source}, batch {self.lut_batch})")
                continue
            self.luts[name] = {"ranks": faster, "costs": [round(costs[r], 6) for r in faster],
                               "dense": round(dense, 6)}
        dense_total = sum(lut["dense"] for lut in self.luts.values())
        self.target_cost = self.latency_fraction * dense_total

    def check_target(self) -> None:
        """Refuse a latency target that no choice of candidate ranks reaches, naming the reachable range."""
        profile = self.profile()
        where = f"hardware {profile.name} ({self.latency_source} costs, batch {self.lut_batch})"
        if not self.luts:
            by_reason: dict[str, list[str]] = {}
            for entry in self.left_dense:
                name, _, reason = entry.partition(": ")
                by_reason.setdefault(reason, []).append(name)
            reasons = "; ".join(f"{len(names)} layer(s) ({', '.join(names[:2])}{', ...' if len(names) > 2 else ''}): "
                                f"{reason}" for reason, names in by_reason.items())
            raise UserError(f"HALOC has no layer to search on {where}: {reasons}",
                            "set a smaller method.granularity (e.g. method.granularity=4), a larger "
                            "method.lut_batch (small layers are overhead-bound at batch 1), another "
                            "method.hardware, or method.latency_source=macs")
        floor = sum(min(lut["costs"]) for lut in self.luts.values()) * self.latency_fraction / self.target_cost
        if self.latency_fraction < floor:
            raise UserError(f"method.latency_fraction={self.latency_fraction} cannot be reached on {where}: "
                            f"the cheapest candidate rank of every searched layer together costs {floor:.3f} of "
                            f"their dense latency ({len(self.luts)} layers searched, {len(self.left_dense)} "
                            "left dense)",
                            f"set method.latency_fraction within the reachable range {math.ceil(floor * 1000) / 1000}"
                            " <= latency_fraction < 1, a smaller method.granularity, a larger method.lut_batch, "
                            "or another method.hardware")

    def wrap(self, model: nn.Module) -> dict[str, CandidateConv]:
        """Replace every searched layer by its :class:`CandidateConv` with costs from the LUT."""
        if not self.luts:  # check_applicable built them already in a pipeline run
            self.lookup_tables(model)
            self.check_target()
        wrapped = {}
        for name, lut in self.luts.items():
            wrapped[name] = CandidateConv(model.get_submodule(name), lut["ranks"], lut["costs"])
            set_module(model, name, wrapped[name])
        return wrapped

    def search(self, model: nn.Module, wrapped: dict[str, CandidateConv], batches,
               prepare: Callable[[tuple], tuple] = lambda batch: batch) -> None:
        """Alternate weight and architecture steps over ``batches`` (``prepare``: the datamodule's
        per-batch normalisation)."""
        logits = [w.logits for w in wrapped.values()]
        logit_ids = {id(p) for p in logits}
        weights = [p for p in model.parameters() if p.requires_grad and id(p) not in logit_ids]
        weight_opt = torch.optim.SGD(weights, lr=self.weight_lr, momentum=0.9, weight_decay=5e-4)
        arch_opt = torch.optim.AdamW(logits, lr=self.arch_lr, weight_decay=5e-4)
        total = max(2, math.ceil(self.search_epochs * len(batches)))
        device = next(model.parameters()).device
        model.train()
        with Progress(transient=True) as progress:
            task = progress.add_task("HALOC rank search", total=total)
            step = 0
            while step < total:
                for x, y in batches:
                    if step >= total:
                        break
                    tau = annealed_tau(self.tau_start, self.tau_end, step / max(1, total - 1))
                    for w in wrapped.values():
                        w.tau = tau
                    x, y = prepare((x.to(device), y.to(device)))
                    ce = F.cross_entropy(model(x), y)
                    latency = sum(w.expected_cost() for w in wrapped.values())
                    if step % 2 == 0:
                        loss = ce + self.feature_weight * sum(w.interference for w in wrapped.values()) / len(wrapped)
                        weight_opt.zero_grad()
                        loss.backward()
                        weight_opt.step()
                    else:
                        loss = budget_loss(ce, latency, self.target_cost, self.latency_exponent)
                        arch_opt.zero_grad()
                        loss.backward()
                        arch_opt.step()
                    if step % max(1, total // 20) == 0 or step == total - 1:
                        self.history.append({"step": step, "tau": round(tau, 4), "ce": round(ce.item(), 4),
                                             "expected_cost": round(latency.item(), 6)})
                    step += 1
                    progress.advance(task)

    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        wrapped = self.wrap(model)
        self.search(model, wrapped, datamodule.train_dataloader(),
                    prepare=lambda batch: datamodule.on_after_batch_transfer(batch, 0))
        for name, w in wrapped.items():
            best = int(w.logits.argmax())
            self.ranks[name] = w.ranks[best]
            set_module(model, name, w.branches[best])
        return model

    def summary(self) -> dict[str, Any]:
        chosen = sum(self.luts[n]["costs"][self.luts[n]["ranks"].index(r)] for n, r in self.ranks.items())
        dense = sum(lut["dense"] for lut in self.luts.values())
        return {"latency_source": self.latency_source, "hardware": self.profile().name,
                "granularity": self.granularity or self.profile().rank_granularity,
                "latency_fraction": self.latency_fraction, "ranks": self.ranks, "left_dense": self.left_dense,
                "chosen_cost_fraction": round(chosen / dense, 4) if dense else None, "luts": self.luts,
                "search_history": self.history}

