"""SVD low-rank factorization after training + finetune (the post-training low-rank baseline; no single paper:
the two conv forms are those of Denton et al., NeurIPS 2014, and Jaderberg et al., BMVC 2014).

Reference code: no released code of those papers was read; compared with the decomposition baseline of
yuhuixu1993/Trained-Rank-Pruning — decompose.py: ``EnergyThreshold``, ``channel_decompose`` (the channel form),
``VH_decompose_model`` (the spatial form; stride-1 convs only); cifar-nuclear-regularization.py (energy-threshold
decomposition). Deviations from it, with reasons: docs/fidelity.md (section svd).

Algorithm: train the dense model; at the compress stage replace every factorizable layer (convs except
the first, optionally linear layers except the classifier) by its truncated-SVD two-factor form
(:mod:`compress_run.core.factorized`: ``channel`` = k×k conv to r channels then 1×1, ``spatial`` =
k×1 then 1×k), then finetune the factorized network. Ranks: ``target: energy`` keeps, per layer, the
smallest rank whose singular values hold ``energy`` of the squared singular energy; ``target: flops``
finds the one energy threshold shared by all layers (bisection) at which the whole network has
``flops_reduction`` fewer MACs. A layer whose factorization would not save MACs at the chosen rank is
left dense (our choice; reported under ``left_dense``). With ``skip_slower`` a layer is also left dense where
its factorized form at the chosen rank is slower than the dense layer on the run's hardware profile (simulated,
batch 1, the layer alone on the input it gets): two thin GEMMs can cost more than one wide GEMM though they do
fewer MACs, and a MAC-driven rank choice alone would keep them. The MAC target then counts such layers as dense.
Also ours: strided convs are factorized too (the TRP repository's baseline decomposes stride-1 convs only), and
in the channel form 1×1 convs can be factorized (its layer table leaves them out) — no reason recorded, see
docs/fidelity.md; the factors split the singular values as U·√S and √S·Vᵀ (the repository puts S on one
factor; the product is the same).

Config keys (conf/method/svd.yaml):
* ``form`` (channel): channel | spatial.
* ``target`` (flops): energy | flops; ``energy`` (0.9); ``flops_reduction`` (0.5).
* ``include_linear`` (false): also factorize linear layers (never the classifier).
* ``exclude`` ([first_conv, classifier]): module-name globs kept dense (aliases as for magnitude).
* ``min_rank`` (1): the smallest rank a layer gets.
* ``skip_slower`` (false): leave dense every layer the run's hardware profile prices slower factorized (not in
  the paper; off by default to keep the baseline as published).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn

from compress_run.core.config import check
from compress_run.core.errors import UserError
from compress_run.core.factorized import (
    LowRankConv2d,
    LowRankLinear,
    factorizable,
    layer_fraction,
    rank_for_energy,
    set_module,
    singular_values,
)
from compress_run.core.masks import prunable_layers
from compress_run.hardware.layer_cost import layer_cost, layer_input_shapes
from compress_run.hardware.macs import count_macs
from compress_run.hardware.profile import HardwareConfig, load_profile
from compress_run.methods.base import Method, MethodConfig, NotApplicable, method_config

TARGETS = ("energy", "flops")
FORMS = ("channel", "spatial")


@method_config("svd")
@dataclass
class SVDConfig(MethodConfig):
    form: str = "channel"
    target: str = "flops"
    energy: float = 0.9
    flops_reduction: float = 0.5
    include_linear: bool = False
    exclude: list[str] = field(default_factory=lambda: ["first_conv", "classifier"])
    min_rank: int = 1
    skip_slower: bool = False

    def __post_init__(self) -> None:
        check(self.form in FORMS, "method.form", self.form, ", ".join(FORMS))
        check(self.target in TARGETS, "method.target", self.target, ", ".join(TARGETS))
        check(0.0 < self.energy <= 1.0, "method.energy", self.energy, "a float in (0, 1] (singular energy kept)")
        check(0.0 < self.flops_reduction < 1.0, "method.flops_reduction", self.flops_reduction,
              "a float in (0, 1) (fraction of MACs removed)")
        check(self.min_rank >= 1, "method.min_rank", self.min_rank, "an integer >= 1")


class SVD(Method):
    plain_train = True  # its train stage is ordinary training (see Method.trains_plainly)
    state_attributes = ('energy', 'ranks', 'left_dense')
    Config = SVDConfig

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        self.ranks: dict[str, int] = {}
        self.left_dense: list[str] = []
        self._macs: tuple[float, dict[str, float]] | None = None  # (network MACs, per-module MACs), by shape
        self._faster: dict[tuple[str, int], bool] = {}  # (layer, rank) -> factorized is faster on the profile
        self._shapes: dict[str, tuple] = {}
        self.hardware: HardwareConfig | None = None  # the run's profile, set by the pipeline

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        chosen = {}
        for name, layer in prunable_layers(model, self.exclude).items():
            if isinstance(layer, nn.Linear) and not self.include_linear:
                continue
            if factorizable(layer) and not (isinstance(layer, nn.Conv2d) and self.form == "spatial"
                                            and layer.kernel_size[1] == 1):
                chosen[name] = layer
        return chosen

    def check_applicable(self, model: nn.Module) -> None:
        if not self.layers(model):
            raise NotApplicable("no factorizable layer (groups=1 conv2d or, with include_linear, linear) outside "
                                f"exclude={self.exclude}")

    def choose_ranks(self, layers: dict[str, nn.Module], spectra: dict[str, torch.Tensor],
                     energy: float) -> dict[str, int]:
        ranks = {}
        for name, layer in layers.items():
            rank = max(self.min_rank, rank_for_energy(spectra[name], energy))
            if layer_fraction(layer, rank, self.form) >= 1.0:
                continue
            rank = min(rank, len(spectra[name]))
            if not self.skip_slower or self.faster(name, layer, rank):
                ranks[name] = rank
        return ranks

    def faster(self, name: str, layer: nn.Module, rank: int) -> bool:
        """Whether ``layer`` factorized at ``rank`` is faster than dense on the run's profile (cached)."""
        if (name, rank) not in self._faster:
            profile = self.hardware or load_profile("host_cpu")
            new = (LowRankLinear(layer.in_features, layer.out_features, rank, layer.bias is not None)
                   if isinstance(layer, nn.Linear) else LowRankConv2d.like(layer, rank, self.form))
            shape = self._shapes[name]  # the dense geometry priced on a fresh layer: the live one stays as it is
            self._faster[name, rank] = (layer_cost(new, shape, "simulated", profile)
                                        < layer_cost(new.dense_like(), shape, "simulated", profile))
        return self._faster[name, rank]

    def energy_for_macs(self, model: nn.Module, layers: dict[str, nn.Module],
                        spectra: dict[str, torch.Tensor]) -> float:
        if self._macs is None:
            per_module = count_macs(model, (1, *self.input_shape)).per_module
            self._macs = sum(per_module.values()), per_module
        total, per_module = self._macs
        layer_macs = {n: per_module.get(n, 0.0) for n in layers}
        fixed = total - sum(layer_macs.values())
        goal = (1.0 - self.flops_reduction) * total

        def macs(energy: float) -> float:
            ranks = self.choose_ranks(layers, spectra, energy)
            return fixed + sum(layer_macs[n] * (layer_fraction(layers[n], ranks[n], self.form)
                                                if n in ranks else 1.0) for n in layers)

        if macs(0.0) > goal:
            raise UserError(f"method.flops_reduction={self.flops_reduction} cannot be reached by factorizing "
                            f"{len(layers)} layers at rank >= {self.min_rank} (at most "
                            f"{1 - macs(0.0) / total:.1%} fewer MACs"
                            + (", counting the layers the hardware prices slower factorized as dense)"
                               if self.skip_slower else ")"), "lower method.flops_reduction or method.min_rank, "
                            "factorize more layers (method.include_linear, method.exclude)"
                            + (", or set method.skip_slower=false" if self.skip_slower else ""))
        low, high = 0.0, 1.0
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if macs(mid) <= goal else (low, mid)
        return low

    @torch.no_grad()
    def select_ranks(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, int]:
        """Per-layer ranks by this method's rule (``target``); layers absent are better left dense."""
        spectra = {n: singular_values(layer, self.form).float().cpu() for n, layer in layers.items()}
        if self.skip_slower and not self._shapes:
            self._shapes = layer_input_shapes(model, layers, (1, *self.input_shape))
        if self.target == "flops":
            self.energy = self.energy_for_macs(model, layers, spectra)
        return self.choose_ranks(layers, spectra, self.energy)

    @torch.no_grad()
    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        layers = self.layers(model)
        self.ranks = self.select_ranks(model, layers)
        self.left_dense = [n for n in layers if n not in self.ranks]
        for name, rank in self.ranks.items():
            layer = layers[name]
            new = (LowRankLinear.from_linear(layer, rank) if isinstance(layer, nn.Linear)
                   else LowRankConv2d.from_conv(layer, rank, self.form))
            set_module(model, name, new)
        return model

    def summary(self) -> dict[str, Any]:
        return {"form": self.form, "target": self.target, "energy": self.energy,
                "flops_reduction": self.flops_reduction, "ranks": self.ranks, "left_dense": self.left_dense,
                "skip_slower": self.skip_slower}

