"""Factorized layers: full rank reproduces the layer, truncation error = discarded singular energy,
MAC accounting, reload from a checkpoint without the factorized definition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress_run.core.factorized import (
    LowRankConv2d,
    LowRankLinear,
    Tucker2Conv2d,
    full_rank,
    is_factorized,
    rank_for_energy,
    restore_factorized,
    set_module,
    singular_values,
)
from compress_run.hardware.macs import count_macs

CONVS = [  # (C_in, C_out, kernel, stride, padding, dilation, H)
    (8, 16, (3, 3), (1, 1), (1, 1), (1, 1), 9),
    (16, 8, (3, 3), (2, 2), (1, 1), (1, 1), 10),
    (6, 12, (3, 5), (1, 2), (1, 2), (1, 1), 11),
    (4, 10, (3, 3), (1, 1), (2, 2), (2, 2), 8),
    (12, 12, (1, 1), (1, 1), (0, 0), (1, 1), 7),
]


def _conv(c_in, c_out, k, s, p, d, bias=True):
    torch.manual_seed(c_in * 31 + c_out)
    return nn.Conv2d(c_in, c_out, k, s, p, d, bias=bias)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_full_rank_linear_reproduces_the_layer():
    layer = nn.Linear(20, 12)
    x = torch.randn(5, 20)
    _close(LowRankLinear.from_linear(layer, full_rank(layer))(x), layer(x))


@pytest.mark.parametrize("spec", CONVS)
@pytest.mark.parametrize("form", ["channel", "spatial"])
def test_full_rank_conv_forms_reproduce_the_layer(spec, form):
    *args, size = spec
    layer = _conv(*args)
    x = torch.randn(2, args[0], size, size + 1)
    _close(LowRankConv2d.from_conv(layer, full_rank(layer, form), form)(x), layer(x))


@pytest.mark.parametrize("spec", CONVS)
def test_full_rank_tucker2_reproduces_the_layer(spec):
    *args, size = spec
    layer = _conv(*args)
    x = torch.randn(2, args[0], size, size)
    _close(Tucker2Conv2d.from_conv(layer, args[0], args[1])(x), layer(x))


def _product(f) -> torch.Tensor:
    """The (approximated) matrix a two-factor layer applies, in the layout singular_values() uses."""
    if isinstance(f, LowRankLinear):
        return f.second.weight @ f.first.weight
    if f.form == "channel":
        return f.second.weight[:, :, 0, 0] @ f.first.weight.reshape(f.first.weight.shape[0], -1)
    a = f.first.weight[..., 0].permute(1, 2, 0).reshape(-1, f.first.weight.shape[0])  # (C_in*k_h, r)
    b = f.second.weight[:, :, 0, :].permute(1, 0, 2).reshape(f.second.weight.shape[1], -1)  # (r, C_out*k_w)
    return a @ b


@pytest.mark.parametrize("form", ["linear", "channel", "spatial"])
@pytest.mark.parametrize("rank", [1, 3, 7])
def test_truncation_error_equals_discarded_singular_energy(form, rank):
    torch.manual_seed(rank)
    if form == "linear":
        layer, fact = nn.Linear(24, 16), None
        fact = LowRankLinear.from_linear(layer, rank)
        target = layer.weight
        s = singular_values(layer)
    else:
        layer = nn.Conv2d(8, 12, 3, padding=1)
        fact = LowRankConv2d.from_conv(layer, rank, form)
        s = singular_values(layer, form)
        w = layer.weight
        target = w.reshape(12, -1) if form == "channel" else w.permute(1, 2, 0, 3).reshape(8 * 3, 12 * 3)
    error = ((target - _product(fact)) ** 2).sum().item()
    assert error == pytest.approx((s[rank:] ** 2).sum().item(), rel=1e-3, abs=1e-6)


def test_rank_for_energy_keeps_at_least_that_energy():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])
    total = (s**2).sum()
    for energy in (0.5, 0.8, 0.95, 0.99, 1.0):
        r = rank_for_energy(s, energy)
        assert (s[:r] ** 2).sum() / total >= energy - 1e-9
        assert r == 1 or (s[: r - 1] ** 2).sum() / total < energy


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def _factorize(net: Net) -> Net:
    set_module(net, "conv2", Tucker2Conv2d.from_conv(net.conv2, 6, 8))
    set_module(net, "conv3", LowRankConv2d.from_conv(net.conv3, 5, "spatial"))
    set_module(net, "fc", LowRankLinear.from_linear(net.fc, 4))
    return net


def test_mac_counter_sees_the_factorized_shapes_and_keeps_the_dense_view():
    torch.manual_seed(0)
    dense = count_macs(Net(), (1, 3, 16, 16))
    net = _factorize(Net())
    report = count_macs(net, (1, 3, 16, 16))
    assert report.dense == pytest.approx(dense.dense, rel=1e-6)
    expected = (dense.per_module["conv1"] + (16 * 6 * 16 * 16 + 6 * 8 * 9 * 64 + 8 * 32 * 64)
                + (32 * 3 * 5 * 64 + 5 * 32 * 3 * 64) + (32 * 4 + 4 * 10))
    assert report.effective == pytest.approx(expected)
    info = net.conv2.compression_info()
    assert (info["kind"], info["form"], info["ranks"]) == ("lowrank", "tucker2", [6, 8])
    assert info["density"] == pytest.approx((16 * 6 * 4 + 6 * 8 * 9 + 8 * 32) / (16 * 32 * 9))


def test_checkpoint_rebuilds_factorized_layers_on_a_dense_network():
    torch.manual_seed(1)
    net = _factorize(Net()).eval()
    state = net.state_dict()
    fresh = Net().eval()
    assert restore_factorized(fresh, state) == 3 and is_factorized(fresh)
    fresh.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fresh(x), net(x))
