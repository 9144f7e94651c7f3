"""Typed schemas of the shared config groups, registered in Hydra's ConfigStore as ``base_<group>``; each
method's schema lives beside the method (``base_method_<name>``, registered from there).

Each option YAML lists its schema first in its defaults list, so a wrong key fails at composition.
Range checks live in ``__post_init__`` and run in :func:`compress_run.pipeline.validate.validate`
(which converts each group to its dataclass) before any work is done.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from compress_run.core.analog_noise import NoiseSpec, at_snr, check_noise_fields, spec_from
from compress_run.core.config import check
from compress_run.hardware.profile import HardwareConfig, available_profiles

STAGES = ("train", "compress", "finetune", "quantize", "evaluate")




# ----------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    _target_: str = MISSING
    num_classes: int = MISSING
    in_channels: int = MISSING
    image_size: int = MISSING
    width_mult: float = 1.0

    def __post_init__(self) -> None:
        check(self.num_classes >= 2, "model.num_classes", self.num_classes, "an integer >= 2")
        check(self.in_channels >= 1, "model.in_channels", self.in_channels, "an integer >= 1")
        check(self.image_size >= 4, "model.image_size", self.image_size, "an integer >= 4")
        check(self.width_mult > 0, "model.width_mult", self.width_mult, "a float > 0")


@dataclass
class MlpModelConfig(ModelConfig):
    hidden: list[int] = field(default_factory=lambda: [512, 256])  # hidden widths (times width_mult)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(all(isinstance(h, int) and h >= 1 for h in self.hidden), "model.hidden", list(self.hidden),
              "a list of hidden widths >= 1 ([] = a linear classifier)")


@dataclass
class RecurrentModelConfig(ModelConfig):
    cell: str = "lstm"          # rnn (tanh) or lstm
    hidden_size: int = 128      # units per layer (times width_mult)
    num_layers: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        from compress_run.models.recurrent import CELLS

        check(self.cell in CELLS, "model.cell", self.cell, ", ".join(CELLS))
        check(self.hidden_size >= 1, "model.hidden_size", self.hidden_size, "an integer >= 1")
        check(self.num_layers >= 1, "model.num_layers", self.num_layers, "an integer >= 1")


@dataclass
class TorchvisionModelConfig(ModelConfig):
    stem: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.stem in ("auto", "imagenet", "cifar"), "model.stem", self.stem, "auto, imagenet, cifar")


@dataclass
class AnyModelConfig(ModelConfig):
    """model=torchvision / model=timm: any model of that library by name."""
    name: str = MISSING


@dataclass
class VitModelConfig(ModelConfig):
    variant: str = MISSING
    patch_size: int = 0
    drop_path_rate: float = 0.0
    embed_dim: int | None = None   # null: the variant's (scaled by width_mult)
    num_heads: int | None = None
    depth: int | None = None
    mlp_ratio: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.patch_size >= 0, "model.patch_size", self.patch_size, "0 (auto) or a positive integer")
        for key in ("embed_dim", "num_heads", "depth", "mlp_ratio"):
            value = getattr(self, key)
            check(value is None or value > 0, f"model.{key}", value, "null (the variant's) or a positive number")
        if self.embed_dim is not None or self.num_heads is not None:
            check(self.embed_dim is not None and self.num_heads is not None and self.embed_dim % self.num_heads == 0
                  and self.width_mult == 1.0, "model.embed_dim", self.embed_dim,
                  "set together with model.num_heads (a divisor of it) and model.width_mult=1.0")
        if self.patch_size:
            check(self.image_size % self.patch_size == 0, "model.patch_size", self.patch_size,
                  f"a divisor of model.image_size={self.image_size} (or 0 for auto)")
        check(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", self.drop_path_rate, "[0, 1)")


@dataclass
class CausalLMModelConfig:
    """model=hf_causal_lm / smollm2_135m: a pretrained causal LM (models/causal_lm.py)."""
    _target_: str = MISSING
    name: str = MISSING
    gguf_file: str | None = None
    offline: bool = True
    dtype: str = "float32"

    def __post_init__(self) -> None:
        from compress_run.models.causal_lm import DTYPES

        check(self.dtype in DTYPES, "model.dtype", self.dtype, ", ".join(DTYPES))


@dataclass
class TinyLlamaModelConfig:
    """model=tiny_llama: a LLaMA built from scratch over bytes (models/causal_lm.py)."""
    _target_: str = MISSING
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 384
    context_length: int = 1024
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for key in ("hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "context_length"):
            check(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "an integer >= 1")
        check(self.hidden_size % self.heads == 0 and self.heads % self.kv_heads == 0, "model.heads",
              (self.hidden_size, self.heads, self.kv_heads),
              "hidden_size a multiple of heads, heads a multiple of kv_heads")


@dataclass
class RecurrentLMModelConfig:
    """model=lstm_lm: a character-level recurrent language model over bytes (models/recurrent.py)."""
    _target_: str = MISSING
    cell: str = "lstm"
    hidden_size: int = 256
    num_layers: int = 2
    embed_dim: int = 64

    def __post_init__(self) -> None:
        from compress_run.models.recurrent import CELLS

        check(self.cell in CELLS, "model.cell", self.cell, ", ".join(CELLS))
        for key in ("hidden_size", "num_layers", "embed_dim"):
            check(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "an integer >= 1")


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
    input_domain: str = "spatial"     # spatial | dct (pipeline/network_input.py)
    input_size: int | None = None     # spatial: resize the (augmented) image to this side; null = as it is
    dct_block: int = 8                # dct: block side (the frequency channels per colour plane are its square)
    dct_upsample: int = 1             # dct: bilinear upsampling before the DCT (the paper: 2 on ImageNet)
    dct_channels: Any = None          # dct: null (all), channel indices, or a method=freq_select run dir

    def __post_init__(self) -> None:
        check(self.input_domain in ("spatial", "dct"), "dataset.input_domain", self.input_domain, "spatial or dct")
        check(self.dct_block >= 2, "dataset.dct_block", self.dct_block, "an integer >= 2")
        check(self.dct_upsample >= 1, "dataset.dct_upsample", self.dct_upsample, "an integer >= 1")
        check(self.input_size is None or self.input_size >= 4, "dataset.input_size", self.input_size,
              "an integer >= 4, or null")
        check(0.0 < self.val_fraction < 0.5, "dataset.val_fraction", self.val_fraction, "(0, 0.5)")
        check(self.num_workers >= 0, "dataset.num_workers", self.num_workers, "an integer >= 0")
        check(len(self.mean) == len(self.std) == self.in_channels, "dataset.mean/std",
              (self.mean, self.std), f"lists of length dataset.in_channels={self.in_channels}")


@dataclass
class SyntheticDatasetConfig(DatasetConfig):
    num_train: int = 512
    num_test: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.num_train >= 8 and self.num_test >= 1, "dataset.num_train/num_test",
              (self.num_train, self.num_test), "num_train >= 8 and num_test >= 1")


@dataclass
class TextDatasetConfig:
    """dataset=text / shakespeare: token windows of text files split by work (pipeline/text_data.py)."""
    _target_: str = MISSING
    root: str | None = None
    works: dict[str, list[str]] = field(default_factory=dict)
    seq_len: int = 512
    calib_stride: int | None = None     # calibration windows every this many tokens; null = seq_len / 4
    max_eval_sequences: int | None = 64  # test / ood windows evaluated (evenly spaced); null = all
    num_workers: int = 0
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        from compress_run.pipeline.text_data import SPLITS

        check(self.seq_len >= 2, "dataset.seq_len", self.seq_len, "an integer >= 2")
        check(self.calib_stride is None or self.calib_stride >= 1, "dataset.calib_stride", self.calib_stride,
              "an integer >= 1, or null (seq_len / 4)")
        check(self.max_eval_sequences is None or self.max_eval_sequences >= 1, "dataset.max_eval_sequences",
              self.max_eval_sequences, "an integer >= 1, or null (every window)")
        check(self.num_workers >= 0, "dataset.num_workers", self.num_workers, "an integer >= 0")
        unknown = [k for k in self.works if k not in SPLITS]
        check(not unknown, "dataset.works", dict(self.works), f"a mapping of {list(SPLITS)} to lists of works")
        held_out = [w for split in ("test", "ood") for w in self.works.get(split, [])]
        seen = [w for split in ("train", "calibration") for w in set(self.works.get(split, []))]
        shared = sorted({w for w in held_out if held_out.count(w) > 1 or w in seen})
        check(not shared, "dataset.works", shared,
              "test and ood works in one split only (a test work in another split leaks it; train and calibration "
              "may share works)")


@dataclass
class ShakespeareDatasetConfig(TextDatasetConfig):
    editions: str = "modern"   # modern | all (each play's First Folio edition too, in its play's split)
    data_dir: str = "data"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.editions in ("modern", "all"), "dataset.editions", self.editions, "modern or all")


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

        check(self.kind in KINDS, "distill.kind", self.kind, ", ".join(KINDS))
        check(0.0 <= self.alpha <= 1.0, "distill.alpha", self.alpha, "a float in [0, 1]")
        check(self.temperature > 0, "distill.temperature", self.temperature, "a float > 0")
        check(all(s in ("train", "finetune") for s in self.stages), "distill.stages", list(self.stages),
              "a subset of [train, finetune]")
        check(not (self.teacher == "train" and "train" in self.stages), "distill.stages", list(self.stages),
              "[finetune] with distill.teacher=train (the train stage cannot distil from its own result)")


# ----------------------------------------------------------------------------------------- noise
@dataclass
class NoiseConfig(NoiseSpec):
    """The ``noise`` group: noisy analog computation of the matrix products (core/analog_noise.py) at evaluation
    (``evaluate.noise_snr_db`` sweeps ``snr_db``) and, in ``train_stages``, in the training forward passes."""
    train_stages: list[str] = field(default_factory=list)  # stages that train under the noise (noise injection)
    train_snr_db: float | None = None   # SNR of the training noise; null: snr_db
    train_weight_noise: float | None = None  # weight noise in training; null: weight_noise
    seed: int = 0                       # seed of the evaluation noise

    def __post_init__(self) -> None:
        check_noise_fields(self, "noise")
        check(all(s in ("train", "finetune", "quantize") for s in self.train_stages), "noise.train_stages",
              list(self.train_stages), "a subset of [train, finetune, quantize]")
        snr = self.train_snr_db
        check(snr is None or (isinstance(snr, int | float) and snr == snr and snr != float("-inf")),
              "noise.train_snr_db", snr, "null (= noise.snr_db), inf, or a number of dB")
        noise = self.train_weight_noise
        check(noise is None or (isinstance(noise, int | float) and 0 <= noise < float("inf")),
              "noise.train_weight_noise", noise, "null (= noise.weight_noise) or a float >= 0")
        check(not self.train_stages or self.training_spec().active(), "noise.train_stages", list(self.train_stages),
              "[] unless the noise does something: set noise.train_snr_db (or snr_db), weight_noise or bits")

    def spec(self) -> NoiseSpec:
        """The noise model without the training and seed keys."""
        return spec_from(self)

    def training_spec(self) -> NoiseSpec:
        """The noise model of the training forward passes (``train_snr_db`` / ``train_weight_noise`` in place of
        ``snr_db`` / ``weight_noise`` where set)."""
        spec = at_snr(self.spec(), self.training_snr())
        if self.train_weight_noise is not None:
            spec.weight_noise = self.train_weight_noise
        return spec

    def training_snr(self) -> float | None:
        return self.snr_db if self.train_snr_db is None else self.train_snr_db


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
    weight_decay: float | None = None   # this stage's weight decay; null = schedule.optimizer's

    def check(self, stage: str) -> None:
        check(self.epochs >= 0, f"schedule.{stage}.epochs", self.epochs, "an integer >= 0")
        check(self.weight_decay is None or self.weight_decay >= 0, f"schedule.{stage}.weight_decay",
              self.weight_decay, "a float >= 0, or null (the optimizer's)")
        check(self.lr > 0, f"schedule.{stage}.lr", self.lr, "a float > 0")
        check(self.lr_schedule in ("cosine", "step", "constant"), f"schedule.{stage}.lr_schedule",
              self.lr_schedule, "cosine, step, constant")
        check(0 <= self.warmup_epochs <= max(self.epochs, 0), f"schedule.{stage}.warmup_epochs",
              self.warmup_epochs, f"a float in [0, epochs={self.epochs}]")
        check(0 < self.epoch_fraction <= 1, f"schedule.{stage}.epoch_fraction", self.epoch_fraction, "(0, 1]")


@dataclass
class AugmentConfig:
    """DeiT's training-data recipe on top of the dataset's own augmentation (``pipeline/data.py``)."""
    rand_augment: str | None = None     # timm policy, e.g. rand-m9-mstd0.5-inc1 (per image: ImageFolder data only)
    random_erasing: float = 0.0         # probability per image (timm RandomErasing, pixel mode; ImageFolder only)
    mixup: float = 0.0                  # Mixup's Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0                 # CutMix's Beta(alpha, alpha); 0 = off (both on: one of the two per batch)
    repeats: int = 1                    # repeated augmentation: each drawn example this many times (DeiT: 3)

    def __post_init__(self) -> None:
        check(0.0 <= self.random_erasing <= 1.0, "schedule.augment.random_erasing", self.random_erasing,
              "a probability in [0, 1]")
        check(self.mixup >= 0 and self.cutmix >= 0, "schedule.augment.mixup/cutmix", (self.mixup, self.cutmix),
              "Beta alphas >= 0 (0 = off)")
        check(self.repeats >= 1, "schedule.augment.repeats", self.repeats, "an integer >= 1 (1 = off)")


@dataclass
class ScheduleConfig:
    batch_size: int = 128
    eval_batch_size: int = 512
    label_smoothing: float = 0.0
    decay_norm_and_bias: bool = True
    # no default: a schedule names its whole optimizer (a default dict would merge SGD's keys into an AdamW's)
    optimizer: dict[str, Any] = field(default_factory=dict)
    train: StageSchedule = field(default_factory=StageSchedule)
    finetune: StageSchedule = field(default_factory=StageSchedule)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # train and finetune batches

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "schedule.batch_size", self.batch_size, "an integer >= 1")
        check(self.eval_batch_size >= 1, "schedule.eval_batch_size", self.eval_batch_size, "an integer >= 1")
        check(0.0 <= self.label_smoothing < 1.0, "schedule.label_smoothing", self.label_smoothing, "[0, 1)")
        check("_target_" in self.optimizer, "schedule.optimizer", self.optimizer,
              "an optimizer with its _target_ (e.g. {_target_: torch.optim.SGD, _partial_: true, momentum: 0.9})")
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
        check(self.accelerator in ("cpu", "gpu", "cuda", "mps", "auto"), "trainer.accelerator",
              self.accelerator, "cpu, gpu, cuda, mps, auto")
        check(self.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches",
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
    int8_host: bool = True              # quantized models: run the int8 graph through ONNX Runtime (acc + latency)
    deploy_latency: bool = True         # with measure_latency: also time the network run by ONNX Runtime
    noise_snr_db: list[float] | None = None  # accuracy under the `noise` model at each SNR (dB; inf: none)
    noise_votes: list[int] = field(default_factory=lambda: [1])  # K noisy passes voted per prediction
    noise_vote: str = "majority"        # majority (argmax counts) or mean_logit

    def __post_init__(self) -> None:
        known = available_profiles()
        unknown = [h for h in self.hardware or [] if h not in known]
        check(not unknown, "evaluate.hardware", list(self.hardware or []),
              f"a list of hardware profiles from {known} (unknown: {unknown})")
        check(self.batch_size >= 1, "evaluate.batch_size", self.batch_size, "an integer >= 1")
        check(self.warmup >= 0, "evaluate.warmup", self.warmup, "an integer >= 0")
        check(self.repeats >= 1, "evaluate.repeats", self.repeats, "an integer >= 1")
        check(self.breakdown >= 0, "evaluate.breakdown", self.breakdown, "an integer >= 0 (0 = off)")
        check(self.export in (None, "onnx"), "evaluate.export", self.export, "null or onnx")
        check(self.kernels in ("measured", "simulated"), "evaluate.kernels", self.kernels, "measured or simulated")
        levels = self.level if isinstance(self.level, list | tuple) else [self.level] if self.level is not None else []
        check(all(isinstance(v, int | float) and 0 < v < 1 for v in levels), "evaluate.level", self.level,
              "null (the densest level), one of method.levels, or a list of them, one per segment")
        check(self.latency_budget_ms is None or self.latency_budget_ms > 0, "evaluate.latency_budget_ms",
              self.latency_budget_ms, "null or a float > 0 (milliseconds, simulated batch 1)")
        snrs = list(self.noise_snr_db or [])
        check(self.noise_snr_db is None or (snrs and all(v == v and v != float("-inf") for v in snrs)),
              "evaluate.noise_snr_db", self.noise_snr_db, "null or a non-empty list of SNRs in dB (numbers or inf)")
        check(bool(self.noise_votes) and all(isinstance(k, int) and 1 <= k <= 1000 for k in self.noise_votes),
              "evaluate.noise_votes", list(self.noise_votes), "a non-empty list of pass counts from 1 to 1000")
        check(self.noise_vote in ("majority", "mean_logit"), "evaluate.noise_vote", self.noise_vote,
              "majority or mean_logit")


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
    start_from: str | None = None  # a run dir whose finished train/compress/finetune stages this run takes over
    model: Any = MISSING
    dataset: Any = MISSING
    method: Any = MISSING
    hardware: Any = MISSING
    quant: Any = None
    noise: Any = None
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
        check(not bad, "stages", list(self.stages), f"a subset of {list(STAGES)} (unknown: {bad})")
        order = [STAGES.index(s) for s in self.stages]
        check(order == sorted(set(order)), "stages", list(self.stages),
              f"stage names without repeats, in pipeline order {list(STAGES)}")


SCHEMAS: dict[tuple[str | None, str], type] = {
    (None, "base_config"): RootConfig,
    ("model", "base_model"): ModelConfig,
    ("model", "base_model_torchvision"): TorchvisionModelConfig,
    ("model", "base_model_vit"): VitModelConfig,
    ("model", "base_model_mlp"): MlpModelConfig,
    ("model", "base_model_recurrent"): RecurrentModelConfig,
    ("model", "base_model_recurrent_lm"): RecurrentLMModelConfig,
    ("model", "base_model_any"): AnyModelConfig,
    ("model", "base_model_causal_lm"): CausalLMModelConfig,
    ("model", "base_model_tiny_llama"): TinyLlamaModelConfig,
    ("dataset", "base_dataset"): DatasetConfig,
    ("dataset", "base_dataset_synthetic"): SyntheticDatasetConfig,
    ("dataset", "base_dataset_text"): TextDatasetConfig,
    ("dataset", "base_dataset_shakespeare"): ShakespeareDatasetConfig,
    ("hardware", "base_hardware"): HardwareConfig,
    ("schedule", "base_schedule"): ScheduleConfig,
    ("trainer", "base_trainer"): TrainerConfig,
    ("logger", "base_logger"): LoggerConfig,
    ("logger", "base_logger_wandb"): WandbLoggerConfig,
    ("noise", "base_noise"): NoiseConfig,
}


def method_schemas() -> dict[str, type]:
    """Every method's config dataclass, registered by its own module (``methods.base.method_config``)."""
    import compress_run.methods as methods
    from compress_run.methods.base import METHOD_CONFIGS

    for module in pkgutil.iter_modules(methods.__path__):
        name = f"compress_run.methods.{module.name}"
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a module that is there but misses a dependency: a real error
                raise
            # listed, then deleted before it was imported: not a method any more (a test's toy method does this)
    return dict(METHOD_CONFIGS)


def quant_schemas() -> dict[str, type]:
    """Every quantizer's config dataclass (``methods.base.quant_config``; registered when the methods load)."""
    from compress_run.methods.base import QUANT_CONFIGS

    method_schemas()
    return dict(QUANT_CONFIGS)


def register_schemas() -> None:
    cs = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        cs.store(group=group, name=name, node=node)
    for name, node in method_schemas().items():
        cs.store(group="method", name=name, node=node)
    for name, node in quant_schemas().items():
        cs.store(group="quant", name=name, node=node)
