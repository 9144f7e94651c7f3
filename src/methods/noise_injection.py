"""Noise-injected training: train the network with the noisy analog computation it will meet at inference.

Papers: Qin & Vucinic, "Noisy Computations during Inference: Harmful or Helpful?" (arXiv 1811.10649, 2018) and
"Training Recurrent Neural Networks against Noisy Computations during Inference" (arXiv 1807.06555, 2018, "Deep
Noise Injection"). Reference code: none released (searched: docs/fidelity.md, noise_injection); the method
sections were not reachable, only the abstracts, which state: analog matrix-vector products add noise, its
strength is a signal-to-noise power ratio, the headline test point is 0 dB, and training with injected noise
(plus voting over noisy passes at inference) recovers most of the accuracy that noise takes from a naturally
trained network.

Algorithm (ours where the sources are silent): the dense network trains with the noise model of
:mod:`compress_run.core.analog_noise` active in every training forward pass of the train stage (validation and
test passes are noiseless unless ``evaluate.noise_snr_db`` asks), at ``snr_db`` on the outputs of every covered
conv/linear layer; the gradient flows through the noisy forward pass (the noise is additive, its scale carries no
gradient). Stages: train, evaluate. The same injection composes with any other method through the ``noise``
group (``noise.train_stages=[train,finetune]``, ``noise.train_snr_db``), and with QAT (``quantize`` in
``noise.train_stages``).

Keys (defaults): ``snr_db`` 0.0 (the paper's test point; training at the test SNR is our choice), ``site``
output, ``weight_noise`` 0.0, ``dac_bits`` / ``adc_bits`` null, ``include`` [] (every conv/linear layer),
``exclude`` [] — as the ``noise`` group's keys of the same names (core/analog_noise.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
from torch import nn

from compress_run.core.analog_noise import (
    NoiseSpec,
    NoisyComputation,
    check_noise_fields,
    covered_layers,
    spec_from,
)
from compress_run.core.errors import UserError
from compress_run.methods.base import Method, MethodConfig, NotApplicable, method_config


class NoiseInjection(L.Callback):
    """Noisy computation (``spec``) in the training forward passes only: on at each training batch's start,
    off at its end (validation, test and checkpoints see the exact network)."""

    def __init__(self, spec: NoiseSpec) -> None:
        self.spec = spec
        self.hooks: NoisyComputation | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._off()
        try:
            self.hooks = NoisyComputation(pl_module.net, self.spec)
        except ValueError as exc:  # the network changed form since the run checked it (e.g. fake-quantized)
            raise UserError(f"noise-injected training cannot go on: {exc}",
                            "change the noise's include/exclude or weight_noise for this network") from exc

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._off()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._off()

    def _off(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None


@method_config("noise_injection")
@dataclass
class NoiseInjectionConfig(NoiseSpec, MethodConfig):
    snr_db: float | None = 0.0

    def __post_init__(self) -> None:
        check_noise_fields(self, "method")


class NoiseInjectionTraining(Method):
    Config = NoiseInjectionConfig
    stages = ("train", "evaluate")

    def check_applicable(self, model: nn.Module) -> None:
        try:
            layers = covered_layers(model, list(self.config.include), list(self.config.exclude))
        except ValueError as exc:
            raise NotApplicable(f"method.{exc}") from exc
        if not layers:
            raise NotApplicable("method.include/exclude leave no conv/linear layer to train under noise")
        if not spec_from(self.config).active():
            raise NotApplicable("method.snr_db is null or inf and nothing else is noisy (weight_noise 0, no "
                                "converter bits): the training would be plain; use method=dense for that")

    def training_callbacks(self, stage: str, model: nn.Module) -> list[L.Callback]:
        return [NoiseInjection(spec_from(self.config))] if stage == "train" else []

    def training_noise(self) -> NoiseSpec:
        return spec_from(self.config)

    def summary(self) -> dict[str, Any]:
        return {"training_noise": asdict(spec_from(self.config))}
