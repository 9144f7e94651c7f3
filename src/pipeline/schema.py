"""Typed schemas of every config group, registered in Hydra's ConfigStore as ``base_<group>``.

Each option YAML lists its schema first in its defaults list, so a wrong key fails at composition.
Range checks live in ``__post_init__`` and run in :func:`compress_run.pipeline.validate.validate`
(which converts each group to its dataclass) before any work is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from compress_run.hardware.profile import HardwareConfig, available_profiles

STAGES = ("train", "compress", "finetune", "evaluate")
DISTRIBUTIONS = ("uniform", "global", "erk")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is not allowed; allowed: {allowed}")


# ----------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    _target_: str = MISSING
    num_classes: int = MISSING
    in_channels: int = MISSING
    image_size: int = MISSING
    width_mult: float = 1.0

    def __post_init__(self) -> None:
        _check(self.num_classes >= 2, "model.num_classes", self.num_classes, "an integer >= 2")
        _check(self.in_channels >= 1, "model.in_channels", self.in_channels, "an integer >= 1")
        _check(self.image_size >= 4, "model.image_size", self.image_size, "an integer >= 4")
        _check(self.width_mult > 0, "model.width_mult", self.width_mult, "a float > 0")


@dataclass
class TorchvisionModelConfig(ModelConfig):
    stem: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.stem in ("auto", "imagenet", "cifar"), "model.stem", self.stem, "auto, imagenet, cifar")


@dataclass
class VitModelConfig(ModelConfig):
    variant: str = MISSING
    patch_size: int = 0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.patch_size >= 0, "model.patch_size", self.patch_size, "0 (auto) or a positive integer")
        if self.patch_size:
            _check(self.image_size % self.patch_size == 0, "model.patch_size", self.patch_size,
                   f"a divisor of model.image_size={self.image_size} (or 0 for auto)")
        _check(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", self.drop_path_rate, "[0, 1)")


# --------------------------------------------------------------------------------------- dataset
@dataclass
class DatasetConfig:
    _target_: str = MISSING
    root: str | None = None
    num_classes: int = MISSING
    in_channels: int = MISSING
    image_size: int = MISSING
    val_fraction: float = 0.1
    split_seed: int = 0
    num_workers: int = 0
    augment: bool = True
    download: bool = True
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(0.0 < self.val_fraction < 0.5, "dataset.val_fraction", self.val_fraction, "(0, 0.5)")
        _check(self.num_workers >= 0, "dataset.num_workers", self.num_workers, "an integer >= 0")
        _check(len(self.mean) == len(self.std) == self.in_channels, "dataset.mean/std",
               (self.mean, self.std), f"lists of length dataset.in_channels={self.in_channels}")


@dataclass
class SyntheticDatasetConfig(DatasetConfig):
    num_train: int = 512
    num_test: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.num_train >= 8 and self.num_test >= 1, "dataset.num_train/num_test",
               (self.num_train, self.num_test), "num_train >= 8 and num_test >= 1")


# ---------------------------------------------------------------------------------------- method
@dataclass
class DenseConfig:
    _target_: str = MISSING


@dataclass
class MaskMethodConfig:
    """Keys of every weight-mask method (the prunable layers, how the budget is spread, the pattern)."""
    _target_: str = MISSING
    distribution: str = "uniform"
    pattern: str = "irregular"
    exclude: list[str] = field(default_factory=lambda: ["first_conv", "classifier"])
    mask_grads: bool = True

    def __post_init__(self) -> None:
        from compress_run.core.projections import parse_pattern

        _check(self.distribution in DISTRIBUTIONS, "method.distribution", self.distribution,
               ", ".join(DISTRIBUTIONS))
        try:
            parse_pattern(self.pattern)
        except ValueError as exc:
            _check(False, "method.pattern", self.pattern, str(exc))


@dataclass
class MethodConfig(MaskMethodConfig):
    sparsity: float = 0.0

    def __post_init__(self) -> None:
        from compress_run.core.projections import fixed_density

        super().__post_init__()
        _check(0.0 <= self.sparsity < 1.0, "method.sparsity", self.sparsity, "a float in [0, 1)")
        density = fixed_density(self.pattern)
        _check(density is None or self.sparsity == 0.0 or abs(self.sparsity - (1 - density)) < 1e-9,
               "method.sparsity", self.sparsity, f"{1 - (density or 0):g} with method.pattern={self.pattern} "
               "(N:M fixes the sparsity at 1 - N/M)")


@dataclass
class GMPConfig(MethodConfig):
    start_epoch: float = 0.0
    end_epoch: float | None = None
    frequency: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.start_epoch >= 0, "method.start_epoch", self.start_epoch, "a float >= 0")
        if self.end_epoch is not None:
            _check(self.end_epoch > self.start_epoch, "method.end_epoch", self.end_epoch,
                   f"null or a float > method.start_epoch={self.start_epoch}")
        _check(self.frequency >= 1, "method.frequency", self.frequency, "an integer >= 1 (optimizer steps)")


@dataclass
class RigLConfig(MethodConfig):
    distribution: str = "erk"
    delta_t: int = 100
    alpha: float = 0.3
    end_fraction: float = 0.75

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.delta_t >= 1, "method.delta_t", self.delta_t, "an integer >= 1 (optimizer steps)")
        _check(0.0 < self.alpha < 1.0, "method.alpha", self.alpha, "a float in (0, 1)")
        _check(0.0 < self.end_fraction <= 1.0, "method.end_fraction", self.end_fraction, "a float in (0, 1]")


@dataclass
class GaPConfig(MethodConfig):
    sparsity: float = 0.9
    variant: str = "cyclic"
    num_partitions: int = 4
    partitioner: Any = "equal_params"
    rounds: int = 1
    reset_optimizer_each_step: bool = True
    worker: int | None = None

    def __post_init__(self) -> None:
        from compress_run.methods.gap import VARIANTS
        from compress_run.methods.partitions import PARTITIONERS

        super().__post_init__()
        _check(self.sparsity > 0, "method.sparsity", self.sparsity, "a float in (0, 1) (GaP trains sparse)")
        _check(self.variant in VARIANTS, "method.variant", self.variant, ", ".join(VARIANTS))
        _check(self.num_partitions >= 2, "method.num_partitions", self.num_partitions, "an integer >= 2")
        _check(self.rounds >= 1, "method.rounds", self.rounds, "an integer >= 1")
        ok = self.partitioner in PARTITIONERS if isinstance(self.partitioner, str) else (
            isinstance(self.partitioner, list) and len(self.partitioner) == self.num_partitions
            and all(isinstance(g, str) for g in self.partitioner))
        _check(ok, "method.partitioner", self.partitioner,
               f"{', '.join(PARTITIONERS)} or a list of num_partitions={self.num_partitions} module-name globs")
        if self.worker is not None:
            _check(self.variant == "parallel" and 0 <= self.worker < self.num_partitions, "method.worker",
                   self.worker, f"null, or 0..num_partitions-1={self.num_partitions - 1} with method.variant=parallel")


@dataclass
class MESTConfig(MethodConfig):
    sparsity: float = 0.9
    mode: str = "ems"
    update_every: int = 5
    grad_coefficient: float = 0.0
    phase_epochs: list[float] | None = None
    prune_to: list[float] | None = None
    grow_to: list[float] | None = None
    remove_n: int = 0
    remove_data_epoch: int | None = None

    def __post_init__(self) -> None:
        from compress_run.methods.mest import MODES

        super().__post_init__()
        _check(self.sparsity > 0, "method.sparsity", self.sparsity, "a float in (0, 1) (MEST trains sparse)")
        _check(self.distribution in ("uniform", "erk"), "method.distribution", self.distribution,
               "uniform, erk (MEST allocates per-layer counts)")
        _check(self.mode in MODES, "method.mode", self.mode, ", ".join(MODES))
        _check(self.update_every >= 1, "method.update_every", self.update_every, "an integer >= 1 (epochs)")
        _check(self.grad_coefficient >= 0, "method.grad_coefficient", self.grad_coefficient, "a float >= 0")
        _check(self.remove_n >= 0, "method.remove_n", self.remove_n, "an integer >= 0 (0 = keep all data)")
        if self.remove_data_epoch is not None:
            _check(self.remove_data_epoch >= 1, "method.remove_data_epoch", self.remove_data_epoch,
                   "null or an epoch >= 1 (forgetting needs at least one epoch of statistics)")
        if self.phase_epochs is not None:
            _check(len(self.phase_epochs) == 2 and self.phase_epochs[0] <= self.phase_epochs[1],
                   "method.phase_epochs", self.phase_epochs, "null or two increasing epochs [start2, start3]")
        for key in ("prune_to", "grow_to"):
            value = getattr(self, key)
            if value is not None:
                _check(len(value) == 3 and all(0 <= v < 1 for v in value), f"method.{key}", value,
                       "null or three sparsities in [0, 1), one per phase")
        if self.prune_to is not None and self.grow_to is not None:
            _check(all(g <= p for p, g in zip(self.prune_to, self.grow_to, strict=True)), "method.grow_to",
                   self.grow_to, f"per phase at most method.prune_to={self.prune_to} (growth adds weights)")


@dataclass
class LTHConfig(MethodConfig):
    sparsity: float = 0.9
    distribution: str = "global"
    protocol: str = "imp"
    prune_rate: float = 0.2
    rewind_epoch: int = 0
    init: str = "original"
    ticket: str | None = None

    def __post_init__(self) -> None:
        from compress_run.methods.lth import INITS, PROTOCOLS

        super().__post_init__()
        _check(self.sparsity > 0, "method.sparsity", self.sparsity, "a float in (0, 1)")
        _check(self.protocol in PROTOCOLS, "method.protocol", self.protocol, ", ".join(PROTOCOLS))
        _check(0 < self.prune_rate < 1, "method.prune_rate", self.prune_rate, "a float in (0, 1)")
        _check(self.rewind_epoch >= 0, "method.rewind_epoch", self.rewind_epoch, "an integer >= 0 (0 = init)")
        _check(self.init in INITS, "method.init", self.init, ", ".join(INITS))


@dataclass
class ChannelMethodConfig:
    _target_: str = MISSING
    sparsity: float = 0.5
    target: str = "channels"
    flops_reduction: float = 0.5
    min_channels: int = 1
    channel_multiple: int = 1
    prune_residual: bool = True
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from compress_run.methods.chex import TARGETS

        _check(0.0 <= self.sparsity < 1.0, "method.sparsity", self.sparsity, "a float in [0, 1) (channels removed)")
        _check(self.target in TARGETS, "method.target", self.target, ", ".join(TARGETS))
        _check(0.0 < self.flops_reduction < 1.0, "method.flops_reduction", self.flops_reduction,
               "a float in (0, 1) (fraction of MACs removed)")
        _check(self.min_channels >= 1, "method.min_channels", self.min_channels, "an integer >= 1")
        _check(self.channel_multiple >= 1, "method.channel_multiple", self.channel_multiple, "an integer >= 1")


@dataclass
class CHEXConfig(ChannelMethodConfig):
    delta0: float = 0.2
    delta_t_epochs: int = 2
    t_max_fraction: float = 0.75

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0.0 <= self.delta0 <= (self.sparsity if self.target == "channels" else 1.0), "method.delta0",
               self.delta0, f"a float in [0, method.sparsity={self.sparsity}] (S - delta0 is the initial sparsity)")
        _check(self.delta_t_epochs >= 1, "method.delta_t_epochs", self.delta_t_epochs, "an integer >= 1 (epochs)")
        _check(0.0 < self.t_max_fraction <= 1.0, "method.t_max_fraction", self.t_max_fraction, "a float in (0, 1]")


@dataclass
class SVDConfig:
    _target_: str = MISSING
    form: str = "channel"
    target: str = "flops"
    energy: float = 0.9
    flops_reduction: float = 0.5
    include_linear: bool = False
    exclude: list[str] = field(default_factory=lambda: ["first_conv", "classifier"])
    min_rank: int = 1

    def __post_init__(self) -> None:
        from compress_run.methods.svd import FORMS, TARGETS

        _check(self.form in FORMS, "method.form", self.form, ", ".join(FORMS))
        _check(self.target in TARGETS, "method.target", self.target, ", ".join(TARGETS))
        _check(0.0 < self.energy <= 1.0, "method.energy", self.energy, "a float in (0, 1] (singular energy kept)")
        _check(0.0 < self.flops_reduction < 1.0, "method.flops_reduction", self.flops_reduction,
               "a float in (0, 1) (fraction of MACs removed)")
        _check(self.min_rank >= 1, "method.min_rank", self.min_rank, "an integer >= 1")


@dataclass
class TRPConfig(SVDConfig):
    target: str = "energy"
    period: int = 20
    nuclear_weight: float = 3e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.period >= 1, "method.period", self.period, "an integer >= 1 (optimizer steps between truncations)")
        _check(self.nuclear_weight >= 0, "method.nuclear_weight", self.nuclear_weight, "a float >= 0")


@dataclass
class ELRTConfig:
    _target_: str = MISSING
    target: str = "flops"
    rank_ratio: float = 0.5
    flops_reduction: float = 0.7
    ortho_weight: float = 1e-3
    orthogonal_init: bool = True
    exclude: list[str] = field(default_factory=lambda: ["first_conv", "classifier"])
    min_rank: int = 1

    def __post_init__(self) -> None:
        from compress_run.methods.elrt import TARGETS

        _check(self.target in TARGETS, "method.target", self.target, ", ".join(TARGETS))
        _check(0.0 < self.rank_ratio <= 1.0, "method.rank_ratio", self.rank_ratio, "a float in (0, 1]")
        _check(0.0 < self.flops_reduction < 1.0, "method.flops_reduction", self.flops_reduction,
               "a float in (0, 1) (fraction of MACs removed)")
        _check(self.ortho_weight >= 0, "method.ortho_weight", self.ortho_weight, "a float >= 0")
        _check(self.min_rank >= 1, "method.min_rank", self.min_rank, "an integer >= 1")


@dataclass
class HALOCConfig:
    _target_: str = MISSING
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
        from compress_run.methods.haloc import SOURCES

        _check(0.0 < self.latency_fraction < 1.0, "method.latency_fraction", self.latency_fraction,
               "a float in (0, 1) (target latency of the searched layers / their dense latency)")
        _check(self.latency_source in SOURCES, "method.latency_source", self.latency_source, ", ".join(SOURCES))
        _check(self.hardware is None or self.hardware in available_profiles(), "method.hardware", self.hardware,
               f"null (the run's hardware) or one of {', '.join(available_profiles())}")
        _check(self.granularity is None or self.granularity >= 1, "method.granularity", self.granularity,
               "null (the profile's rank_granularity) or an integer >= 1")
        _check(self.search_epochs > 0, "method.search_epochs", self.search_epochs, "a float > 0 (epochs)")
        _check(self.lut_batch >= 1, "method.lut_batch", self.lut_batch, "an integer >= 1")
        _check(0 < self.tau_end <= self.tau_start, "method.tau_start/tau_end", (self.tau_start, self.tau_end),
               "0 < tau_end <= tau_start")
        _check(self.latency_exponent > 0, "method.latency_exponent", self.latency_exponent, "a float > 0")
        _check(self.feature_weight >= 0, "method.feature_weight", self.feature_weight, "a float >= 0")
        _check(self.weight_lr > 0 and self.arch_lr > 0, "method.weight_lr/arch_lr", (self.weight_lr, self.arch_lr),
               "floats > 0")


@dataclass
class COMCATConfig:
    _target_: str = MISSING
    params_reduction: float = 0.5
    search_epochs: int = 2
    search_fraction: float = 1.0
    train_fraction: float = 1.0
    tau_start: float = 5.0
    tau_end: float = 0.1
    params_exponent: float = 1.5
    arch_lr: float = 0.01
    arch_weight_decay: float = 5e-4
    weight_lr: float = 5e-4
    weight_decay: float = 0.05
    block_weight: float = 0.5
    align_blocks: list[int] = field(default_factory=lambda: [0, 1, -2, -1])
    factorize_head: bool = True
    attn_ranks: list[int] = field(default_factory=list)
    mlp_ranks: list[int] = field(default_factory=list)
    head_ranks: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(0.0 < self.params_reduction < 1.0, "method.params_reduction", self.params_reduction,
               "a float in (0, 1) (fraction of parameters removed)")
        _check(self.search_epochs >= 1, "method.search_epochs", self.search_epochs,
               "an integer >= 1 (the paper: 30; the first epoch trains at the largest ranks, the search starts at the "
               "second)")
        for key in ("search_fraction", "train_fraction"):
            _check(getattr(self, key) > 0, f"method.{key}", getattr(self, key), "a float > 0 (of an epoch)")
        _check(0 < self.tau_end <= self.tau_start, "method.tau_start/tau_end", (self.tau_start, self.tau_end),
               "0 < tau_end <= tau_start")
        for key in ("block_weight", "arch_weight_decay", "weight_decay"):
            _check(getattr(self, key) >= 0, f"method.{key}", getattr(self, key), "a float >= 0")
        _check(self.weight_lr > 0 and self.arch_lr > 0, "method.weight_lr/arch_lr", (self.weight_lr, self.arch_lr),
               "floats > 0")
        _check(all(r >= 1 for r in [*self.attn_ranks, *self.mlp_ranks, *self.head_ranks]),
               "method.attn_ranks/mlp_ranks/head_ranks", (self.attn_ranks, self.mlp_ranks, self.head_ranks),
               "lists of integers >= 1 (empty = the released code's tables)")


@dataclass
class ADMMConfig(MethodConfig):
    sparsity: float = 0.9
    rho: float = 1e-3
    update_epochs: int = 1
    start_epoch: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.rho > 0, "method.rho", self.rho, "a float > 0")
        _check(self.update_epochs >= 1, "method.update_epochs", self.update_epochs, "an integer >= 1")
        _check(self.start_epoch >= 0, "method.start_epoch", self.start_epoch, "an integer >= 0")


@dataclass
class ReweightedConfig(MethodConfig):
    sparsity: float = 0.9
    reg_lambda: float = 1e-4
    eps: float = 1e-3
    reweight_epochs: int = 1
    norm: str = "l2sq"

    def __post_init__(self) -> None:
        from compress_run.methods.reweighted import NORMS

        super().__post_init__()
        _check(self.reg_lambda >= 0, "method.reg_lambda", self.reg_lambda, "a float >= 0")
        _check(self.eps > 0, "method.eps", self.eps, "a float > 0")
        _check(self.reweight_epochs >= 1, "method.reweight_epochs", self.reweight_epochs, "an integer >= 1")
        _check(self.norm in NORMS, "method.norm", self.norm, ", ".join(NORMS))


@dataclass
class MultilevelConfig(MaskMethodConfig):
    levels: list[float] = field(default_factory=lambda: [0.95, 0.9, 0.8])
    per_level_bn: bool = True
    segments: Any = "by_stage"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.segments == "by_stage" or (isinstance(self.segments, list) and len(self.segments) >= 2
                                               and all(isinstance(g, str) for g in self.segments)),
               "method.segments", self.segments, "by_stage or a list of at least two module-name globs")
        levels = list(self.levels)
        _check(bool(levels) and all(0 < s < 1 for s in levels)
               and all(a > b for a, b in zip(levels, levels[1:], strict=False)), "method.levels", levels,
               "a non-empty list of sparsities in (0, 1), strictly decreasing (sparsest first)")


# --------------------------------------------------------------------------------------- distill
@dataclass
class DistillConfig:
    teacher: str | None = None          # null = off; a checkpoint, a run dir, or `train` (this run's train stage)
    kind: str = "soft"                  # soft: KL at temperature; hard: CE on the teacher's argmax (DeiT)
    alpha: float = 0.5                  # loss = (1 - alpha) CE + alpha KD
    temperature: float = 1.0
    stages: list[str] = field(default_factory=lambda: ["finetune"])  # stages whose training loss distils

    def __post_init__(self) -> None:
        from compress_run.methods.distill import KINDS

        _check(self.kind in KINDS, "distill.kind", self.kind, ", ".join(KINDS))
        _check(0.0 <= self.alpha <= 1.0, "distill.alpha", self.alpha, "a float in [0, 1]")
        _check(self.temperature > 0, "distill.temperature", self.temperature, "a float > 0")
        _check(all(s in ("train", "finetune") for s in self.stages), "distill.stages", list(self.stages),
               "a subset of [train, finetune]")
        _check(not (self.teacher == "train" and "train" in self.stages), "distill.stages", list(self.stages),
               "[finetune] with distill.teacher=train (the train stage cannot distil from its own result)")


# -------------------------------------------------------------------------------------- schedule
@dataclass
class StageSchedule:
    epochs: int = 1
    lr: float = 0.1
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1
    epoch_fraction: float = 1.0

    def check(self, stage: str) -> None:
        _check(self.epochs >= 0, f"schedule.{stage}.epochs", self.epochs, "an integer >= 0")
        _check(self.lr > 0, f"schedule.{stage}.lr", self.lr, "a float > 0")
        _check(self.lr_schedule in ("cosine", "step", "constant"), f"schedule.{stage}.lr_schedule",
               self.lr_schedule, "cosine, step, constant")
        _check(0 <= self.warmup_epochs <= max(self.epochs, 0), f"schedule.{stage}.warmup_epochs",
               self.warmup_epochs, f"a float in [0, epochs={self.epochs}]")
        _check(0 < self.epoch_fraction <= 1, f"schedule.{stage}.epoch_fraction", self.epoch_fraction, "(0, 1]")


@dataclass
class ScheduleConfig:
    batch_size: int = 128
    eval_batch_size: int = 512
    label_smoothing: float = 0.0
    decay_norm_and_bias: bool = True
    optimizer: dict[str, Any] = field(default_factory=lambda: {
        "_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9, "nesterov": True,
        "weight_decay": 5e-4})
    train: StageSchedule = field(default_factory=StageSchedule)
    finetune: StageSchedule = field(default_factory=StageSchedule)

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "schedule.batch_size", self.batch_size, "an integer >= 1")
        _check(self.eval_batch_size >= 1, "schedule.eval_batch_size", self.eval_batch_size, "an integer >= 1")
        _check(0.0 <= self.label_smoothing < 1.0, "schedule.label_smoothing", self.label_smoothing, "[0, 1)")
        self.train.check("train")
        self.finetune.check("finetune")


# --------------------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    deterministic: Any = True
    benchmark: bool | None = None
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 20
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    num_sanity_val_steps: int = 0
    enable_model_summary: bool = True

    def __post_init__(self) -> None:
        _check(self.accelerator in ("cpu", "gpu", "cuda", "mps", "auto"), "trainer.accelerator",
               self.accelerator, "cpu, gpu, cuda, mps, auto")
        _check(self.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches",
               self.accumulate_grad_batches, "an integer >= 1")


# ---------------------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig:
    _target_: str | None = None
    name: str = "csv"


@dataclass
class WandbLoggerConfig(LoggerConfig):
    project: str = "compress-run"
    offline: bool = True
    log_model: bool = False


# -------------------------------------------------------------------------------------- evaluate
@dataclass
class EvaluateConfig:
    hardware: list[str] | None = None   # extra profiles to simulate besides the `hardware` group's
    batch_size: int = 8                 # batch N of the second simulated/measured latency (batch 1 always)
    measure_latency: bool = True        # time the executed model on this host
    warmup: int = 5
    repeats: int = 20
    breakdown: int = 0                  # print the N slowest layers per profile (0 = off)
    plot: bool = False                  # write latency_breakdown.png
    export: str | None = None           # onnx: write model.onnx (the executed, e.g. compacted, network)
    level: Any = None                   # multi-level models: the level (a sparsity, or one per segment) reported
    latency_budget_ms: float | None = None  # multi-level models: report the best level/switch within this budget
    kernels: str = "measured"           # measured: fastest kernel per layer by timing; simulated: simulator's pick

    def __post_init__(self) -> None:
        known = available_profiles()
        unknown = [h for h in self.hardware or [] if h not in known]
        _check(not unknown, "evaluate.hardware", list(self.hardware or []),
               f"a list of hardware profiles from {known} (unknown: {unknown})")
        _check(self.batch_size >= 1, "evaluate.batch_size", self.batch_size, "an integer >= 1")
        _check(self.warmup >= 0, "evaluate.warmup", self.warmup, "an integer >= 0")
        _check(self.repeats >= 1, "evaluate.repeats", self.repeats, "an integer >= 1")
        _check(self.breakdown >= 0, "evaluate.breakdown", self.breakdown, "an integer >= 0 (0 = off)")
        _check(self.export in (None, "onnx"), "evaluate.export", self.export, "null or onnx")
        _check(self.kernels in ("measured", "simulated"), "evaluate.kernels", self.kernels, "measured or simulated")
        levels = self.level if isinstance(self.level, list | tuple) else [self.level] if self.level is not None else []
        _check(all(isinstance(v, int | float) and 0 < v < 1 for v in levels), "evaluate.level", self.level,
               "null (the densest level), one of method.levels, or a list of them, one per segment")
        _check(self.latency_budget_ms is None or self.latency_budget_ms > 0, "evaluate.latency_budget_ms",
               self.latency_budget_ms, "null or a float > 0 (milliseconds, simulated batch 1)")


# ------------------------------------------------------------------------------------------ root
@dataclass
class PathsConfig:
    log_dir: str = "logs"
    data_dir: str = "data"


@dataclass
class RootConfig:
    task_name: str = "compress"
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    tags: list[str] = field(default_factory=list)
    output_dir: str | None = None
    init_ckpt: str | None = None
    model: Any = MISSING
    dataset: Any = MISSING
    method: Any = MISSING
    hardware: Any = MISSING
    schedule: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    debug: Any = None
    experiment: Any = None

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        _check(not bad, "stages", list(self.stages), f"a subset of {list(STAGES)} (unknown: {bad})")
        order = [STAGES.index(s) for s in self.stages]
        _check(order == sorted(set(order)), "stages", list(self.stages),
               f"stage names without repeats, in pipeline order {list(STAGES)}")


SCHEMAS: dict[tuple[str | None, str], type] = {
    (None, "base_config"): RootConfig,
    ("model", "base_model"): ModelConfig,
    ("model", "base_model_torchvision"): TorchvisionModelConfig,
    ("model", "base_model_vit"): VitModelConfig,
    ("dataset", "base_dataset"): DatasetConfig,
    ("dataset", "base_dataset_synthetic"): SyntheticDatasetConfig,
    ("method", "base_method"): MethodConfig,
    ("method", "base_method_dense"): DenseConfig,
    ("method", "base_method_gmp"): GMPConfig,
    ("method", "base_method_rigl"): RigLConfig,
    ("method", "base_method_gap"): GaPConfig,
    ("method", "base_method_mest"): MESTConfig,
    ("method", "base_method_lth"): LTHConfig,
    ("method", "base_method_chex"): CHEXConfig,
    ("method", "base_method_l1_filter"): ChannelMethodConfig,
    ("method", "base_method_svd"): SVDConfig,
    ("method", "base_method_trp"): TRPConfig,
    ("method", "base_method_elrt"): ELRTConfig,
    ("method", "base_method_haloc"): HALOCConfig,
    ("method", "base_method_comcat"): COMCATConfig,
    ("method", "base_method_admm"): ADMMConfig,
    ("method", "base_method_reweighted"): ReweightedConfig,
    ("method", "base_method_multilevel"): MultilevelConfig,
    ("hardware", "base_hardware"): HardwareConfig,
    ("schedule", "base_schedule"): ScheduleConfig,
    ("trainer", "base_trainer"): TrainerConfig,
    ("logger", "base_logger"): LoggerConfig,
    ("logger", "base_logger_wandb"): WandbLoggerConfig,
}


def register_schemas() -> None:
    cs = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        cs.store(group=group, name=name, node=node)
