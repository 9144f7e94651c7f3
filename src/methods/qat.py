"""Quantization-aware training (QAT): the network trains for a few epochs with its weights and inputs rounded to
their integer grids in the forward pass and gradients passed straight through the rounding (Jacob et al.,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018; the
straight-through estimator of Bengio et al., 2013), optionally with the backward pass quantized as well (INT8/INT4
gradients with stochastic rounding, as in Gupta et al., "Deep Learning with Limited Numerical Precision", ICML
2015). Zhu et al., "Towards Unified INT8 Training for Convolutional Neural Network", CVPR 2020, is the INT8
gradient-training line this belongs to, but neither of its mechanisms (Direction Sensitive Gradient Clipping,
Deviation Counteractive Learning-Rate Scaling) is implemented: ``grad_bits`` is Gupta-style stochastic rounding
with a per-tensor max-magnitude scale, not Zhu et al.'s method (ours; no reason recorded — see docs/fidelity.md).

Reference code: pytorch/pytorch (the installed torch) — torch/ao/quantization/qconfig.py:
``get_default_qat_qconfig`` (activations affine uint8 with ``MovingAverageMinMaxObserver``; weights per-channel
symmetric); torch/ao/quantization/fake_quantize.py: ``FakeQuantize``, ``default_fake_quant``,
``default_per_channel_weight_fake_quant``. For the hypernetwork variant, csyhhu/MetaQuant — meta-quantize.py,
meta_utils/helpers.py: ``meta_gradient_generation``, meta_utils/meta_quantized_module.py: ``MetaQuantConv.forward``
and ``MetaQuantLinear.forward`` (the look-ahead), meta_utils/meta_network.py: ``MetaFC``, ``MetaLSTMFC``. Not
available: MetaGrad's code (none released), Zhu et al.'s code, Jacob et al.'s TensorFlow rewriter.
Deviations from it, with reasons: docs/fidelity.md (section qat).

Algorithm: every conv/linear layer that PTQ would quantize becomes fake-quantized. Its weight is rounded at every
forward to its symmetric grid (per output channel, per group or per tensor; the scale is the current weight's
largest magnitude over qmax) and the gradient of the rounded weight is applied to the float weight unchanged (STE).
Its input passes a ``torch.ao`` ``FakeQuantize`` (symmetric per-tensor, ``MovingAverageMinMaxObserver``: the range
is an exponential moving average of the batches' min/max with constant ``ema`` while training and held in eval;
the gradient passes where the input lies inside the range and is zero where it was clipped). The ranges start from
the exact min/max over ``calib_size`` train images, then the network trains ``epochs`` epochs at ``lr_scale`` times
the finetune LR (the finetune schedule otherwise: optimizer, LR shape, batch size; masks stay enforced; resumable
like any stage). With ``grad_bits`` the gradient arriving at each quantized layer's output (the error signal both
the weight gradient and the input gradient are computed from) is rounded to ``grad_bits`` integers, one scale per
tensor (its largest magnitude), with stochastic rounding (unbiased). At the end each layer is frozen into the
quantized state PTQ writes: the weight on its grid, the input's static scale = the trained range, so evaluation,
the simulator and the model bytes treat both alike.

Config keys (conf/quant/qat_*.yaml; schema base_quant_qat):
* ``weight_bits`` (8), ``input_bits`` (8): integer widths, 2..8.
* ``grad_bits`` (0): 0 keeps float gradients; 2..8 rounds the output gradient of every quantized layer.
* ``granularity`` (channel): channel | group | tensor — the weights' scales; ``group_size`` (128).
* ``epochs`` (2): QAT epochs; ``lr_scale`` (0.1): their LR as a multiple of ``schedule.finetune.lr``.
* ``ema`` (0.01): averaging constant of the input ranges while training.
* ``calib_size`` (512): train images (seeded, no augmentation; in batches of 128) the ranges start from.
* ``exclude`` ([]): layers kept in float (globs or the aliases first_conv / classifier).

Deviations (ours):
* Inputs are quantized *symmetric* per tensor (codes -2^(b-1)..2^(b-1)-1), where Jacob et al. and torch.ao's
  default QAT qconfig quantize activations *affine* (uint8 0..255 with a zero-point); a non-negative
  post-ReLU input therefore uses only half the codes (7 effective bits at A8, 3 at A4). The only reason
  recorded: it is the symmetric state PTQ writes, into which the layer is frozen so that evaluation, the
  simulator and the model bytes treat both alike (see docs/fidelity.md).
* torch.ao's symmetric scale for the inputs is range / (qmax + 1/2) where PTQ uses range / qmax (both round to
  the same integer codes). The ranges start from the exact min/max over ``calib_size`` train images; Jacob et
  al. run EMA ranges from training and delay activation quantization.
* The weight scale is the current weight's largest magnitude (torch.ao's default per-channel weight
  fake-quant averages its range over steps); the gradient's scale is per tensor.
* Batch norm is trained as it is (not folded into the weights before rounding, as Jacob et al. do for
  integer-only inference) — the simulator prices conv+BN as the fused kernel either way.
A multi-level model is refused (its levels share weights; training one would change the others): quantize it
with PTQ.

Hypernetwork variant (``hypernet``; Xu et al., "MetaGrad: Adaptive Gradient Quantization with Hypernetworks",
ICIP 2023, arXiv 2303.02347): the quantized gradient of each layer's weight is fed into the computation graph of
the *next* iteration through a hypernetwork, so that the training loss itself teaches the hypernetwork to undo
the damage of the low-precision backward pass. Per step t and quantized layer: the forward runs on the
look-ahead weight ``W_t = SGD(W_{t-1}, H(g_{t-1}, W_{t-1}))`` (rounded to its grid as above): the stage's SGD
update (its current LR, weight decay, momentum, dampening, Nesterov) with the hypernetwork's output as the
gradient, where ``g_{t-1}`` is the previous step's gradient of the layer's weight on the ``grad_bits`` grid
(stochastic rounding; float when grad_bits = 0); the loss's gradient reaches the hypernetwork's parameters
through ``W_t`` (trained by Adam at ``hypernet_lr``) and the new gradient ``g_t`` is kept for the next step;
after the backward pass the layer's weight (and momentum buffer) becomes the look-ahead exactly, so the network
trains at the weights its loss was computed at. The first step has no gradient to feed forward and runs on the
weights as they are. ``H`` is one coordinate-wise MLP shared by all
layers (inputs: the gradient and the weight, each divided by its tensor's largest magnitude; ``hypernet_hidden``
tanh units; output a correction in the gradient's scale added to the gradient) whose output layer starts at
zero, so training starts as plain quantized-gradient SGD and departs from it only as far as the loss asks.
Keys: ``hypernet`` (false), ``hypernet_hidden`` (16), ``hypernet_lr`` (0.001).
Deviations and choices: only the paper's abstract and introduction were available; the update rule above is
the look-ahead of the meta-quantization line the paper builds on (Chen et al., "MetaQuant", NeurIPS 2019),
applied to gradients (MetaQuant looks ahead with plain W − lr·meta_grad and then steps its optimizer). The
quantized layers' weights are stepped by that rule in place of the stage's optimizer (same arithmetic as
torch.optim.SGD; the rest of the network uses the optimizer as usual). The form of H (16 tanh units, a zero
output layer, a correction added to g) is ours; MetaQuant's FC-Grad maps g to a new gradient with 100 hidden
units. Refused with an
optimizer other than SGD, several processes or gradient accumulation (one gradient per step and process is what
the next step's graph holds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

from compress_run.core.config import check
from compress_run.core.masks import MaskEnforcer, get_mask, masked_parameters
from compress_run.core.quantization import (
    GRANULARITIES,
    MAX_BITS,
    MIN_BITS,
    attach_quantization,
    fake_quantize_weight,
    qmax,
    stochastic_fake_quantize,
)
from compress_run.methods.base import LayerQuantizer, MethodConfig, NotApplicable, quant_config
from compress_run.methods.calibration import calibration_batches

CALIB_BATCH = 128  # images per calibration forward: memory only, the ranges are exact min/max either way


@quant_config("qat")
@dataclass
class QATConfig(MethodConfig):
    weight_bits: int = 8
    input_bits: int = 8
    grad_bits: int = 0
    granularity: str = "channel"
    group_size: int = 128
    epochs: int = 2
    lr_scale: float = 0.1
    ema: float = 0.01
    calib_size: int = 512
    exclude: list[str] = field(default_factory=list)
    hypernet: bool = False
    hypernet_hidden: int = 16
    hypernet_lr: float = 0.001

    def __post_init__(self) -> None:
        for key in ("weight_bits", "input_bits"):
            value = getattr(self, key)
            check(MIN_BITS <= value <= MAX_BITS, f"quant.{key}", value, f"an integer in {MIN_BITS}..{MAX_BITS}")
        check(self.grad_bits == 0 or MIN_BITS <= self.grad_bits <= MAX_BITS, "quant.grad_bits", self.grad_bits,
              f"0 (float gradients) or an integer in {MIN_BITS}..{MAX_BITS}")
        check(self.granularity in GRANULARITIES, "quant.granularity", self.granularity, " | ".join(GRANULARITIES))
        check(self.group_size >= 1, "quant.group_size", self.group_size, "an integer >= 1")
        check(self.epochs >= 1, "quant.epochs", self.epochs, "an integer >= 1 (no training: use quant=w8a8)")
        check(self.lr_scale > 0, "quant.lr_scale", self.lr_scale, "a float > 0")
        check(0.0 < self.ema <= 1.0, "quant.ema", self.ema, "a float in (0, 1]")
        check(self.calib_size >= 1, "quant.calib_size", self.calib_size, "an integer >= 1")
        check(self.hypernet_hidden >= 1, "quant.hypernet_hidden", self.hypernet_hidden, "an integer >= 1")
        check(self.hypernet_lr > 0, "quant.hypernet_lr", self.hypernet_lr, "a float > 0")


# ------------------------------------------------------------------------------ fake-quantized layers
# A layer trains fake-quantized by a class swap (nn.Conv2d -> FakeQuantConv2d, nn.Linear -> FakeQuantLinear): the
# parameters, masks and state-dict keys stay those of the layer, plus its input's FakeQuantize as a submodule.
class RoundGradient(torch.autograd.Function):
    """Identity forward; the backward rounds the incoming gradient to ``bits`` integers stochastically."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: int) -> torch.Tensor:
        ctx.bits = bits
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return stochastic_fake_quantize(grad, ctx.bits), None


def straight_through_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` on the layer's grid in the forward; its gradient reaches ``weight`` unchanged."""
    bits, granularity, group_size, _ = module.qat_settings
    rounded = fake_quantize_weight(weight.detach(), bits, granularity, group_size)
    return weight + (rounded - weight.detach())


# ------------------------------------------------------------------------------ the hypernetwork variant
class GradientHypernetwork(nn.Module):
    """Coordinate-wise MLP (gradient, weight) -> gradient + correction; the correction starts at zero."""

    def __init__(self, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.hidden = nn.Linear(2, hidden)
        self.out = nn.Linear(hidden, 1)
        with torch.no_grad():
            bound = 1 / 2 ** 0.5
            self.hidden.weight.uniform_(-bound, bound, generator=generator)
            self.hidden.bias.uniform_(-bound, bound, generator=generator)
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        grad_peak = grad.abs().amax()
        features = torch.stack([grad / _nonzero(grad_peak), weight / _nonzero(weight.abs().amax())], dim=-1)
        correction = self.out(torch.tanh(self.hidden(features))).squeeze(-1)
        return grad + grad_peak * correction


def _nonzero(peak: torch.Tensor) -> torch.Tensor:
    return torch.where(peak > 0, peak, torch.ones_like(peak))


class HypernetworkRun:
    """The hypernetwork, its optimizer and the stage optimizer's SGD settings the look-ahead follows (set from the
    stage's optimizer at every step)."""

    def __init__(self, hypernet: GradientHypernetwork, lr: float) -> None:
        self.hypernet = hypernet
        self.optimizer = torch.optim.Adam(hypernet.parameters(), lr=lr)
        self.sgd = {"lr": 0.0, "weight_decay": 0.0, "momentum": 0.0, "dampening": 0.0, "nesterov": False}

    def lookahead(self, module: nn.Module) -> torch.Tensor:
        """SGD's update of the layer's weight (torch.optim.SGD's rule: weight decay, momentum, dampening,
        Nesterov) with the hypernetwork's output as the gradient, differentiable in the hypernetwork."""
        sgd, weight = self.sgd, module.weight.detach()
        if not module.hyper_started:  # no gradient kept yet: the first step runs on the weight as it is
            return weight.requires_grad_()
        direction = self.hypernet(module.hyper_grad, weight) + sgd["weight_decay"] * weight
        if sgd["momentum"]:
            buffer = sgd["momentum"] * module.hyper_momentum + (1 - sgd["dampening"]) * direction
            direction = direction + sgd["momentum"] * buffer if sgd["nesterov"] else buffer
            module.__dict__["hyper_pending_momentum"] = buffer.detach()
        return weight - sgd["lr"] * direction

    def step(self, model: nn.Module) -> int:
        """After the backward pass: each layer's weight (and momentum) becomes the look-ahead its loss was computed
        at, and the hypernetwork takes its step. Returns the number of layers stepped."""
        stepped = 0
        with torch.no_grad():
            for module in model.modules():
                pending = module.__dict__.pop("hyper_pending", None)
                if pending is not None:
                    module.weight.copy_(pending)
                    stepped += 1
                momentum = module.__dict__.pop("hyper_pending_momentum", None)
                if momentum is not None:
                    module.hyper_momentum.copy_(momentum)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stepped


class HypernetworkStep(L.Callback):
    """Drives ``HypernetworkRun`` in the stage's training loop; its state resumes with the stage."""

    def __init__(self, run: HypernetworkRun) -> None:
        self.run = run

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        if not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(f"quant.hypernet=true follows SGD's update rule; the stage's optimizer is "
                            f"{type(optimizer).__name__}")
        group = optimizer.param_groups[0]
        self.run.sgd = {key: group.get(key, default) for key, default in self.run.sgd.items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.run.step(pl_module.net)

    def state_dict(self) -> dict[str, Any]:
        return {"hypernet": self.run.hypernet.state_dict(), "optimizer": self.run.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run.hypernet.load_state_dict(state_dict["hypernet"])
        self.run.optimizer.load_state_dict(state_dict["optimizer"])


def _keep_gradient(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    grad_bits = module.qat_settings[3]
    kept = stochastic_fake_quantize(grad, grad_bits) if grad_bits else grad
    module.hyper_grad.copy_(kept)
    module.hyper_started.fill_(True)
    return kept


def _training_weight(module: nn.Module) -> torch.Tensor:
    """The weight the forward uses: the layer's own, or (hypernetwork variant, training) the look-ahead weight."""
    run: HypernetworkRun | None = getattr(module, "qat_hypernet", None)
    if run is None or not (module.training and torch.is_grad_enabled()):
        return module.weight
    lookahead = run.lookahead(module)
    mask = get_mask(module)
    if mask is not None:
        lookahead = lookahead * mask
    module.__dict__["hyper_pending"] = lookahead.detach()
    lookahead.register_hook(partial(_keep_gradient, module))
    return lookahead


def _fake_quantized(module: nn.Module, x: torch.Tensor, run) -> torch.Tensor:
    observer = module.input_fake_quant
    observer.observer_enabled.fill_(int(module.training))  # ranges move while training, are held in eval
    out = run(observer(x), straight_through_weight(module, _training_weight(module)))
    grad_bits = module.qat_settings[3]
    return RoundGradient.apply(out, grad_bits) if grad_bits and torch.is_grad_enabled() else out


class FakeQuantConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fake_quantized(self, x, lambda a, w: self._conv_forward(a, w, self.bias))


class FakeQuantLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fake_quantized(self, x, lambda a, w: F.linear(a, w, self.bias))


FAKE_QUANT = {nn.Conv2d: FakeQuantConv2d, nn.Linear: FakeQuantLinear}
ORIGINAL = {fake: plain for plain, fake in FAKE_QUANT.items()}


def input_fake_quant(bits: int, ema: float, absmax: torch.Tensor) -> FakeQuantize:
    """A symmetric per-tensor FakeQuantize for ``bits``-bit inputs whose range starts at ±``absmax``."""
    fq = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=-qmax(bits) - 1, quant_max=qmax(bits),
                      dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, averaging_constant=ema)
    fq.to(absmax.device)
    fq.activation_post_process.min_val.copy_(-absmax)
    fq.activation_post_process.max_val.copy_(absmax)
    scale, zero_point = fq.calculate_qparams()
    fq.scale.copy_(scale)
    fq.zero_point.copy_(zero_point)
    return fq


class QAT(LayerQuantizer):
    Config = QATConfig
    tasks = ("classification", "causal_lm")  # a causal LM trains with its next-token loss; its tied head stays float

    def __init__(self, **keys: Any) -> None:
        super().__init__(**keys)
        self.seed = torch.initial_seed()
        self.calibrated: dict[str, float] = {}
        self.report: dict[str, Any] = {}
        self.hypernet_run: HypernetworkRun | None = None

    def check_applicable(self, model: nn.Module) -> None:
        super().check_applicable(model)
        custom = [f"{n} ({type(m).__name__})" for n, m in self.layers(model).items()
                  if type(m) not in FAKE_QUANT | ORIGINAL]
        if custom:
            raise NotApplicable(f"layers {', '.join(custom)} subclass nn.Conv2d/nn.Linear with their own forward, "
                                "which fake-quantized training would replace; add them to quant.exclude")

    def training(self) -> tuple[int, float]:
        return self.epochs, self.lr_scale

    def prepare_training(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        layers = self.layers(model)
        self.check_applicable(model)
        device = next(model.parameters()).device
        batch = CALIB_BATCH if self.task != "causal_lm" else 8  # windows: a forward's logits are T x vocab each
        batches = calibration_batches(datamodule, "train", self.calib_size, batch,
                                      tuple(self.input_shape), self.seed + 104729, device)
        absmax: dict[str, torch.Tensor] = {}

        def record(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                peak = args[0].detach().abs().amax()
                absmax[name] = peak if name not in absmax else torch.maximum(absmax[name], peak)
            return hook

        handles = [m.register_forward_pre_hook(record(n)) for n, m in layers.items()]
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                for x in batches:
                    model(x)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        for name, module in layers.items():
            module.add_module("input_fake_quant", input_fake_quant(self.input_bits, self.ema, absmax[name]))
            module.qat_settings = (self.weight_bits, self.granularity, self.group_size, self.grad_bits)
            module.__class__ = FAKE_QUANT[type(module)]
            self.calibrated[name] = float(module.input_fake_quant.scale)
        if self.hypernet:
            generator = torch.Generator().manual_seed(self.seed + 7919)
            self.hypernet_run = HypernetworkRun(GradientHypernetwork(self.hypernet_hidden, generator).to(device),
                                                self.hypernet_lr)
            for module in layers.values():
                module.register_buffer("hyper_grad", torch.zeros_like(module.weight))
                module.register_buffer("hyper_momentum", torch.zeros_like(module.weight))
                module.register_buffer("hyper_started", torch.zeros((), dtype=torch.bool, device=device))
                module.weight.requires_grad_(False)  # stepped by the look-ahead rule, not by the optimizer
                module.qat_hypernet = self.hypernet_run
        return model

    def training_callbacks(self, model: nn.Module) -> list[L.Callback]:
        callbacks: list[L.Callback] = [HypernetworkStep(self.hypernet_run)] if self.hypernet_run else []
        return callbacks + ([MaskEnforcer()] if any(True for _ in masked_parameters(model)) else [])

    def quantize(self, model: nn.Module, datamodule: L.LightningDataModule) -> nn.Module:
        """Freeze every fake-quantized layer into the static quantized state (PTQ's)."""
        frozen: dict[str, dict[str, float]] = {}
        for name, module in model.named_modules():
            if type(module) not in ORIGINAL:
                continue
            scale = module.input_fake_quant.scale.detach().reshape(())
            del module.input_fake_quant
            del module.qat_settings
            if getattr(module, "qat_hypernet", None) is not None:
                del module.qat_hypernet, module.hyper_grad, module.hyper_momentum, module.hyper_started
                module.__dict__.pop("hyper_pending", None)
                module.__dict__.pop("hyper_pending_momentum", None)
                module.weight.requires_grad_(True)
            module.__class__ = ORIGINAL[type(module)]
            attach_quantization(module, self.weight_bits, self.input_bits, scale, self.granularity, self.group_size)
            frozen[name] = {"calibrated_input_scale": self.calibrated.get(name), "trained_input_scale": float(scale)}
        if not frozen:
            raise RuntimeError("QAT.quantize() found no fake-quantized layer: prepare_training() did not run")
        self.report = {"layers": len(frozen), "input_scales": frozen}
        return model

    def summary(self) -> dict[str, Any]:
        return {"kind": "qat", "weight_bits": self.weight_bits, "input_bits": self.input_bits,
                "grad_bits": self.grad_bits, "granularity": self.granularity, "group_size": self.group_size,
                "epochs": self.epochs, "lr_scale": self.lr_scale, "hypernet": self.hypernet,
                **({"hypernet_hidden": self.hypernet_hidden, "hypernet_lr": self.hypernet_lr} if self.hypernet else {}),
                **self.report}
