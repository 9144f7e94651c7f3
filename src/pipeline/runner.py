"""The stage runner: train -> compress -> finetune -> (quantize) -> evaluate, resumable in its output directory.

Layout of an output directory::

    .hydra/config.yaml, .hydra/overrides.yaml   composed config (written after validation)
    run.json                                     config fingerprint (guards resume against changes)
    checkpoints/<stage>.ckpt                     final checkpoint of each finished stage
    checkpoints/<stage>-last.ckpt                epoch checkpoint of an unfinished stage
    stages/<stage>.json                          stage record; its presence marks the stage finished
    csv/<stage>/metrics.csv                      Lightning CSV logs (logger=csv)
    results.json                                 everything, written at the end

A stage is finished once its JSON record exists (written atomically after its checkpoint). Rerunning
the same command skips finished stages and resumes an unfinished fit from its ``-last`` checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, RichModelSummary, RichProgressBar
from omegaconf import DictConfig, OmegaConf

from compress_run.core.compaction import is_compacted
from compress_run.core.errors import UserError
from compress_run.core.factorized import is_factorized
from compress_run.core.frequency_input import selected_input_channels
from compress_run.core.masks import sparsity_report
from compress_run.core.nesting import level_count
from compress_run.core.quantization import model_bytes, quantization_report
from compress_run.hardware.deploy import deployed_latency_metrics
from compress_run.hardware.int8_host import int8_host_metrics
from compress_run.hardware.llm_cost import llm_hardware_metrics
from compress_run.hardware.llm_int8 import llm_int8_metrics
from compress_run.hardware.profile import load_profile
from compress_run.hardware.report import hardware_metrics, plot_breakdown, print_breakdown
from compress_run.methods.base import Method, NotApplicable, Quantizer
from compress_run.methods.calibration import calibration_batches
from compress_run.methods.distill import Distillation
from compress_run.models.causal_lm import is_causal_lm, pretrained_original
from compress_run.models.frequency_stem import image_weights_for_frequency_input
from compress_run.pipeline.callbacks import (
    EpochLength,
    EpochLine,
    EpochSeed,
    RankAgreement,
    TrainingClock,
    reseed,
)
from compress_run.pipeline.checkpoints import (
    DISK_FULL,
    AtomicCheckpointIO,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    disk_full,
    load_checkpoint,
    load_net_state,
    lock_output_dir,
    net_state_from_checkpoint,
    unlock_output_dir,
)
from compress_run.pipeline.export import export_onnx
from compress_run.pipeline.levels import check_choice, evaluate_levels
from compress_run.pipeline.lit_module import ClassifierModule
from compress_run.pipeline.lm_module import LM_KEYS, CausalLMModule, lm_metrics
from compress_run.pipeline.network_input import adapt_network
from compress_run.pipeline.noise_eval import RunNoise, fitting_stages
from compress_run.pipeline.provenance import LoadMonitor, code_version
from compress_run.pipeline.results import build_results, print_summary, read_json
from compress_run.pipeline.schema import STAGES
from compress_run.pipeline.validate import (
    check_output_dir,
    evaluate_fingerprint,
    several_processes,
    start_from_differences,
    train_differences,
    train_inputs,
    validate,
    write_run_config,
)

CHECKPOINT_FORMAT = 1
ACCURACY_KEYS = ("test/acc", "test/loss", "val/acc", "val/loss")
INT8_CALIB_IMAGES = 256  # train images ONNX Runtime calibrates the int8 graph's other tensors (layer outputs) on


def build(cfg_node: DictConfig, what: str, **kwargs: Any) -> Any:
    """The one place that calls Hydra's instantiate (Hydra 1.4 adds target allow-lists here)."""
    try:
        return instantiate(cfg_node, **kwargs)
    except Exception as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, UserError):
            raise cause from exc
        if isinstance(cause, ValueError | TypeError):
            raise UserError(f"{what} config could not be built: {cause}",
                            f"correct the {what} keys (`compress-run --cfg job` shows the composed config)") from exc
        raise


class Pipeline:
    def __init__(self, cfg: DictConfig, out_dir: Path, overrides: list[str], choices: dict[str, str]) -> None:
        self.cfg, self.out = cfg, Path(out_dir)
        self.overrides, self.choices = overrides, choices
        self.ckpt_dir, self.stage_dir = self.out / "checkpoints", self.out / "stages"
        self.records: dict[str, dict[str, Any]] = {}
        self.fit_clocks: list[TrainingClock] = []  # the clocks of the current stage's fits
        self.loaded_from: str | None = None  # the stage whose checkpoint the current net was loaded from
        self.redo: set[str] = set()          # finished stages to run again (evaluate after settings changed)
        self.stage: str | None = None        # the stage running now

    # ------------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        """Everything that can reject the command, before anything is written."""
        cfg = self.cfg
        self.code = code_version()  # the code this process runs, read before it runs
        validate(cfg)
        lock_output_dir(self.out)
        self.fingerprint = check_output_dir(cfg, self.out)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        self.datamodule = build(cfg.dataset, "dataset", batch_size=cfg.schedule.batch_size,
                                eval_batch_size=cfg.schedule.eval_batch_size, seed=cfg.seed,
                                recipe=OmegaConf.to_container(cfg.schedule.augment))
        self.method: Method = build(cfg.method, "method")
        self.method.model_factory = self.new_net
        self.method.input_shape = self.datamodule.network_input.shape
        self.method.network_input = self.datamodule.network_input
        self.method.hardware = load_profile(cfg.hardware)
        self.method.distill_config = OmegaConf.to_container(cfg.distill, resolve=True)
        self.quantizer: Quantizer | None = build(cfg.quant, "quant") if cfg.quant is not None else None
        if self.quantizer is not None:
            self.quantizer.input_shape = self.method.input_shape
            self.quantizer.task = getattr(self.datamodule, "task", "classification")
        self.check_teacher()
        net = self.new_net()
        self.causal_lm = is_causal_lm(net)
        task = "causal_lm" if self.causal_lm else "classification"
        kind = "a causal language model" if self.causal_lm else "an image classifier"
        for what, part in (("method", self.method), ("quant", self.quantizer)):
            if part is not None and task not in part.tasks:
                model = self.choices.get("model")
                raise UserError(f"{what}={self.choices.get(what)} cannot be applied to model={model}, {kind}: "
                                f"{part.task_note}", f"choose a {what} that applies to {kind.split(' ', 1)[1]}s "
                                "(docs/llm.md lists the ones for causal LMs)")
        if self.causal_lm:
            self.bind_language_model(net)
        try:
            self.method.check_applicable(net)
        except NotApplicable as exc:
            raise UserError(f"method={self.choices.get('method')} cannot be applied to "
                            f"model={self.choices.get('model')}: {exc}",
                            "change method.exclude or pick another model/method combination") from exc
        if several_processes(cfg.trainer):
            try:
                self.method.check_distributed()
            except NotApplicable as exc:
                raise UserError(f"method={self.choices.get('method')} cannot train in several processes "
                                f"(trainer.devices={cfg.trainer.devices}, trainer.num_nodes={cfg.trainer.num_nodes}): "
                                f"{exc}", "use a one-process trainer (trainer=cpu or trainer=gpu)") from exc
        if self.quantizer is not None:
            try:
                self.quantizer.check_applicable(net)
            except NotApplicable as exc:
                raise UserError(f"quant={self.choices.get('quant')} cannot quantize model={self.choices.get('model')}: "
                                f"{exc}", "change quant.exclude or choose another quant option") from exc
            if self.quantizer.training() is not None and getattr(self.method, "levels", None):
                raise UserError(f"quant={self.choices.get('quant')} trains the network, but method="
                                f"{self.choices.get('method')} makes a multi-level model whose levels share their "
                                "weights: training one level would change the others unseen",
                                "quantize a multi-level model after training (quant=w8a8), or train a single sparsity")
        self.noise = RunNoise(cfg, self.method.training_noise(), self.causal_lm)
        self.noise.check(net, self.choices.get("noise"), fitting_stages(cfg, self.method.stages, self.quantizer))
        self.pretrained = bool(getattr(net, "pretrained", False))
        # the pretrained LM as loaded, sharing the process's cached weights (KL and agreement compare with it)
        self.original = pretrained_original(net) if self.causal_lm and self.pretrained else None
        self.plain_train = self.method.trains_plainly()
        self.train_inputs = train_inputs(cfg, self.plain_train)
        net = self.method.prepare(net)
        check_choice(self.cfg.evaluate.get("level"), self.cfg.evaluate.get("latency_budget_ms"), self.method, net,
                     self.choices.get("method"))
        self.datamodule.setup("fit")
        calibration_split = getattr(self.datamodule, "unaugmented_train_set", None) or self.datamodule.train_set
        for what, part in (("method", self.method), ("quant", self.quantizer)):
            try:
                if part is not None:
                    part.check_data(len(calibration_split))
            except NotApplicable as exc:
                raise UserError(f"{what}={self.choices.get(what)} cannot use dataset={self.choices.get('dataset')}: "
                                f"{exc}", f"lower {what}.calib_size or use a larger train split") from exc
        if cfg.init_ckpt and not self.finished("train"):
            self.load_into(net, Path(cfg.init_ckpt), "init_ckpt",
                           "point init_ckpt at a checkpoint of this model (e.g. checkpoints/train.ckpt of an "
                           "earlier run with the same model and dataset) or set init_ckpt=null",
                           convert=image_weights_for_frequency_input)
        if cfg.start_from:
            self.take_over_stages(Path(cfg.start_from))
        for stage in STAGES:
            if self.finished(stage):
                self.records[stage] = read_json(self.stage_dir / f"{stage}.json")
        evaluated = self.records.get("evaluate", {})
        if evaluated.get("status") == "done" and evaluated.get("evaluate_fingerprint") != evaluate_fingerprint(cfg):
            self.redo.add("evaluate")
            self.log("stage evaluate: hardware/evaluate settings changed, evaluating again")
        pending = [s for s in STAGES if not self.finished(s) and not self.skip_reason(s)]
        # load the first pending stage's input now: a bad checkpoint is rejected before anything is written
        self.start_net = self.net_for(pending[0], net) if pending else net

    def bind_language_model(self, net: torch.nn.Module) -> None:
        """A causal LM: the text is tokenized with its tokenizer; methods, quantizers and settings that cannot act
        on a language model are refused here."""
        model = self.choices.get("model")
        self.datamodule.bind_tokenizer(net.tokenizer, net.context_length, net.vocab_size, model)
        if self.cfg.distill.teacher:
            raise UserError(f"distill.teacher={self.cfg.distill.teacher}: distillation is built for classifiers and "
                            f"model={model} is a causal language model", "set distill.teacher=null")
        if self.cfg.evaluate.get("export") == "onnx":
            raise UserError(f"evaluate.export=onnx exports image networks; model={model} is a causal language model",
                            "set evaluate.export=null")
        self.log(f"model {net.describe()['source']}: {net.describe()['params'] / 1e6:.1f} M parameters, "
                 f"{'pretrained' if net.pretrained else 'built from scratch'}")

    def lm_device(self) -> torch.device:
        """Where a causal LM is calibrated and evaluated outside Lightning's fits: the trainer's GPU if it has one."""
        gpu = str(self.cfg.trainer.accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        return torch.device("cuda" if gpu else "cpu")

    def reference_net(self) -> torch.nn.Module | None:
        """The uncompressed causal LM that KL and top-1 agreement compare against: this run's trained network
        (its train-stage checkpoint) or the pretrained one; None before either exists."""
        if getattr(self, "_reference", None) is None:
            if self.records.get("train", {}).get("status") == "done":
                net = self.new_net()
                self.load_into(net, self.ckpt_dir / "train.ckpt", "the train checkpoint",
                               "rerun with a new output_dir")
            elif getattr(self, "pretrained", False):
                net = self.original
            else:
                return None
            self._reference = net.eval()  # read under no_grad; the pretrained one shares the process's cached weights
        return self._reference

    def take_over_stages(self, base: Path) -> None:
        """Copy (hard-link) the finished stages of the run in ``base`` that this run would repeat: its train,
        compress and finetune stages when the settings differ only in ``quant`` (and the task name), so this run
        goes on with quantize and evaluate; else its train stage alone when both runs' train inputs are equal
        (e.g. two methods that train plainly, with the same model, data, seed and train schedule), so this run
        goes on with compress. Stages this run already finished are kept."""
        fix = ("point start_from at a finished run of the same model, dataset, seed and train settings, or set "
               "start_from=null")
        if not (base / "run.json").is_file():
            raise UserError(f"start_from={base} is not a compress-run output dir (it has no run.json)", fix)
        diffs = start_from_differences(self.cfg, base)
        stages = STAGES[: STAGES.index("quantize")]
        if diffs:
            train_record = base / "stages" / "train.json"
            theirs = read_json(train_record).get("train_inputs") if train_record.is_file() else None
            train_diffs = ["its train stage records no train inputs"] if theirs is None else \
                train_differences(theirs, self.train_inputs)
            if train_diffs:
                raise UserError(f"start_from={base} was made with other settings than this run "
                                f"({'; '.join(diffs[:5])}), and its train stage cannot be taken over either "
                                f"({'; '.join(train_diffs[:5])}); only quant (and evaluate, hardware, task_name) may "
                                "differ, or anything but the train inputs when only the train stage is taken over",
                                fix)
            stages = ("train",)
        taken = []
        for stage in stages:
            if self.finished(stage):
                continue
            record_file = base / "stages" / f"{stage}.json"
            if not record_file.is_file():
                raise UserError(f"start_from={base} has not finished its {stage} stage", fix)
            record = read_json(record_file)
            if record["status"] == "done":
                target = self.ckpt_dir / f"{stage}.ckpt"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                try:
                    os.link(base / "checkpoints" / f"{stage}.ckpt", target)
                except OSError:
                    shutil.copy2(base / "checkpoints" / f"{stage}.ckpt", target)
                record = {**record, "checkpoint": str(target), "taken_from": str(base)}
            atomic_write_json(self.stage_dir / f"{stage}.json", record)
            taken.append(stage)
        if taken:  # the dir now holds this run's stages: bind it to this run's settings
            write_run_config(self.cfg, self.out, self.overrides, self.fingerprint)
            self.log(f"stages {', '.join(taken)}: taken over from {base}")

    def new_net(self) -> torch.nn.Module:
        return adapt_network(build(self.cfg.model, "model"), self.datamodule.network_input,
                             self.choices.get("model", "?"))

    # ------------------------------------------------------------------------------- distillation
    def teacher_path(self) -> Path | None:
        """The teacher checkpoint of ``distill.teacher`` (None when distillation is off)."""
        teacher = self.cfg.distill.teacher
        if not teacher:
            return None
        if teacher == "train":
            return self.ckpt_dir / "train.ckpt"
        path = Path(teacher)
        if path.is_dir():
            found = [path / "checkpoints" / f"{s}.ckpt" for s in ("finetune", "compress", "train")]
            return next((p for p in found if p.is_file()), found[-1])
        return path

    def check_teacher(self) -> None:
        teacher = self.cfg.distill.teacher
        if not teacher:
            return
        if teacher == "train":
            if "train" not in self.cfg.stages or "train" not in self.method.stages:
                raise UserError(f"distill.teacher=train reads this run's train-stage checkpoint, but method="
                                f"{self.choices.get('method')} with stages={list(self.cfg.stages)} has no train stage",
                                "point distill.teacher at the checkpoint or output dir of a trained model")
            return
        load_checkpoint(self.teacher_path(), "distill.teacher",
                        "point distill.teacher at a compress-run checkpoint (checkpoints/<stage>.ckpt), a run's output "
                        "dir, or `train`; null turns distillation off")

    def distillation(self) -> Distillation | None:
        """The teacher of ``distill.teacher`` (built once: the model of its checkpoint, compression restored)."""
        path = self.teacher_path()
        if path is None:
            return None
        if getattr(self, "_teacher", None) is None:
            ckpt = load_checkpoint(path, "distill.teacher", "point distill.teacher at a finished stage checkpoint")
            made_for = ckpt.get("compress_run", {}).get("choices", {}).get("model")
            net = self.new_net() if made_for in (None, self.choices.get("model")) else self.model_named(made_for)
            self.load_into(net, path, "distill.teacher", "point distill.teacher at a checkpoint of a model for "
                           f"dataset={self.choices.get('dataset')}")
            self._teacher = net.eval().requires_grad_(False)
        d = self.cfg.distill
        return Distillation(self._teacher, kind=d.kind, alpha=float(d.alpha), temperature=float(d.temperature))

    def model_named(self, option: str) -> torch.nn.Module:
        """A fresh network of another conf/model option for this dataset (a teacher of another architecture)."""
        from hydra import compose, initialize_config_module
        from hydra.core.global_hydra import GlobalHydra

        overrides = [f"model={option}", f"dataset={self.choices.get('dataset')}"]
        if GlobalHydra.instance().is_initialized():
            cfg = compose(config_name="config", overrides=overrides)
        else:
            with initialize_config_module(config_module="compress_run.conf", version_base="1.3"):
                cfg = compose(config_name="config", overrides=overrides)
        return adapt_network(build(cfg.model, "distill.teacher model"), self.datamodule.network_input, option)

    def load_into(self, net: torch.nn.Module, path: Path, what: str, fix: str,
                  convert: Callable[[torch.nn.Module, dict], dict] | None = None) -> dict[str, Any]:
        ckpt = load_checkpoint(path, what, fix)
        state = net_state_from_checkpoint(ckpt)
        if convert is not None:  # init_ckpt: an RGB ResNet's weights initialise its DCT form
            state = convert(net, state)
        made_for = ckpt.get("compress_run", {}).get("choices", {})
        hint = f" (it was written for model={made_for.get('model')}, dataset={made_for.get('dataset')})" \
            if made_for else ""
        load_net_state(net, state, f"{what} {path} does not fit model={self.choices.get('model')} with "
                                   f"dataset={self.choices.get('dataset')}{hint}", fix)
        return ckpt

    # ------------------------------------------------------------------------------- stages
    def finished(self, stage: str) -> bool:
        return stage not in self.redo and (self.stage_dir / f"{stage}.json").is_file()

    def run(self) -> dict[str, Any]:
        try:
            return self.run_stages()
        except OSError as exc:  # a write outside the atomic helpers (a logger, an export) on a full disk
            if exc.errno not in DISK_FULL:
                raise
            raise disk_full(f"in {self.out} ({exc.strerror}: {exc.filename}); every finished stage is left as it "
                            "was") from exc
        finally:
            unlock_output_dir(self.out)

    def run_stages(self) -> dict[str, Any]:
        self.setup()
        write_run_config(self.cfg, self.out, self.overrides, self.fingerprint)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        net, first = self.start_net, True
        self.start_net = None  # the stages own it now (a second reference would keep a replaced network alive)
        for stage in STAGES:
            if self.finished(stage):
                if self.records[stage]["status"] == "done":
                    self.log(f"stage {stage}: already finished, skipped")
                continue
            reason = self.skip_reason(stage)
            if reason:
                self.records[stage] = {"stage": stage, "status": "skipped", "reason": reason}
                if stage in self.cfg.stages:  # a skip by the method is final; one by `stages=` is not
                    atomic_write_json(self.stage_dir / f"{stage}.json", self.records[stage])
                continue
            if not first:  # later stages start from the checkpoint the previous stage wrote
                net = self.net_for(stage, net)
            first = False
            t0, cpu0 = time.perf_counter(), time.process_time()
            self.fit_clocks = []
            self.stage = stage
            self.log(f"stage {stage}: start")
            if stage != "train":  # the stage's random draws must not depend on whether train ran in this process
                reseed(self.cfg.seed, stage)
            monitor = self.load_monitor(stage)
            try:
                metrics, net = getattr(self, f"run_{stage}")(net)
            finally:
                load = monitor.stop()
            record = {"stage": stage, "status": "done",
                      "started_at": monitor.started_at,
                      "wall_s": round(self.stage_wall_seconds(time.perf_counter() - t0), 3),
                      "cpu_s": round(self.stage_cpu_seconds(time.process_time() - cpu0), 3),
                      "load": load,
                      "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "checkpoint": str(self.ckpt_dir / f"{stage}.ckpt") if stage != "evaluate" else None,
                      "evaluated": str(self.ckpt_dir / f"{self.loaded_from}.ckpt")
                      if stage == "evaluate" and self.loaded_from else None,
                      "metrics": metrics}
            if stage == "evaluate":
                record["evaluate_fingerprint"] = evaluate_fingerprint(self.cfg)
            if stage == "train":
                record["train_inputs"] = self.train_inputs
            atomic_write_json(self.stage_dir / f"{stage}.json", record)
            (self.ckpt_dir / f"{stage}-last.ckpt").unlink(missing_ok=True)
            self.load_partial(stage).unlink(missing_ok=True)
            self.records[stage] = record
        results = build_results(self.cfg, self.out, self.records, self.overrides, self.choices, started, self.code)
        atomic_write_json(self.out / "results.json", results)
        print_summary(results)
        return results

    def load_partial(self, stage: str) -> Path:
        return self.stage_dir / f"{stage}.load-partial.json"

    def load_monitor(self, stage: str) -> LoadMonitor:
        """The other processes' CPU share while ``stage`` runs; a train stage resumed from its last epoch
        checkpoint adds the measure of the part before the crash (kept in a partial file as it ran)."""
        partial, before = self.load_partial(stage), None
        if (self.ckpt_dir / f"{stage}-last.ckpt").is_file():
            with contextlib.suppress(OSError, ValueError):
                before = json.loads(partial.read_text())
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        monitor = LoadMonitor(partial=partial, before=before)
        monitor.started_at = (before or {}).get("started_at") or datetime.now(timezone.utc).isoformat(
            timespec="seconds")
        return monitor.start()

    def stage_cpu_seconds(self, measured: float) -> float:
        """The process CPU seconds of a stage: when it trained, those of its train epochs as the fits' clocks
        summed them over any resume (this process's measure would miss the epochs before a crash); else the
        stage's own."""
        return sum(clock.cpu_s for clock in self.fit_clocks) if self.fit_clocks else measured

    def stage_wall_seconds(self, measured: float) -> float:
        """The wall seconds of a stage, on the same terms as :meth:`stage_cpu_seconds`."""
        return sum(clock.wall_s for clock in self.fit_clocks) if self.fit_clocks else measured

    def skip_reason(self, stage: str) -> str | None:
        if stage not in self.cfg.stages:
            return f"not in stages={list(self.cfg.stages)}"
        if stage == "train" and self.pretrained:
            return f"model={self.choices.get('model')} is pretrained: nothing to train"
        if stage == "quantize":  # not a method's stage: it runs for any method when quant= is chosen
            return None if self.quantizer is not None else "no quant= chosen (e.g. quant=w8a8)"
        if stage not in self.method.stages:
            return f"method={self.choices.get('method')} does not use the {stage} stage"
        return None

    def net_for(self, stage: str, net: torch.nn.Module) -> torch.nn.Module:
        """The network a stage starts from: the last finished stage's checkpoint (or the initial net)."""
        previous = [s for s in STAGES[: STAGES.index(stage)]
                    if self.records.get(s, {}).get("status") == "done" and s != "evaluate"]
        if not previous:
            self.loaded_from = None
            return net
        source = self.loaded_from = previous[-1]
        fresh = self.new_net()
        ckpt = self.load_into(fresh, self.ckpt_dir / f"{source}.ckpt", f"the {source} checkpoint",
                              f"delete {self.stage_dir / (source + '.json')} and {self.ckpt_dir / (source + '.ckpt')} "
                              f"and rerun to redo the {source} stage, or use a new output_dir")
        if not (source == "train" and self.plain_train):  # a plainly trained method's state is its initial one,
            # and a train checkpoint taken over from another method holds that method's state
            self.method.load_state_dict(ckpt.get("compress_run", {}).get("method_state", {}))
        return fresh

    def meta(self, stage: str) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "stage": stage, "choices": self.choices,
                "method_state": self.method.state_dict()}

    def run_train(self, net):
        return self.fit("train", net)

    def run_finetune(self, net):
        return self.fit("finetune", net)

    @staticmethod
    def sparsity_metrics(net: torch.nn.Module) -> dict[str, float]:
        report = sparsity_report(net)
        return {"model/sparsity": report.model_sparsity, "model/prunable_sparsity": report.prunable_sparsity}

    def run_compress(self, net):
        self.method.distill = self.distillation()
        net = self.method.compress(net, self.datamodule)
        state = {f"net.{k}": v for k, v in net.state_dict().items()}
        atomic_torch_save({"state_dict": state, "compress_run": self.meta("compress")},
                          self.ckpt_dir / "compress.ckpt")
        artifacts = self.method.artifacts()
        for name, content in artifacts.items():
            atomic_write_bytes(self.out / name, lambda f, content=content: f.write(content))
        files = {"artifacts": sorted(artifacts)} if artifacts else {}
        return {**self.sparsity_metrics(net), **self.evaluate_metrics(net), **files}, net

    def run_quantize(self, net):
        training = self.quantizer.training()
        if training is not None:  # quantization-aware training, then quantize() freezes the result
            epochs, lr_scale = training
            net = self.quantizer.prepare_training(net, self.datamodule)
            self.fit("quantize", net, epochs=epochs, lr=lr_scale * float(self.cfg.schedule.finetune.lr),
                     callbacks=self.quantizer.training_callbacks(net))
        if self.causal_lm:  # calibrate where the model evaluates (a GPU when the trainer has one)
            net = net.to(self.lm_device())
        net = self.quantizer.quantize(net, self.datamodule)
        for name, content in self.quantizer.artifacts().items():
            atomic_write_bytes(self.out / name, lambda f, content=content: f.write(content))
        state = {f"net.{k}": v for k, v in net.state_dict().items()}
        atomic_torch_save({"state_dict": state, "compress_run": self.meta("quantize")},
                          self.ckpt_dir / "quantize.ckpt")
        return {**self.sparsity_metrics(net), **self.evaluate_metrics(net), "quant": self.quantizer.summary()}, net

    def run_evaluate(self, net):
        level_metrics: dict[str, Any] = {}
        if level_count(net):
            net, level_metrics = self.evaluate_levels(net)
        report = sparsity_report(net)
        # the previous stage tested exactly this checkpoint: reuse its accuracy instead of a second pass
        source = self.records.get(self.loaded_from or "", {}).get("metrics", {})
        if level_metrics:
            chosen = level_metrics.pop("levels/metrics")
            metrics = {k: chosen[k] for k in ACCURACY_KEYS}
            metrics.update(level_metrics)
        elif all(k in source for k in self.accuracy_keys()):
            metrics = {k: v for k, v in source.items() if k.split("/")[0] in ("test", "val", "ood")}
            metrics["accuracy_from"] = f"{self.loaded_from} stage checkpoint"
        else:
            metrics = self.evaluate_metrics(net)
        metrics.update(self.hardware_report(net))
        metrics.update({"model/params_dense": report.params_dense, "model/params_nonzero": report.params_nonzero,
                        "model/sparsity": report.model_sparsity,
                        "model/prunable_sparsity": report.prunable_sparsity,
                        "sparsity_per_layer": report.per_layer, "method": self.method.summary(),
                        **{f"method/{key}": value for key, value in self.method.network_metrics(net).items()},
                        **model_bytes(net)})
        bits = quantization_report(net)
        if bits:
            metrics["quant_bits_per_layer"] = bits
            for key in ("weight_bits", "input_bits"):  # one width, or "mixed"
                widths = {row[key] for row in bits.values()}
                metrics[f"quant/{key}"] = widths.pop() if len(widths) == 1 else "mixed"
            metrics["quant/layers"] = len(bits)
            if self.cfg.evaluate.int8_host and not self.causal_lm:
                metrics.update(self.int8_host_report(net))
            elif self.cfg.evaluate.int8_host and self.reference_net() is not None:
                self.log("stage evaluate: the quantized layers as int8 kernels (perplexity, speed against float)")
                self.datamodule.setup("test")
                metrics.update(llm_int8_metrics(net, self.reference_net(), self.datamodule.test_set,
                                                self.datamodule.network_input.shape[0],
                                                measure=self.cfg.evaluate.measure_latency))
        elif self.cfg.evaluate.measure_latency and self.cfg.evaluate.deploy_latency and not self.causal_lm:
            metrics.update(self.deploy_report(net, metrics))
        if self.noise.snrs:
            metrics.update(self.noise.report(net, self.test_batches, self.out, self.log,
                                             lambda: self.evaluate_metrics(net)))
        if self.cfg.evaluate.get("export") == "onnx":
            metrics.update(export_onnx(net, self.datamodule.network_input.shape,
                                       self.out / "model.onnx"))
        if is_compacted(net) or is_factorized(net):  # params_dense counts the new shapes; original = before
            original = sum(p.numel() for p in self.new_net().parameters())
            metrics.update({"model/params_original": original,
                            "model/params_reduction": 1.0 - report.params_dense / original})
        return metrics, net

    def accuracy_keys(self) -> tuple[str, ...]:
        return LM_KEYS if self.causal_lm else ACCURACY_KEYS

    def int8_host_report(self, net: torch.nn.Module) -> dict[str, Any]:
        """The quantized network as ONNX Runtime's int8 graph: its test accuracy and host latency."""
        if any(row["input_scale"] == "per token" for row in quantization_report(net).values()):
            reason = ("per-token inputs (quant.activations=dynamic): the int8 graph takes one static scale per "
                      "tensor, so it would not run the quantizer this run evaluated")
            self.log(f"int8 host run skipped: {reason}")
            return {"int8_host/skipped": reason}
        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            self.log(f"int8 host run skipped: {', '.join(missing)} not installed "
                     '(pip install "compress-run[export]")')
            return {"int8_host/skipped": f"{', '.join(missing)} not installed"}
        cfg = self.cfg.evaluate
        shape = self.datamodule.network_input.shape
        calib = calibration_batches(self.datamodule, "train", INT8_CALIB_IMAGES, 128, shape, self.cfg.seed, "cpu")
        return int8_host_metrics(net, shape, calib, self.test_batches(), batch=cfg.batch_size, warmup=cfg.warmup,
                                 repeats=cfg.repeats, measure=cfg.measure_latency)

    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The test batches test/acc is measured on (``trainer.limit_test_batches`` included), ready for the net."""
        self.datamodule.setup("test")
        loader = self.datamodule.test_dataloader()
        limit = self.cfg.trainer.get("limit_test_batches")
        count = len(loader) if limit is None else limit if isinstance(limit, int) else math.ceil(limit * len(loader))
        return (self.datamodule.on_after_batch_transfer(batch, 0) for batch in itertools.islice(loader, count))

    def deploy_report(self, net: torch.nn.Module, eager: dict[str, Any]) -> dict[str, Any]:
        """The network run by ONNX Runtime at batch 1 and N, and its speed-up over the eager measurement."""
        cfg = self.cfg.evaluate
        metrics = deployed_latency_metrics(net, self.datamodule.network_input.shape,
                                           batch=cfg.batch_size, warmup=cfg.warmup, repeats=cfg.repeats)
        if "latency_deploy/skipped" in metrics:
            self.log(f"deployed latency not measured: {metrics['latency_deploy/skipped']}")
        for key in [k for k in metrics if k.startswith("latency_deploy_ms/")]:
            batch = key.rsplit("/", 1)[1]
            if f"latency_host_ms/{batch}" in eager:
                metrics[f"latency_deploy/speedup_over_eager/{batch}"] = round(
                    eager[f"latency_host_ms/{batch}"] / metrics[key], 3)
        return metrics

    def evaluate_levels(self, net: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Any]]:
        return evaluate_levels(net, self.method, self.cfg.evaluate, self.datamodule.network_input.shape,
                               load_profile(self.cfg.hardware), self.evaluate_metrics, self.log)

    def hardware_report(self, net: torch.nn.Module) -> dict[str, Any]:
        """MAC views, simulated latency on every requested profile, measured host latency."""
        cfg = self.cfg.evaluate
        primary = load_profile(self.cfg.hardware)
        profiles = [primary, *(load_profile(n) for n in cfg.hardware or [] if n != primary.name)]
        host = primary if primary.name == "host_cpu" else load_profile("host_cpu")
        net = net.cpu().eval()
        if self.causal_lm:
            self.log("stage evaluate: prefill and decode cost (traced, simulated"
                     + (", timed on this host)" if cfg.measure_latency else ")"))
            metrics, per_layer = llm_hardware_metrics(net, self.datamodule.network_input.shape[0], profiles,
                                                      measure=cfg.measure_latency, warmup=min(cfg.warmup, 2),
                                                      repeats=min(cfg.repeats, 5))
            if cfg.breakdown:
                print_breakdown(per_layer, cfg.breakdown)
            metrics["latency_per_layer"] = per_layer
            metrics["llm/model"] = net.describe()
            metrics["llm/data"] = self.datamodule.describe()
            return metrics
        metrics, per_layer = hardware_metrics(net, self.datamodule.network_input.shape, profiles,
                                              host, batch=cfg.batch_size, measure=cfg.measure_latency,
                                              warmup=cfg.warmup, repeats=cfg.repeats, kernels=cfg.kernels)
        if cfg.breakdown:
            print_breakdown(per_layer, cfg.breakdown)
        if cfg.plot:
            metrics["latency_breakdown_plot"] = str(plot_breakdown(per_layer, self.out / "latency_breakdown.png"))
        metrics["latency_per_layer"] = per_layer
        metrics.update(self.datamodule.network_input.size(selected_input_channels(net)))
        return metrics

    # ------------------------------------------------------------------------------ lightning
    def trainer(self, stage: str, epochs: int, callbacks: list[L.Callback], logger: Any = None,
                fraction: float = 1.0) -> L.Trainer:
        tcfg = OmegaConf.to_container(self.cfg.trainer, resolve=True)
        if stage == "evaluate":  # one process, so every test sample is counted exactly once
            tcfg.update(devices=1, num_nodes=1, strategy="auto")
        if tcfg.get("limit_train_batches") is None and fraction < 1.0:
            tcfg["limit_train_batches"] = fraction
        interactive = sys.stdout.isatty()
        summary = tcfg.pop("enable_model_summary")
        callbacks = [*callbacks, RichProgressBar() if interactive else EpochLine(stage)]
        if summary and stage in ("train", "finetune"):
            callbacks.append(RichModelSummary(max_depth=1))
        for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "benchmark",
                    "gradient_clip_val"):
            if tcfg.get(key) is None:
                tcfg.pop(key, None)
        return L.Trainer(**tcfg, max_epochs=epochs, callbacks=callbacks,
                         logger=self.logger(stage) if logger is None else logger,
                         default_root_dir=str(self.out), enable_progress_bar=interactive,
                         enable_model_summary=False, plugins=[AtomicCheckpointIO()])

    def module(self, net: torch.nn.Module, stage: str, epochs: int | None = None,
               lr: float | None = None) -> ClassifierModule:
        """The LightningModule of a stage: the schedule of ``stage`` (of finetune for the other stages), with
        ``epochs`` and ``lr`` in place of the schedule's when given."""
        sched = self.cfg.schedule
        s = sched[stage] if stage in ("train", "finetune") else sched.finetune
        optimizer = build(sched.optimizer, "schedule.optimizer")
        if s.weight_decay is not None:  # the stage's own weight decay in place of the optimizer's
            optimizer = partial(optimizer, weight_decay=s.weight_decay)
        module_type = CausalLMModule if getattr(self, "causal_lm", False) else ClassifierModule
        return module_type(net, optimizer, lr=s.lr if lr is None else lr,
                                epochs=s.epochs if epochs is None else epochs,
                                lr_schedule=s.lr_schedule, warmup_epochs=s.warmup_epochs,
                                milestones=list(s.milestones), gamma=s.gamma,
                                label_smoothing=sched.label_smoothing,
                                decay_norm_and_bias=sched.decay_norm_and_bias,
                                lr_cycles=self.method.lr_cycles(stage),
                                lr_scale=partial(self.method.lr_scale, stage),
                                example_input_shape=None if getattr(self, "causal_lm", False)
                                else (1, *self.datamodule.network_input.shape))

    def fit(self, stage: str, net: torch.nn.Module, epochs: int | None = None, lr: float | None = None,
            callbacks: list[L.Callback] | None = None):
        """Train ``net`` for ``stage`` (train/finetune: the method's callbacks and the stage's schedule; another
        stage passes its ``epochs``, ``lr`` and ``callbacks`` and follows the finetune schedule otherwise)."""
        schedule = self.cfg.schedule[stage if stage in ("train", "finetune") else "finetune"]
        epochs = int(schedule.epochs if epochs is None else epochs)
        module = self.module(net, stage, epochs=epochs, lr=lr)
        module.stage = stage
        module.run_meta = self.meta(stage)
        if stage in self.cfg.distill.stages:
            module.distillation = self.distillation()
        module.batch_mix = self.datamodule.batch_mix  # Mixup/CutMix of the training batches (None: off)
        last = self.ckpt_dir / f"{stage}-last.ckpt"
        own = self.method.training_callbacks(stage, net) if callbacks is None else callbacks
        own = [*own, *self.noise.training_callbacks(stage)]
        agreement = [RankAgreement(stage, self.method, own)] if several_processes(self.cfg.trainer) else []
        clock = TrainingClock()
        self.fit_clocks.append(clock)
        callbacks = [*own, EpochLength(), *agreement, EpochSeed(self.cfg.seed, stage), clock,
                     ModelCheckpoint(dirpath=self.ckpt_dir, filename=f"{stage}-last", save_top_k=1,
                                     every_n_epochs=1, save_on_train_epoch_end=True,
                                     enable_version_counter=False)]
        trainer = self.trainer(stage, epochs, callbacks, fraction=float(schedule.epoch_fraction))
        ckpt_path = None
        if last.is_file():
            load_checkpoint(last, f"the unfinished {stage} stage's checkpoint",
                            f"delete {last} to restart the {stage} stage from its beginning")
            ckpt_path = str(last)
            self.log(f"stage {stage}: resuming from {last}")
        trainer.fit(module, datamodule=self.datamodule, ckpt_path=ckpt_path)
        module.run_meta = self.meta(stage)
        trainer.save_checkpoint(self.ckpt_dir / f"{stage}.ckpt")
        self.finish_logger(trainer)
        return {**self.sparsity_metrics(net), **self.evaluate_metrics(net)}, net

    def evaluate_metrics(self, net: torch.nn.Module) -> dict[str, float]:
        """Validation and test accuracy/loss of ``net`` (no logger, no checkpoints); of a causal LM, the test
        splits' perplexity, NLL, token accuracy, and KL and top-1 agreement against the uncompressed model."""
        if self.causal_lm:
            changed = self.stage in ("compress", "finetune", "quantize") or any(
                self.records.get(s, {}).get("status") == "done" for s in ("compress", "finetune", "quantize"))
            reference = self.reference_net() if changed else None  # an unchanged network is its own reference
            self.datamodule.setup("test")
            device = self.lm_device()
            return lm_metrics(net.to(device).eval(), self.datamodule.eval_sets(),
                              int(self.cfg.schedule.eval_batch_size),
                              None if reference is None else reference.to(device), log=self.log, device=device)
        module = self.module(net, "evaluate")
        trainer = self.trainer("evaluate", 1, [], logger=False)
        out: dict[str, float] = {}
        for fn in (trainer.validate, trainer.test):
            for result in fn(module, datamodule=self.datamodule, verbose=False):
                out.update({k: float(v) for k, v in result.items()})
        return dict(sorted(out.items()))

    def logger(self, stage: str):
        lcfg = self.cfg.logger
        if lcfg.get("_target_") in (None, "null"):
            return False
        if "Wandb" in lcfg._target_:
            os.environ.setdefault("WANDB_SILENT", "true")
            if lcfg.offline:
                os.environ["WANDB_MODE"] = "offline"
            return build(lcfg, "logger", save_dir=str(self.out), name=f"{self.cfg.task_name}-{stage}",
                         group=self.out.name, job_type=stage)
        return build(lcfg, "logger", save_dir=str(self.out), version=stage)

    @staticmethod
    def finish_logger(trainer: L.Trainer) -> None:
        if type(trainer.logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()

    @staticmethod
    def log(message: str) -> None:
        print(f"[compress-run] {message}", flush=True)
