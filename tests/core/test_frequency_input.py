"""Input-channel gates and selection: the narrowed network computes what the full one computes with the other
channels zeroed (every conv that reads the input narrowed, two of them in a torchvision ResNet), the gate's
penalty pulls the open share to its target, and checkpoints restore both forms."""

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


def test_the_penalty_alone_pulls_the_open_share_of_the_gates_to_the_target():
    torch.manual_seed(0)
    gate = FrequencyGate(64, target=0.25, loss_weight=5.0, temperature=1.0).train()
    x = torch.randn(8, 64, 2, 2)
    start = gate.on_probability(x).mean().item()
    optimizer = torch.optim.Adam(gate.parameters(), lr=0.005)
    for _ in range(150):
        gate(x)
        loss = gate.pop_auxiliary_losses()["channel_penalty"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert start > 0.8 and abs(gate.on_probability(x).mean().item() - 0.25) < 0.03
    assert gate.pop_auxiliary_losses() == {}  # handed over once


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
    assert gate.bias.grad is not None and gate.bias.grad.abs().sum() > 0
    assert "channel_penalty" in auxiliary_losses(model)
    model.eval()
    with torch.no_grad():
        gate.bias.copy_(torch.tensor([5.0, -5.0] * 4))
        out = model(x)
        expected = torch.nn.functional.conv2d(x * torch.tensor([1.0, 0.0] * 4)[None, :, None, None],
                                              model.weight, model.bias)
    assert torch.allclose(out, expected, atol=1e-6)  # evaluation: the channels above probability 1/2


@pytest.mark.parametrize("form", ["gate", "selection"])
def test_a_checkpoint_restores_the_gate_or_the_selection_with_identical_outputs(form):
    net = _network("resnet18")
    attach_gate(net, CHANNELS, 0.25, 5.0, 1.0)
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


def test_a_deep_copy_keeps_its_own_selection_and_a_network_without_an_input_conv_is_refused():
    net = _network("resnet20")
    select_channels(net, [0, 5], (CHANNELS, GRID, GRID))
    twin = copy.deepcopy(net)
    select_channels(twin, [0], (2, GRID, GRID))  # re-selecting the copy leaves the original alone
    assert selected_input_channels(net) == 2 and selected_input_channels(twin) == 1
    with pytest.raises(ValueError, match="no conv reads"):
        input_readers(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), (4,))
