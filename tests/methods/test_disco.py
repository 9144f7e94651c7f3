"""DISCO: the masked network computes what two nodes compute when each sends only its kept cross channels; the
bytes sent are the kept gates' count; the budget per layer; the group-lasso gradient; the dense split."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compress_run.core.masks import get_mask
from compress_run.hardware.partition import node_of, split_report
from compress_run.methods.disco import CrossGroupLasso, Disco, pair_norms
from tests.conftest import run_pipeline

# each key changes the trained network or the reported split (tests/methods/test_config_keys.py flips them)
CONFIG_FLIPS = {"nodes": ("3", []), "comm_fraction": ("0.5", []), "penalty": ("0.5", []),
                "exclude": ("[classifier]", []), "bytes_per_value": ("2.0", [])}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 5 * 5, 4))


def _disco(**keys) -> Disco:
    method = Disco(_target_="x", **keys)
    method.input_shape = (1, 5, 5)
    return method


def test_each_node_computes_its_outputs_from_its_own_and_the_received_channels_only():
    net = _disco(comm_fraction=0.25).compress(_net(), None)
    conv = net[2]
    x = torch.randn(2, 8, 5, 5)
    in_node, out_node = node_of(8, 2), node_of(6, 2)
    mask = get_mask(conv)
    outputs = []
    for k in range(2):
        rows = out_node == k
        # the channels node k holds or receives: its own, and the others' that a kept weight of its rows reads
        received = mask[rows].flatten(2).any(2).any(0) | (in_node == k)
        visible = x * received.view(1, 8, 1, 1)
        outputs.append(nn.functional.conv2d(visible, conv.weight[rows], conv.bias[rows], padding=1))
    torch.testing.assert_close(torch.cat(outputs, 1), conv(x))


def test_bytes_sent_are_the_kept_gates_and_the_budget_is_per_layer():
    method = _disco(comm_fraction=0.25, bytes_per_value=2.0)
    net = method.compress(_net(), None)
    report = split_report(net, (1, 1, 5, 5), 2, bytes_per_value=2.0)
    positions = {"2": 25, "5": 1}  # input values per channel of the second conv (5x5) and of the classifier
    for layer in report.layers:
        if layer.name == "0":  # the first conv reads the network's input, which every node holds
            assert layer.received_values == [0, 0]
            continue
        assert layer.sent_channels == math.ceil(0.25 * layer.cross_channels)
        assert sum(layer.received_values) == layer.sent_channels * positions[layer.name]
    totals = report.totals()
    assert totals["bytes_sent"] == 2.0 * sum(sum(layer.received_values) for layer in report.layers)
    assert method.network_metrics(net)["bytes_sent"] == totals["bytes_sent"] < totals["bytes_sent_dense_split"]


def test_the_dense_split_sends_every_cross_channel_and_masks_nothing():
    net = _disco(comm_fraction=1.0, penalty=0.0).compress(_net(), None)
    assert all(bool(get_mask(m).all()) for m in net.modules() if get_mask(m) is not None)
    totals = split_report(net, (1, 1, 5, 5), 2).totals()
    assert totals["bytes_sent"] == totals["bytes_sent_dense_split"] and totals["communication_reduction"] == 1.0
    assert sum(totals["macs_per_node"]) == 8 * 9 * 25 + 6 * 8 * 9 * 25 + 150 * 4


def test_group_lasso_gradient_is_the_penalty_on_cross_pair_norms():
    net = _net()
    layers = {"2": net[2]}
    conv = net[2]
    conv.weight.grad = torch.zeros_like(conv.weight)
    CrossGroupLasso(layers, 2, penalty=0.3).on_after_backward(None, None)
    # autograd of 0.3 * sum over cross (node k, channel c) of ||W[rows_k, c]||
    w = conv.weight.detach().clone().requires_grad_(True)
    out_node, in_node = node_of(6, 2), node_of(8, 2)
    total = sum(w[out_node == k][:, c].pow(2).sum().sqrt() for k in range(2) for c in range(8) if in_node[c] != k)
    (0.3 * total).backward()
    torch.testing.assert_close(conv.weight.grad, w.grad)
    assert pair_norms(conv, 2)[0, :4].eq(0).all()  # node 0's own channels are not cross pairs


def test_a_run_reports_the_split_and_fewer_bytes_than_the_dense_split(tmp_path):
    results = run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "evaluate.measure_latency=false",
                            "method=disco", "model.width_mult=0.5"], tmp_path)
    m = results["metrics"]
    assert m["method/nodes"] == 2 and len(m["method/macs_per_node"]) == 2
    assert m["method/bytes_sent"] < m["method/bytes_sent_dense_split"] / 3
    assert sum(m["method/macs_per_node"]) == pytest.approx(m["model/macs_effective"], rel=1e-6)
    assert m["method/split_latency_ms"] < m["method/split_dense_split_latency_ms"]
    assert m["method/link_gbps"] == 10.0  # host_cpu: 10 Gigabit Ethernet
    slow = run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "evaluate.measure_latency=false",
                         "method=disco", "model.width_mult=0.5", "hardware.link_gbps=0.01"], tmp_path)
    assert (tmp_path / "stages/train.json").is_file() and slow["metrics"]["method/link_gbps"] == 0.01  # evaluate only
    assert slow["metrics"]["method/split_latency_ms"] > m["method/split_latency_ms"]


def test_split_latency_waits_for_the_slowest_node_and_its_link():
    from compress_run.hardware.partition import LayerSplit, SplitReport, split_latency_ms

    report = SplitReport(nodes=2, bytes_per_value=4.0, layers=[
        LayerSplit("conv", macs=[30.0, 50.0], weight_bytes=[0, 0], received_values=[250_000, 0],
                   dense_received_values=[500_000, 500_000], sent_channels=1, cross_channels=4, dense_macs=100.0)])
    times = split_latency_ms(report, {"conv": 1.0}, total_ms=3.0, link_gbps=8.0, link_latency_us=10.0)
    # 8 Gb/s = 1e6 bytes per ms: node 0 computes 0.3 ms and receives 1e6 bytes (1 ms + 10 us); node 1 0.5 ms
    assert times["latency_ms"] == pytest.approx(1.0 + max(0.3 + 1.0 + 0.01, 0.5))  # + the rest, 2.0 / 2 nodes
    assert times["dense_split_latency_ms"] == pytest.approx(1.0 + 0.5 + 2.0 + 0.01)
    assert times["one_device_latency_ms"] == 3.0


def test_a_profile_without_a_link_says_the_latency_is_not_simulated():
    from compress_run.hardware.profile import load_profile

    method = _disco(comm_fraction=0.5)
    method.hardware = load_profile("mobile_a78")
    assert method.hardware.link_gbps == 0
    net = method.compress(_net(), None)
    assert "not simulated" in method.network_metrics(net)["split_latency"]
    assert "hardware.link_gbps" in method.network_metrics(net)["split_latency"]
    method.hardware = load_profile("host_cpu")
    assert method.network_metrics(net)["link_gbps"] == 10.0
