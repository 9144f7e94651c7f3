"""Quantization-aware training (quant=qat_*): the forward runs on the integer grids with straight-through
gradients, the input ranges move while training and hold in eval, training through the rounding recovers what
rounding after float training loses, the frozen network computes what it trained as, the backward pass can be
quantized without bias, the hypernetwork variant feeds each step's quantized gradient into the next step's graph
and learns from it, and the stage trains, keeps masks and resumes in the pipeline."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from compress_run.core.masks import attach_mask
from compress_run.core.quantization import fake_quantize_weight, is_quantized, stochastic_fake_quantize
from compress_run.core.restore import restore_compression
from compress_run.methods.base import NotApplicable
from compress_run.methods.ptq import PTQ
from compress_run.methods.qat import QAT, FakeQuantLinear, QATConfig
from tests.conftest import run_pipeline

# tests/methods/test_config_keys.py flips every quant key in a run with quant=qat_w8a8 (digits smoke)
CONFIG_FLIPS = {
    "weight_bits": ("4", []), "input_bits": ("4", []), "grad_bits": ("4", []), "granularity": ("group", []),
    "group_size": ("4", ["quant.granularity=group"]), "epochs": ("1", []),
    "lr_scale": ("1.0", []), "ema": ("0.5", []), "calib_size": ("8", []), "exclude": ("[classifier]", []),
    "hypernet": ("true", ["quant.grad_bits=4"]), "hypernet_hidden": ("4", ["quant.hypernet=true"]),
    "hypernet_lr": ("0.1", ["quant.hypernet=true"]),
}


class Calibration:
    def __init__(self, x: torch.Tensor) -> None:
        self.train_set = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))

    def on_after_batch_transfer(self, batch, index):
        return batch


def qat(input_shape: tuple[int, ...], **keys) -> QAT:
    quantizer = QAT(_target_="x", **{"calib_size": 64, **keys})
    quantizer.input_shape = input_shape
    return quantizer


def small_net(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.ReLU(),
                        nn.Linear(32, 10))
    return net, torch.randn(64, 1, 6, 6)


def test_forward_runs_on_the_grids_and_gradients_pass_straight_through():
    net, x = small_net()
    quantizer = qat((1, 6, 6), weight_bits=3, input_bits=4)
    quantizer.prepare_training(net, Calibration(x))
    layer = net[5].eval()  # ranges held, so both forwards below round at the same scale
    assert isinstance(layer, FakeQuantLinear)
    inputs = torch.randn(16, 32) * 3
    out = layer(inputs)
    rounded = fake_quantize_weight(layer.weight.detach(), 3, "channel").requires_grad_()
    reference = F.linear(layer.input_fake_quant(inputs), rounded, layer.bias)
    assert torch.allclose(out, reference, atol=1e-6)
    assert torch.unique(torch.round(layer.input_fake_quant(inputs) / layer.input_fake_quant.scale)).numel() <= 16
    out.square().sum().backward()
    reference.square().sum().backward()
    # straight-through: the float weight gets the gradient of its rounded copy, unchanged
    assert torch.allclose(layer.weight.grad, rounded.grad, atol=1e-5)
    assert not torch.equal(layer.weight.detach(), rounded.detach())


def test_input_ranges_move_while_training_and_hold_in_eval():
    net, x = small_net()
    quantizer = qat((1, 6, 6), ema=0.5)
    quantizer.prepare_training(net, Calibration(x))
    fq = net[0].input_fake_quant
    calibrated = float(fq.scale)
    assert calibrated == pytest.approx(float(x[:64].abs().max()) / 127.5, rel=1e-5)  # exact min/max of the images
    net.eval()
    net(x * 10)
    assert float(fq.scale) == calibrated
    net.train()
    net(x * 10)
    assert float(fq.scale) > 5 * calibrated  # the moving average took half of the tenfold range


def digits_split():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, perm[:1200], perm[1200:]


def train(net: nn.Module, x, y, rows, epochs: int, lr: float) -> None:
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    order = torch.Generator().manual_seed(1)
    net.train()
    for _ in range(epochs):
        for idx in rows[torch.randperm(len(rows), generator=order)].split(64):
            optimizer.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            optimizer.step()


def accuracy(net: nn.Module, x, y, rows) -> float:
    net.eval()
    with torch.no_grad():
        return float((net(x[rows]).argmax(1) == y[rows]).float().mean())


def test_training_through_the_rounding_recovers_what_rounding_after_training_loses():
    x, y, train_rows, test_rows = digits_split()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    train(net, x, y, train_rows, 10, 0.1)
    dense = accuracy(net, x, y, test_rows)
    # control: the same 3 extra epochs in float, then 2-bit weights by post-training rounding
    control = copy.deepcopy(net)
    train(control, x, y, train_rows, 3, 0.01)
    ptq = PTQ(_target_="x", weight_bits=2, calib_size=256, calib_batch_size=64)
    ptq.input_shape = (64,)
    ptq.quantize(control, Calibration(x[train_rows]))
    after_float = accuracy(control, x, y, test_rows)
    quantizer = qat((64,), weight_bits=2, calib_size=256)
    quantizer.prepare_training(net, Calibration(x[train_rows]))
    train(net, x, y, train_rows, 3, 0.01)
    trained_as_quantized = accuracy(net, x, y, test_rows)
    quantizer.quantize(net, None)
    frozen = accuracy(net, x, y, test_rows)
    assert after_float < dense - 0.05  # 2-bit rounding hurts this MLP (0.95 -> 0.83)
    assert trained_as_quantized > after_float + 0.05  # QAT recovers most of it (0.93)
    assert frozen == pytest.approx(trained_as_quantized, abs=0.003)


def test_the_frozen_network_computes_what_it_trained_as_and_reloads():
    net, x = small_net()
    attach_mask(net[3], torch.rand(net[3].weight.shape) > 0.5)
    quantizer = qat((1, 6, 6), weight_bits=4, input_bits=6, granularity="group", group_size=8)
    quantizer.prepare_training(net, Calibration(x))
    net.train()
    net(x)  # one training forward moves the ranges
    net.eval()
    with torch.no_grad():
        trained = net(x)
    quantizer.quantize(net, None)
    assert all(is_quantized(net[i]) and type(net[i]) in (nn.Conv2d, nn.Linear) for i in (0, 3, 5))
    assert not any("input_fake_quant" in k for k in net.state_dict())
    with torch.no_grad():
        frozen = net(x)
    assert torch.allclose(frozen, trained, atol=1e-4)
    assert torch.all(net[3].weight[~net[3].weight_mask] == 0)
    summary = quantizer.summary()
    assert summary["layers"] == 3 and summary["input_scales"]["0"]["trained_input_scale"] > 0
    fresh, _ = small_net(seed=1)
    state = net.state_dict()
    restore_compression(fresh, state)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), frozen)


def test_stochastic_rounding_is_unbiased_and_on_its_grid():
    torch.manual_seed(0)
    grad = torch.randn(1000) * torch.linspace(0.01, 1, 1000)
    draws = torch.stack([stochastic_fake_quantize(grad, 4) for _ in range(2000)])
    scale = grad.abs().max() / 7
    codes = draws / scale
    assert torch.allclose(codes, torch.round(codes), atol=1e-4) and codes.abs().max() <= 7 + 1e-4
    assert torch.unique(torch.round(codes)).numel() <= 16
    assert (draws.mean(0) - grad).abs().max() < 0.03 * float(grad.abs().max())  # E[q] = g
    nearest = torch.round(grad / scale) * scale
    assert (nearest - grad).abs().mean() > 10 * (draws.mean(0) - grad).abs().mean()


def test_quantized_gradients_reach_the_weights_rounded_but_unbiased():
    net, x = small_net()
    quantizer = qat((1, 6, 6), grad_bits=4)
    quantizer.prepare_training(net, Calibration(x))
    layer = net[5].eval()  # ranges held: every draw rounds the same output gradient
    inputs = torch.randn(8, 32)

    def weight_grad(bits: int) -> torch.Tensor:
        layer.qat_settings = (*layer.qat_settings[:3], bits)
        layer.weight.grad = None
        layer(inputs).pow(2).sum().backward()
        return layer.weight.grad.clone()

    exact = weight_grad(0)
    draws = torch.stack([weight_grad(4) for _ in range(500)])
    assert not torch.allclose(draws[0], exact, atol=1e-3)
    assert (draws.mean(0) - exact).abs().max() < 0.05 * float(exact.abs().max())


def test_the_hypernetwork_feeds_each_steps_quantized_gradient_into_the_next_steps_graph():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8))
    x, y = torch.randn(64, 16), torch.randn(64, 8)
    quantizer = qat((16,), grad_bits=4, hypernet=True)
    quantizer.prepare_training(net, Calibration(x))
    run, layer = quantizer.hypernet_run, net[0]
    assert not layer.weight.requires_grad  # the look-ahead rule steps it, not the stage's optimizer
    run.sgd["lr"] = 0.1
    net.train()

    def step() -> None:
        F.mse_loss(net(x), y).backward()
        run.step(net)

    step()  # no gradient yet: the first step leaves the weight where it is
    first = layer.hyper_grad.clone()
    assert first.abs().sum() > 0
    assert torch.unique(torch.round(first / (first.abs().max() / 7))).numel() <= 16  # kept on the int4 grid
    before = layer.weight.detach().clone()
    out_bias = run.hypernet.out.bias
    F.mse_loss(net(x), y).backward()
    second = layer.hyper_grad.clone()
    # the loss of step 2 reaches the hypernetwork through W2 = W1 - lr * H(g1, W1); dW2/d(out.bias) = -lr * max|g1|
    assert out_bias.grad is not None
    assert float(out_bias.grad) == pytest.approx(float(-0.1 * first.abs().max() * second.sum()), rel=1e-4)
    run.step(net)
    # the zero-initialised correction: the first hypernetwork step is plain quantized-gradient SGD, and the weight
    # becomes exactly the look-ahead weight its loss was computed at
    assert torch.allclose(layer.weight, before - 0.1 * first, atol=1e-7)
    assert float(run.hypernet.out.bias.detach().abs()) > 0  # and the hypernetwork took its own step


def test_the_look_ahead_is_torchs_sgd_step_with_the_hypernetworks_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8))
    x, y = torch.randn(64, 16), torch.randn(64, 8)
    plain, initial = copy.deepcopy(net), net[0].weight.detach().clone()
    settings = {"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "nesterov": True, "weight_decay": 5e-4}
    quantizers = {}
    for model, hypernet in ((plain, False), (net, True)):
        quantizers[hypernet] = qat((16,), hypernet=hypernet)
        quantizers[hypernet].prepare_training(model, Calibration(x))
        model.train()
    run = quantizers[True].hypernet_run
    run.sgd = dict(settings)
    optimizer = torch.optim.SGD([plain[0].weight], **settings)
    for _ in range(3):
        optimizer.zero_grad()
        F.mse_loss(plain(x), y).backward()
        optimizer.step()
    for _ in range(4):  # one step behind: the first step has no gradient to feed forward yet
        F.mse_loss(net(x), y).backward()
        run.step(net)
        with torch.no_grad():  # hold the correction at zero: the hypernetwork is then the identity
            run.hypernet.out.weight.zero_()
            run.hypernet.out.bias.zero_()
    assert torch.allclose(net[0].weight, plain[0].weight, atol=1e-6)
    assert torch.allclose(net[0].hyper_momentum, optimizer.state[plain[0].weight]["momentum_buffer"], atol=1e-6)
    assert (net[0].weight - initial).abs().max() > 1e-3  # three real steps were taken


def regression_loss_after_training(hypernet: bool, seed: int, steps: int = 300, lr: float = 0.05) -> float:
    torch.manual_seed(seed)
    x = torch.randn(512, 32)
    y = x @ torch.randn(32, 8)
    net = nn.Sequential(nn.Linear(32, 8))
    quantizer = qat((32,), grad_bits=2, hypernet=hypernet, hypernet_lr=0.01, calib_size=256)
    quantizer.prepare_training(net, Calibration(x))
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr)
    net.train()
    for _ in range(steps):
        rows = torch.randint(0, len(x), (64,))
        optimizer.zero_grad()
        F.mse_loss(net(x[rows]), y[rows]).backward()
        if hypernet:
            quantizer.hypernet_run.sgd["lr"] = lr
            quantizer.hypernet_run.step(net)
        optimizer.step()
    net.eval()
    with torch.no_grad():
        return float(F.mse_loss(net(x), y))


def test_the_hypernetwork_learns_steps_that_beat_plain_int2_gradients():
    # linear regression with int2 gradients (stochastic rounding), same data, seeds and step size: plain quantized
    # SGD ends near 0.065 after 300 steps, the hypernetwork, trained only by the next step's loss, near 0.012
    for seed in (0, 1):
        plain = regression_loss_after_training(False, seed)
        learned = regression_loss_after_training(True, seed)
        assert learned < 0.5 * plain, (seed, plain, learned)


def test_bad_settings_and_layers_qat_would_break_are_refused():
    for bad in ({"weight_bits": 1}, {"input_bits": 9}, {"grad_bits": 1}, {"granularity": "row"}, {"epochs": 0},
                {"lr_scale": 0.0}, {"ema": 0.0}, {"hypernet_hidden": 0}, {"hypernet_lr": 0.0}):
        with pytest.raises(ValueError, match="quant."):
            QATConfig(_target_="x", **bad)

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    net = nn.Sequential(nn.Linear(4, 4), Scaled(4, 2))
    with pytest.raises(NotApplicable, match="add them to quant.exclude"):
        qat((4,)).check_applicable(net)
    qat((4,), exclude=["1"]).check_applicable(net)


@pytest.mark.slow
def test_quantize_stage_trains_keeps_masks_and_prices_int4(tmp_path):
    common = ["dataset=digits", "debug=smoke", "logger=csv", "evaluate.measure_latency=false",
              "evaluate.hardware=[a100]", "method=magnitude"]
    results = run_pipeline([*common, "quant=qat_w4a8", "quant.grad_bits=8"], tmp_path / "run")
    stage = results["stages"]["quantize"]
    assert stage["status"] == "done" and results["stages"]["evaluate"]["evaluated"].endswith("quantize.ckpt")
    assert (tmp_path / "run" / "csv" / "quantize" / "metrics.csv").is_file()  # it trained, logged as its stage
    metrics = results["metrics"]
    assert metrics["quant/weight_bits"] == 4 and metrics["quant/input_bits"] == 8
    assert abs(metrics["model/prunable_sparsity"] - 0.9) < 0.01  # masks held through the QAT epochs
    assert results["quant"]["grad_bits"] == 8 and results["quant"]["epochs"] == 2
    ptq = run_pipeline([*common, "quant=w8a8", "quant.weight_bits=4"], tmp_path / "ptq")
    assert metrics["model/weight_bytes"] == ptq["metrics"]["model/weight_bytes"]  # same format, same bytes
