"""Input-channel gates and selection: the narrowed network computes what the full one computes with the other
channels zeroed (every conv that reads the input narrowed, two of them in a torchvision ResNet), the gate is the
authors' module (kaix90/DCTNet, segmentation/mmdet/models/backbones/gate.py: GateModule192, initialised as
classification/models/imagenet/resnet.py: ResNetDCT_Upscaled_Static._initialize_weights), its two penalties do
what they say, and checkpoints restore both forms."""

from __future__ import annotations

import copy

import pytest
import torch

from compress_run.core.auxiliary import auxiliary_losses
from compress_run.core.frequency_input import (
    FrequencyGate,
    FrequencySelection,
    attach_gate,
    input_readers,
    select_channels,
    selected_input_channels,
)
from compress_run.core.restore import restore_compression
from compress_run.models.cifar_resnet import resnet20
from compress_run.models.frequency_stem import take_frequency_input
from compress_run.models.torchvision_models import mobilenet_v2, resnet18

CHANNELS, GRID = 16, 7


def _network(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    build = {"resnet20": lambda: resnet20(10, 1, 28), "resnet18": lambda: resnet18(10, 1, 28, width_mult=0.25),
             "mobilenet_v2": lambda: mobilenet_v2(10, 1, 28, width_mult=0.25)}[name]
    return take_frequency_input(build(), CHANNELS)


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "mobilenet_v2"])
def test_a_selection_computes_what_the_full_network_computes_with_the_other_channels_zeroed(name):
    net = _network(name).eval()
    keep = [0, 1, 4, 9, 15]
    x = torch.randn(3, CHANNELS, GRID, GRID)
    zeroed = torch.zeros_like(x)
    zeroed[:, keep] = x[:, keep]
    with torch.no_grad():
        expected = net(zeroed)
    narrowed = select_channels(copy.deepcopy(net), keep, (CHANNELS, GRID, GRID))
    readers = {"resnet20": ["conv1"], "resnet18": ["layer1.0.conv1", "layer1.0.downsample.0"],
               "mobilenet_v2": ["features.0.0"]}[name]
    assert narrowed == readers
    selected = select_channels(net, keep, (CHANNELS, GRID, GRID))
    with torch.no_grad():
        assert torch.allclose(net(x), expected, atol=1e-5)
    assert all(net.get_submodule(r).weight.shape[1] == len(keep) for r in selected)
    assert selected_input_channels(net) == len(keep)


def test_the_gate_is_the_authors_module_pooled_mean_then_conv_bn_relu_then_two_logits_per_channel():
    torch.manual_seed(0)
    gate = FrequencyGate(6, target=0.25, loss_weight=1.0, temperature=1.0).train()
    conv, bn, relu = gate.hidden
    assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
    assert conv.kernel_size == (1, 1) and (conv.in_channels, conv.out_channels, conv.groups) == (6, 6, 1)
    assert conv.bias is not None and torch.equal(conv.bias, torch.zeros(6))
    decide = gate.decide
    assert decide.kernel_size == (1, 1) and (decide.in_channels, decide.out_channels, decide.groups) == (6, 12, 6)
    assert decide.bias[0::2].eq(0.1).all() and decide.bias[1::2].eq(2.0).all()  # (off, on) of each channel
    assert 0.0 < decide.weight.std() < 0.003  # N(0, 0.001)
    x = torch.randn(4, 6, 3, 3)
    pooled = x.mean(dim=(2, 3), keepdim=True)  # the plain average, not the magnitude
    hidden = torch.relu(torch.nn.functional.batch_norm(conv(pooled), None, None, training=True))
    expected = torch.nn.functional.conv2d(hidden, decide.weight, decide.bias, groups=6).view(4, 6, 2)
    assert torch.allclose(gate.logits(x), expected, atol=1e-6)
    assert not torch.allclose(gate.logits(x), gate.logits(-x))
    # every channel starts open with probability softmax(0.1, 2)[on] = 0.87
    assert torch.allclose(gate.eval().on_probability(x), torch.full((4, 6), 0.8699), atol=0.005)


def train_on_penalty_alone(gate: FrequencyGate, x: torch.Tensor, lr: float, steps: int) -> None:
    """Adam steps on the gate's own penalty term only."""
    optimizer = torch.optim.Adam(gate.parameters(), lr=lr)
    for _ in range(steps):
        gate(x)
        loss = gate.pop_auxiliary_losses()["channel_penalty"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_the_authors_penalty_is_the_share_of_open_gates_and_alone_shuts_them():
    torch.manual_seed(0)
    gate = FrequencyGate(16, target=0.25, loss_weight=2.0, temperature=1.0).train()
    x = torch.randn(8, 16, 2, 2)
    out = gate(x)
    open_share = (out != 0).all(dim=3).all(dim=2).float().mean()
    assert gate.pop_auxiliary_losses()["channel_penalty"].item() == pytest.approx(2.0 * open_share.item())
    train_on_penalty_alone(gate, x, lr=0.05, steps=60)
    assert gate.eval().on_probability(x).mean() < 0.1


def test_the_target_penalty_alone_pulls_the_open_share_of_the_gates_to_the_target():
    torch.manual_seed(0)
    gate = FrequencyGate(64, target=0.25, loss_weight=5.0, temperature=1.0, penalty="target").train()
    x = torch.randn(8, 64, 2, 2)
    start = gate.on_probability(x).mean().item()
    train_on_penalty_alone(gate, x, lr=0.02, steps=150)
    assert start > 0.8 and abs(gate.on_probability(x).mean().item() - 0.25) < 0.03
    assert gate.pop_auxiliary_losses() == {}  # handed over once


class _Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def test_under_the_authors_penalty_the_task_keeps_the_channels_it_needs_open():
    """Two of eight channels carry the label; the gate trained with a small classifier ranks them first."""
    torch.manual_seed(0)
    x = torch.randn(512, 8, 2, 2)
    y = ((x[:, 2].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 5].mean(dim=(1, 2)) > 0).long())
    head = _Classifier()
    gate = attach_gate(head, 8, 0.25, 0.5, 1.0)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.02)
    for step in range(200):
        batch = slice(64 * (step % 8), 64 * (step % 8 + 1))
        loss = torch.nn.functional.cross_entropy(head.train()(x[batch]), y[batch])
        loss = loss + auxiliary_losses(head)["channel_penalty"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        probability = gate.eval().on_probability(x).mean(dim=0)
    assert set(probability.argsort(descending=True)[:2].tolist()) == {2, 5}


def test_training_decisions_are_hard_per_image_and_let_the_task_gradient_reach_the_gate():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(8, 2, 1)
    gate = attach_gate(model, 8, 0.5, 1.0, 1.0)
    x = torch.randn(4, 8, 3, 3)
    seen = {}
    model.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]), prepend=False)
    model.train()(x).sum().backward()
    ratio = seen["x"] / x
    assert set(ratio.flatten().round().tolist()) <= {0.0, 1.0}  # each channel of each image fully on or off
    assert gate.decide.bias.grad is not None and gate.decide.bias.grad.abs().sum() > 0
    assert gate.hidden[0].weight.grad is not None and gate.hidden[0].weight.grad.abs().sum() > 0
    assert "channel_penalty" in auxiliary_losses(model)
    model.eval()
    with torch.no_grad():
        gate.decide.weight.zero_()
        gate.decide.bias.copy_(torch.tensor([0.0, 5.0, 5.0, 0.0] * 4))  # channels on, off, on, off, ...
        out = model(x)
        expected = torch.nn.functional.conv2d(x * torch.tensor([1.0, 0.0] * 4)[None, :, None, None],
                                              model.weight, model.bias)
    assert torch.allclose(out, expected, atol=1e-6)  # evaluation: the likelier decision


@pytest.mark.parametrize("form", ["gate", "target gate", "selection"])
def test_a_checkpoint_restores_the_gate_or_the_selection_with_identical_outputs(form):
    net = _network("resnet18")
    attach_gate(net, CHANNELS, 0.25, 5.0, 1.5, "target" if form == "target gate" else "gates")
    if form == "selection":
        select_channels(net, [2, 3, 7], (CHANNELS, GRID, GRID))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    state = net.state_dict()
    fresh = _network("resnet18")
    assert restore_compression(fresh, state)["frequency_input"] == 1
    fresh.load_state_dict(state)
    x = torch.randn(2, CHANNELS, GRID, GRID)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), net.eval()(x), atol=1e-6)
    part = FrequencySelection if form == "selection" else FrequencyGate
    assert isinstance(fresh.frequency_input, part)
    if form != "selection":
        assert fresh.frequency_input.penalty == ("target" if form == "target gate" else "gates")
        assert float(fresh.frequency_input.temperature) == 1.5


def test_a_deep_copy_keeps_its_own_selection_and_a_network_without_an_input_conv_is_refused():
    net = _network("resnet20")
    select_channels(net, [0, 5], (CHANNELS, GRID, GRID))
    twin = copy.deepcopy(net)
    select_channels(twin, [0], (2, GRID, GRID))  # re-selecting the copy leaves the original alone
    assert selected_input_channels(net) == 2 and selected_input_channels(twin) == 1
    with pytest.raises(ValueError, match="no conv reads"):
        input_readers(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), (4,))
