"""The method contract: the hooks a compression method implements (all optional).

* ``stages`` — the pipeline stages the method needs; the others are recorded as skipped.
* ``check_applicable(model)`` — raise :class:`NotApplicable` if the method cannot act on this model.
* ``check_data(train_size)`` — the same for the run's train split (e.g. a calibration set larger than it).
* ``prepare(model)`` — the network the train stage starts from (default: the model itself); a method
  that trains in another form from scratch (ELRT's Tucker-2 network) builds it here. Deterministic in
  the model's shapes, so a resumed train stage rebuilds the same structure.
* ``training_callbacks(stage, model)`` — Lightning callbacks acting during train/finetune.
* ``training_noise()`` — the noisy computation the train stage runs under (noise-injected training), if any.
* ``lr_cycles(stage)`` — how many times the LR schedule (warm-up included) restarts within a stage
  (default 1): a method whose stage is a sequence of separate training runs says so here.
* ``compress(model, datamodule)`` — the one-shot transformation of the compress stage.
* ``network_metrics(model)`` — numbers about the finished network the evaluate stage reports (``method/<key>``).
* ``artifacts()`` — files (name -> bytes) the pipeline writes into the run dir after the compress stage.
* ``state_dict()/load_state_dict()`` — method state that is not already in the model's state
  (masks are buffers of the model, so they travel with every checkpoint by themselves).

A method owns its config: a dataclass beside it (``Config``, registered with :func:`method_config` as the
schema ``base_method_<name>`` that the method's YAML lists first), whose fields and defaults are the
method's keys — defined once — and whose ``__post_init__`` range-checks them. ``Method.__init__(**keys)``
builds it (so a wrong value fails the same way from the command line and from Python) and copies every
key onto the method as an attribute.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from torch import nn

from compress_run.core.allocation import allocate
from compress_run.core.config import check
from compress_run.core.masks import (
    LayerSelectionError,
    MaskEnforcer,
    magnitude_scores,
    prunable_layers,
    prune_by_score,
)
from compress_run.core.projections import fixed_density, parse_pattern, pattern_shape_problem

ALL_STAGES = ("train", "compress", "finetune", "evaluate")
DISTRIBUTIONS = ("uniform", "global", "erk")
METHOD_CONFIGS: dict[str, type] = {}  # schema name (base_method_<name>) -> the method's config dataclass


def method_config(name: str) -> Callable[[type], type]:
    """Register a method's config dataclass as the schema ``base_method_<name>`` (the pipeline stores every
    registered schema in Hydra's ConfigStore)."""
    def register(cls: type) -> type:
        METHOD_CONFIGS[f"base_method_{name}"] = cls
        return cls
    return register


@dataclass
class MethodConfig:
    """Keys every method has (none but its target)."""
    _target_: str = MISSING


@dataclass
class MaskConfig(MethodConfig):
    """Keys of every weight-mask method: which layers, how the budget is spread, the pattern."""
    distribution: str = "uniform"
    pattern: str = "irregular"
    exclude: list[str] = field(default_factory=lambda: ["first_conv", "classifier"])
    mask_grads: bool = True

    def __post_init__(self) -> None:
        check(self.distribution in DISTRIBUTIONS, "method.distribution", self.distribution, ", ".join(DISTRIBUTIONS))
        try:
            parse_pattern(self.pattern)
        except ValueError as exc:
            check(False, "method.pattern", self.pattern, str(exc))


@dataclass
class MaskPruningConfig(MaskConfig):
    """A weight-mask method with one target sparsity."""
    sparsity: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 <= self.sparsity < 1.0, "method.sparsity", self.sparsity, "a float in [0, 1)")
        density = fixed_density(self.pattern)
        check(density is None or self.sparsity == 0.0 or abs(self.sparsity - (1 - density)) < 1e-9,
              "method.sparsity", self.sparsity, f"{1 - (density or 0):g} with method.pattern={self.pattern} "
              "(N:M fixes the sparsity at 1 - N/M)")


def _plain(value: Any) -> Any:
    if isinstance(value, ListConfig | DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    return list(value) if isinstance(value, tuple) else value


class NotApplicable(ValueError):
    """The method cannot act on the chosen model (the message says why)."""


def check_mask_layers(model: nn.Module, exclude: list[str], pattern: str, density: float | None) -> None:
    """Raise :class:`NotApplicable` unless ``exclude`` leaves prunable layers that can all hold ``pattern`` (at
    ``density`` when every layer has the same one)."""
    try:
        layers = prunable_layers(model, exclude)
    except LayerSelectionError as exc:
        raise NotApplicable(f"method.exclude: {exc}") from exc
    if not layers:
        raise NotApplicable(f"no prunable conv/linear layer is left after method.exclude={exclude}")
    problems = {n: pattern_shape_problem(pattern, m.weight.shape, density) for n, m in layers.items()}
    bad = {n: problem for n, problem in problems.items() if problem}
    if bad:
        name, problem = next(iter(bad.items()))
        raise NotApplicable(f"method.pattern={pattern} cannot hold on {len(bad)} layer(s), e.g. {name}: "
                            f"{problem}; add them to method.exclude (e.g. {list(bad)[:3]}) or choose another pattern")


@dataclass(frozen=True)
class LRScale:
    """The LR of some parameters in a stage, relative to the stage's schedule: 0 for the first ``frozen_fraction``
    of the stage's steps, then ``scale`` x the schedule's LR."""

    scale: float = 1.0
    frozen_fraction: float = 0.0


class Method:
    Config: type = MethodConfig
    stages: tuple[str, ...] = ALL_STAGES
    plain_train: bool = False  # True: no callback of the method acts in the train stage, whatever its keys
    model_factory: Callable[[], nn.Module] | None = None  # set by the pipeline: builds a fresh network
    input_shape: tuple[int, ...] = (3, 32, 32)            # set by the pipeline: one sample's (C, H, W)
    network_input: Any = None    # set by the pipeline: what the network reads (pipeline.network_input.NetworkInput)
    hardware: Any = None                                   # set by the pipeline: the run's HardwareConfig
    distill: Any = None          # set by the pipeline: a Distillation when distill.teacher is given, else None
    distill_config: dict[str, Any] = {"kind": "soft", "alpha": 0.5, "temperature": 1.0}  # the run's distill.*
    # the kinds of network the method acts on (classification: image models; causal_lm: language models), and
    # what the pipeline says when a run pairs it with another kind
    tasks: tuple[str, ...] = ("classification",)
    task_note: str = "it is built for image classifiers and has not been made to act on language models"

    def __init__(self, **keys: Any) -> None:
        self.config = self.Config(**{k: _plain(v) for k, v in keys.items()})
        for f in dataclasses.fields(self.config):  # a key named like a method stays in self.config only
            if f.name != "_target_" and not callable(getattr(type(self), f.name, None)):
                setattr(self, f.name, getattr(self.config, f.name))

    def distill_settings(self) -> dict[str, Any]:
        """kind, alpha and temperature of the run's ``distill`` config (for a method's own distilled passes)."""
        return {k: self.distill_config[k] for k in ("kind", "alpha", "temperature")}

    def check_applicable(self, model: nn.Module) -> None:
        """Raise :class:`NotApplicable` with the reason if the method cannot act on ``model``."""

    def check_data(self, train_size: int) -> None:
        """Raise :class:`NotApplicable` if the method cannot use a train split of ``train_size`` images (a
        calibration set larger than the split); called before any stage runs."""

    def check_distributed(self) -> None:
        """Raise :class:`NotApplicable` with the reason if the method (with its keys) cannot train in several
        data-parallel processes; called before any stage runs when the trainer has more than one."""

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        return []

    def lr_cycles(self, stage: str) -> int:
        return 1

    def lr_scale(self, stage: str, parameter: str) -> LRScale:
        """The LR of the parameter named ``parameter`` (a name in the network) in ``stage``, relative to the
        stage's schedule (default: the schedule's LR)."""
        return LRScale()

    def training_noise(self) -> Any:
        """The noisy analog computation (a ``core.analog_noise.NoiseSpec``) the method trains its train stage under,
        or None; a run's evaluation under noise defaults to it when no ``noise`` group is chosen."""
        return None

    def trains_plainly(self) -> bool:
        """True when the method leaves its train stage to ordinary training of the unchanged model (it declares
        ``plain_train``: no train-stage callbacks; and it has no ``prepare`` and one LR cycle there): that stage's
        result then does not depend on the method or its keys, and a run may take it over from a run of another
        such method (``start_from``). tests/methods/test_plain_train.py checks every declaration."""
        return (self.plain_train and "train" in self.stages and type(self).prepare is Method.prepare
                and self.lr_cycles("train") == 1)

    def compress(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        return model

    def summary(self) -> dict[str, Any]:
        """Method-specific facts for results.json (e.g. achieved sparsity per layer)."""
        return {}

    def network_metrics(self, model: nn.Module) -> dict[str, Any]:
        """Numbers (scalars or lists of them) the evaluate stage reports about the finished ``model`` for this
        method, measured on the run's current settings (``hardware`` included); results.json metrics
        ``method/<key>``, which tables can compare."""
        return {}

    def artifacts(self) -> dict[str, bytes]:
        """Files the compress stage leaves in the run's output dir (file name -> content), e.g. a plot."""
        return {}

    state_attributes: tuple[str, ...] = ()  # attributes that are the method's state (saved in every checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.state_attributes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.state_attributes:
            if name in state:
                value = state[name]
                setattr(self, name, dict(value) if isinstance(value, dict) else
                        list(value) if isinstance(value, list) else value)


QUANT_CONFIGS: dict[str, type] = {}  # schema name (base_quant_<name>) -> a quantizer's config dataclass


def quant_config(name: str) -> Callable[[type], type]:
    """Register a quantizer's config dataclass as the schema ``base_quant_<name>`` (group ``quant``)."""
    def register(cls: type) -> type:
        QUANT_CONFIGS[f"base_quant_{name}"] = cls
        return cls
    return register


class Quantizer(ABC):
    """The quantize stage's contract (``quant=<option>``): ``quantize(model, datamodule)`` turns the finished
    (possibly pruned, compacted or factorized) network into its quantized form in place; ``summary()`` goes
    to results.json. Like a method, it is built from its config dataclass (``Config``).

    A quantizer that trains (quantization-aware training) says so in ``training()``: the stage then calls
    ``prepare_training(model, datamodule)``, fits the returned network for that many epochs (the finetune
    schedule otherwise, resumable from ``quantize-last.ckpt``; ``prepare_training`` must rebuild the same
    structure on a resume, before the checkpoint is loaded) with ``training_callbacks(model)``, and then calls
    ``quantize``, which freezes the trained network into its quantized form."""

    Config: type = MethodConfig
    input_shape: tuple[int, ...] = (3, 32, 32)  # set by the pipeline: one sample's (C, H, W)
    tasks: tuple[str, ...] = ("classification",)  # as Method.tasks
    task_note: str = "it is built for image classifiers and has not been made to act on language models"
    task: str = "classification"                  # set by the pipeline: the run's kind (one of tasks)

    def __init__(self, **keys: Any) -> None:
        self.config = self.Config(**{k: _plain(v) for k, v in keys.items()})
        for f in dataclasses.fields(self.config):
            if f.name != "_target_":
                setattr(self, f.name, getattr(self.config, f.name))

    def check_applicable(self, model: nn.Module) -> None:
        """Raise :class:`NotApplicable` with the reason if nothing of ``model`` can be quantized."""
        return  # default: any model

    def check_data(self, train_size: int) -> None:
        """Raise :class:`NotApplicable` if the calibration cannot be drawn from a train split of this size."""
        return  # default: no calibration set

    def training(self) -> tuple[int, float] | None:
        """(epochs, multiplier of ``schedule.finetune.lr``) of the fit before ``quantize``; None: no training."""
        return None

    def prepare_training(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        """The network to train before ``quantize`` (only called when ``training()`` is not None)."""
        return model

    def training_callbacks(self, model: nn.Module) -> list[L.Callback]:
        return []

    @abstractmethod
    def quantize(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        """The quantized network (``model`` changed in place)."""

    def summary(self) -> dict[str, Any]:
        return {}

    def artifacts(self) -> dict[str, bytes]:
        """Files the quantize stage leaves in the run's output dir (file name -> content), e.g. a plot."""
        return {}


class LayerQuantizer(Quantizer):
    """A quantizer of the conv/linear layers its ``exclude`` leaves, calibrated on ``calib_size`` train images
    (its config has both keys)."""

    exclude: list[str]
    calib_size: int

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        exclude = self.exclude if self.exclude is not None else (["classifier"] if self.task == "causal_lm" else [])
        try:
            layers = prunable_layers(model, exclude)
        except LayerSelectionError as exc:
            raise NotApplicable(f"quant.exclude: {exc}") from exc
        return {n: m for n, m in layers.items() if isinstance(m, nn.Linear | nn.Conv2d)}

    def check_applicable(self, model: nn.Module) -> None:
        if not self.layers(model):
            raise NotApplicable(f"no conv/linear layer is left to quantize after quant.exclude={self.exclude}")

    def check_data(self, train_size: int) -> None:
        if self.calib_size > train_size:
            raise NotApplicable(f"quant.calib_size={self.calib_size} is larger than the train split ({train_size} "
                                f"images); set quant.calib_size <= {train_size}")


class MaskPruningMethod(Method):
    """Base of the weight-mask methods: prunable-layer selection, sparsity target, mask enforcement.

    Config keys (:class:`MaskPruningConfig`): ``sparsity`` (fraction of prunable weights removed),
    ``distribution`` (uniform | global | erk), ``pattern`` (projection name), ``exclude`` (globs / aliases of
    layers kept dense), ``mask_grads`` (zero masked gradients before each optimizer step: the optimizer state
    of pruned weights stays zero, which changes results when weights regrow — GaP, RigL, MEST, multi-level
    phases — or when the gradient is clipped by its norm, ``trainer.gradient_clip_val``; with masks that only
    shrink and no clipping the trained weights are the same either way).
    """

    Config = MaskPruningConfig
    sparsity: float = 0.0

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
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
        density = 1.0 - self.sparsity if self.distribution == "uniform" and self.sparsity > 0 else None
        check_mask_layers(model, self.exclude, self.pattern, density)

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        return [MaskEnforcer(self.mask_grads)] if stage == "finetune" else []

    def summary(self) -> dict[str, Any]:
        return {"target_sparsity": self.sparsity, "distribution": self.distribution, "pattern": self.pattern}
