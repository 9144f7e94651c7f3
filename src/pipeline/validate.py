"""Validation of the composed config before any work, and the output-dir guard for resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from compress_run.core.errors import UserError
from compress_run.pipeline.checkpoints import atomic_write_json, atomic_write_text

# Keys that do not change what a run computes; they may differ when a run is resumed.
NON_RESULT_KEYS = ("output_dir", "stages", "tags", "logger", "paths", "dataset.num_workers",
                   "trainer.enable_model_summary", "trainer.log_every_n_steps", "hardware", "evaluate", "start_from",
                   "noise")
# Keys a run may differ in from the run whose stages it takes over (start_from): they act after finetune
AFTER_FINETUNE_KEYS = ("quant", "task_name")
# Keys that only change what the evaluate stage reports: a change re-runs that stage alone.
# (the noise group is one of them unless noise.train_stages trains under it: result_config keeps it then)
EVALUATE_KEYS = ("hardware", "evaluate", "noise")
# evaluate keys added after runs were recorded, with their defaults (a finished run is not evaluated again for them)
LATER_EVALUATE_DEFAULTS = {"noise_snr_db": None, "noise_votes": [1], "noise_vote": "majority"}


def validate(cfg: DictConfig) -> None:
    """Convert every group to its dataclass schema (running the range checks) and cross-check groups."""
    language_model = "num_classes" not in cfg.model  # before resolving: an image model reads ${dataset.num_classes}
    text = "seq_len" in cfg.dataset
    if language_model != text:
        raise UserError(f"model={_target(cfg.model)} is "
                        f"{'a causal language model' if language_model else 'an image model'} but "
                        f"dataset={_target(cfg.dataset)} holds {'text' if text else 'images'}",
                        "pair a causal LM (model=tiny_llama, smollm2_135m, hf_causal_lm) with a text dataset "
                        "(dataset=shakespeare, text) and an image model with an image dataset")
    try:
        OmegaConf.to_object(cfg)
    except (ValueError, OmegaConfBaseException) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ValueError) else exc
        msg = str(cause).split("\n")[0]
        key = msg.split("=", 1)[0] if "=" in msg and " " not in msg.split("=", 1)[0] else "the value"
        raise UserError(f"invalid configuration: {msg}",
                        f"set {key} to an allowed value on the command line or in the experiment config; "
                        "`compress-run --cfg job` shows the composed config") from exc
    if cfg.evaluate.get("export") == "onnx":
        from compress_run.pipeline.export import check_export_available

        check_export_available()
    model, data = cfg.model, cfg.dataset
    for key in () if language_model else ("num_classes", "in_channels", "image_size"):
        if model[key] != data[key]:
            raise UserError(f"model.{key}={model[key]} does not match dataset.{key}={data[key]}",
                            f"drop the model.{key} override (it follows the dataset by default) or choose "
                            "a dataset that has this shape")
    method = cfg.method
    train_epochs = cfg.schedule.train.epochs
    if "end_epoch" in method and method.end_epoch is not None and method.end_epoch > train_epochs:
        raise UserError(f"method.end_epoch={method.end_epoch} is after the end of the train stage "
                        f"(schedule.train.epochs={train_epochs})",
                        f"set method.end_epoch <= {train_epochs} or null (= 3/4 of the train stage)")
    if "start_epoch" in method and method.start_epoch >= max(train_epochs, 1e-9):
        raise UserError(f"method.start_epoch={method.start_epoch} is not before the end of the train stage "
                        f"(schedule.train.epochs={train_epochs})", "choose a smaller method.start_epoch")
    if method.get("remove_data_epoch") is not None and method.remove_data_epoch >= train_epochs:
        raise UserError(f"method.remove_data_epoch={method.remove_data_epoch} is not before the end of the train "
                        f"stage (schedule.train.epochs={train_epochs})",
                        f"set method.remove_data_epoch < {train_epochs}, or null (epoch 70 of 160, scaled)")
    if method.get("rewind_epoch") and method.rewind_epoch > train_epochs:
        raise UserError(f"method.rewind_epoch={method.rewind_epoch} is after the end of the train stage "
                        f"(schedule.train.epochs={train_epochs})",
                        f"set method.rewind_epoch <= {train_epochs} (0 rewinds to the original init)")
    check_trainer(cfg.trainer)
    quant, trainer = cfg.get("quant"), cfg.trainer
    if quant is not None and quant.get("hypernet"):
        several = several_processes(trainer)
        if several or trainer.accumulate_grad_batches != 1:
            setting = (f"trainer.devices={trainer.devices}, trainer.num_nodes={trainer.num_nodes}" if several
                       else f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}")
            raise UserError(f"quant.hypernet=true needs one process and one backward pass per step ({setting}): "
                            "the hypernetwork feeds each step's gradient into the next step's graph",
                            "train the quantize stage with trainer=cpu and accumulate_grad_batches=1, "
                            "or set quant.hypernet=false")
        optimizer = str(cfg.schedule.optimizer.get("_target_"))
        if optimizer != "torch.optim.SGD":
            raise UserError(f"quant.hypernet=true steps the quantized layers by SGD's update rule with the "
                            f"hypernetwork's output as the gradient, but schedule.optimizer is {optimizer}",
                            "use a schedule with torch.optim.SGD (e.g. schedule=fmnist), or set quant.hypernet=false")
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={cfg.trainer.accelerator} was requested but this machine has "
                        "no usable CUDA device", "use trainer=cpu (or trainer=ddp_cpu) here")


def _target(node: DictConfig) -> str:
    return str(node.get("_target_", "?")).rsplit(".", 1)[-1]


def several_processes(trainer: DictConfig) -> bool:
    """Whether the trainer config may start more than one data-parallel process."""
    return str(trainer.devices) not in ("1", "[0]") or trainer.num_nodes != 1


def _device_spec_ok(devices: Any) -> bool:
    """Lightning's forms: auto, a count >= 1 (-1: all), a list of indices, or those as a string ("2", "0,1")."""
    if OmegaConf.is_list(devices):
        return len(devices) > 0 and all(isinstance(d, int) and d >= 0 for d in devices)
    if isinstance(devices, str) and devices != "auto":
        parts = [p.strip() for p in devices.split(",") if p.strip()]
        if not parts or not all(p.lstrip("-").isdigit() for p in parts):
            return False
        return "," in devices or _device_spec_ok(int(parts[0]))
    return devices == "auto" or (isinstance(devices, int) and (devices >= 1 or devices == -1))


def check_trainer(trainer: DictConfig) -> None:
    """The trainer keys Lightning would otherwise reject with a traceback mid-run: devices, precision, strategy."""
    import typing

    from lightning.fabric import connector
    from lightning.pytorch.strategies import StrategyRegistry

    fix = "`compress-run --cfg job` shows the composed trainer group; trainer=cpu is one CPU process"
    devices = trainer.devices
    if not _device_spec_ok(devices):
        raise UserError(f"trainer.devices={devices} is not a device count or list",
                        f"set trainer.devices to a count >= 1 (-1: all), auto, or a list of device indices; {fix}")
    precisions = [*typing.get_args(connector._PRECISION_INPUT_STR),
                  *typing.get_args(connector._PRECISION_INPUT_STR_ALIAS)]
    if str(trainer.precision) not in precisions:
        raise UserError(f"trainer.precision={trainer.precision} is not a precision Lightning knows",
                        f"use one of {', '.join(precisions)} (32-true on the CPU); {fix}")
    strategies = ["auto", *StrategyRegistry.available_strategies()]
    if str(trainer.strategy) not in strategies:
        raise UserError(f"trainer.strategy={trainer.strategy} is not a strategy Lightning knows",
                        f"use auto (one process), ddp or ddp_spawn (several; trainer=ddp_cpu on the CPU), or one of "
                        f"{', '.join(strategies[3:8])}, ...; {fix}")
    if trainer.num_nodes < 1:
        raise UserError(f"trainer.num_nodes={trainer.num_nodes} is below 1", f"set trainer.num_nodes >= 1; {fix}")


def _drop(container: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        container = container.get(p, {})
        if not isinstance(container, dict):
            return
    container.pop(leaf, None)


def result_config(cfg: DictConfig) -> dict[str, Any]:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    noise = resolved.get("noise")
    for key in NON_RESULT_KEYS:
        _drop(resolved, key)
    if noise and noise.get("train_stages"):  # what the training noise is; the evaluation's keys stay out
        training = {k: v for k, v in noise.items() if k not in ("seed", "train_snr_db", "train_weight_noise")}
        for key in ("snr_db", "weight_noise"):
            if noise.get(f"train_{key}") is not None:
                training[key] = noise[f"train_{key}"]
        resolved["noise"] = training
    return resolved


def evaluate_fingerprint(cfg: DictConfig) -> str:
    part = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in EVALUATE_KEYS
            if k in cfg and cfg[k] is not None}
    for key, default in LATER_EVALUATE_DEFAULTS.items():  # at its default, a later key leaves old runs' prints
        if part["evaluate"].get(key, default) == default:
            part["evaluate"].pop(key, None)
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(cfg: DictConfig) -> str:
    return hashlib.sha256(json.dumps(result_config(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_output_dir(cfg: DictConfig, out: Path) -> str:
    """Refuse to resume a run directory that was made with different result-relevant settings."""
    fp = fingerprint(cfg)
    run_file = out / "run.json"
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{run_file} is unreadable ({exc})",
                            "delete the output directory or choose a new output_dir") from exc
        if previous.get("fingerprint") != fp:
            diffs = differences(previous.get("config", {}), result_config(cfg))
            raise UserError(f"output dir {out} holds a run made with different settings "
                            f"({'; '.join(diffs[:5]) or 'fingerprint differs'})",
                            "rerun with the original settings to resume it, or choose a new output_dir")
    return fp


def write_run_config(cfg: DictConfig, out: Path, overrides: list[str], fp: str) -> None:
    atomic_write_text(out / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_text(out / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    if not (out / "run.json").is_file():
        atomic_write_json(out / "run.json", {"fingerprint": fp, "config": result_config(cfg)})


def train_inputs(cfg: DictConfig, method_trains_plainly: bool) -> dict[str, Any]:
    """The settings the train stage's result depends on: all result-relevant ones but the task name, quant,
    the finetune schedule, distillation outside the train stage, and the method when it trains plainly
    (``Method.trains_plainly``). Two runs with equal train inputs train the same network."""
    part = result_config(cfg)
    for key in ("task_name", "quant", "experiment"):
        part.pop(key, None)
    part.get("schedule", {}).pop("finetune", None)
    if method_trains_plainly:
        part["method"] = "plain training (no method hook in the train stage)"
    distill = part.pop("distill", None) or {}
    if distill.get("teacher") and "train" in (distill.get("stages") or []):
        part["distill"] = distill
    noise = part.pop("noise", None) or {}
    if "train" in (noise.get("train_stages") or []):
        part["noise"] = noise
    return part


def differences(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    old, new = _flatten(theirs), _flatten(ours)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def train_differences(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """:func:`differences` of two runs' :func:`train_inputs`, a plainly training method against one that acts
    in the train stage said in one line instead of key by key."""
    theirs, ours = dict(theirs), dict(ours)
    old, new = theirs.pop("method", None), ours.pop("method", None)
    if old != new and (isinstance(old, str) or isinstance(new, str)):
        return [f"method: {_train_role(old)} -> {_train_role(new)}", *differences(theirs, ours)]
    return differences({**theirs, "method": old}, {**ours, "method": new})


def _train_role(method: Any) -> str:
    if not isinstance(method, dict):
        return str(method)
    return f"{str(method.get('_target_', '?')).rsplit('.', 1)[-1]}, which acts in the train stage"


def start_from_differences(cfg: DictConfig, base: Path) -> list[str]:
    """Result-relevant settings in which ``cfg`` differs from the run in ``base`` (quant and the task name aside)."""
    previous = json.loads((base / "run.json").read_text())
    ours = result_config(cfg)
    theirs = dict(previous.get("config", {}))
    for key in AFTER_FINETUNE_KEYS:
        ours.pop(key, None)
        theirs.pop(key, None)
    return differences(theirs, ours)
