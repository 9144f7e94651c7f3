"""ELRT: the network is Tucker-2 from the start at the MAC target, factors start orthogonal, the added
gradient is the soft-orthogonality penalty's, the penalty keeps the factors nearer orthogonal under
weight decay, and the pipeline trains and reloads the Tucker-2 network without compress/finetune."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress_run.core.factorized import Tucker2Conv2d
from compress_run.hardware.macs import count_macs
from compress_run.methods.elrt import ELRT, SoftOrthogonality, orthogonality_residual
from compress_run.models.cifar_resnet import resnet20
from tests.conftest import run_pipeline

SHAPE = (1, 3, 16, 16)


def _prepared(**keys) -> tuple[nn.Module, ELRT]:
    torch.manual_seed(0)
    method = ELRT(**keys)
    method.input_shape = SHAPE[1:]
    return method.prepare(resnet20(10, 3, 16)), method


@pytest.mark.parametrize("reduction", [0.5, 0.7])
def test_flops_target_builds_a_tucker2_network_at_the_mac_reduction(reduction):
    dense = count_macs(resnet20(10, 3, 16), SHAPE).dense
    net, method = _prepared(target="flops", flops_reduction=reduction)
    report = count_macs(net, SHAPE)
    assert report.dense == pytest.approx(dense, rel=1e-6)  # the MAC counter sees the original layers
    assert 1 - reduction - 0.05 <= report.effective / dense <= 1 - reduction + 1e-9
    convs = [n for n, m in resnet20(10, 3, 16).named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"]
    assert all(isinstance(net.get_submodule(n), Tucker2Conv2d) for n in convs)
    assert isinstance(net.conv1, nn.Conv2d) and not isinstance(net.conv1, Tucker2Conv2d)
    for layer in (m for m in net.modules() if isinstance(m, Tucker2Conv2d)):
        assert orthogonality_residual(layer).item() < 1e-8  # orthogonal start


def test_ratio_target_and_resume_rebuild_the_same_structure():
    net_a, method = _prepared(target="ratio", rank_ratio=0.25)
    assert method.ranks["layer3.0.conv2"] == [16, 16]
    net_b, _ = _prepared(target="ratio", rank_ratio=0.25)
    assert [tuple(p.shape) for p in net_a.parameters()] == [tuple(p.shape) for p in net_b.parameters()]


def test_added_gradient_is_the_penalty_gradient():
    net, method = _prepared(target="ratio", rank_ratio=0.5, ortho_weight=0.1)
    layer = net.layer2[0].conv2
    with torch.no_grad():
        layer.last.weight.mul_(1.5)  # move off orthogonality
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    SoftOrthogonality(method).on_before_optimizer_step(None, type("M", (), {"net": net})(), None)
    u_out = layer.last.weight[:, :, 0, 0].detach()
    analytic = 4 * 0.1 * u_out @ (u_out.T @ u_out - torch.eye(u_out.shape[1]))
    assert torch.allclose(layer.last.weight.grad[:, :, 0, 0], analytic, atol=1e-6)
    assert layer.last.weight.grad.abs().max() > 0.1


def _mean_residual_after_training(ortho_weight: float) -> float:
    net, method = _prepared(target="ratio", rank_ratio=0.5, ortho_weight=ortho_weight)
    callback = SoftOrthogonality(method)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=5e-3)
    gen = torch.Generator().manual_seed(0)
    module = type("M", (), {"net": net})()
    for _ in range(30):
        x, y = torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        callback.on_before_optimizer_step(None, module, optimizer)
        optimizer.step()
    method.record_residual(net)
    return method.residual


def test_penalty_keeps_factors_nearer_orthogonal():
    assert _mean_residual_after_training(0.05) < 0.5 * _mean_residual_after_training(0.0)


def test_pipeline_trains_the_tucker2_network_and_reloads(tmp_path):
    args = ["dataset=digits", "debug=smoke", "logger=none", "method=elrt", "method.flops_reduction=0.6",
            "evaluate.measure_latency=false"]
    results = run_pipeline(args, tmp_path)
    m = results["metrics"]
    assert 0.35 <= m["model/macs_effective"] / m["model/macs_dense"] <= 0.4
    assert results["stages"]["compress"]["status"] == "skipped"
    assert results["method"]["orthogonality_residual"] is not None
    again = run_pipeline([*args, "evaluate.breakdown=3"], tmp_path)  # re-evaluates from the train checkpoint
    assert again["metrics"]["test/acc"] == m["test/acc"]
