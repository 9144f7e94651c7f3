"""ADMM: Z is the pattern projection of W + U and U accumulates W - Z, the added gradient is
rho (W - Z + U), training with the penalty brings W towards its projection, hardening yields the
pattern (checked by the pattern's own checker), and the Z/U state survives a checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress_run.core.masks import get_mask
from compress_run.core.projections import as_matrix, check_gather_scatter, project
from compress_run.methods.admm import ADMM, ADMMCallback
from tests.conftest import run_pipeline


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))


def _module(net):
    return type("M", (), {"net": net, "log": lambda *a, **k: None})()


def test_z_u_updates_and_penalty_gradient():
    torch.manual_seed(0)
    net = _Net()
    method = ADMM(sparsity=0.75, pattern="nm:1:4", rho=0.5)
    callback = ADMMCallback(method)
    callback.update(net)
    w = net.conv2.weight.detach()
    assert torch.equal(callback.z["conv2"], w * project("nm:1:4", w.abs(), 0.25))
    assert not callback.u["conv2"].any()  # U = 0 at the start
    callback.update(net)
    assert torch.allclose(callback.u["conv2"], w - callback.z["conv2"])
    with torch.no_grad():
        net.conv2.weight.add_(0.1)
    u_before = callback.u["conv2"].clone()
    callback.update(net)
    target = net.conv2.weight.detach() + u_before
    assert torch.allclose(callback.z["conv2"], target * project("nm:1:4", target.abs(), 0.25))
    assert torch.allclose(callback.u["conv2"], u_before + net.conv2.weight.detach() - callback.z["conv2"], atol=1e-6)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    callback.on_before_optimizer_step(None, _module(net), None)
    expected = 0.5 * (net.conv2.weight.detach() - callback.z["conv2"] + callback.u["conv2"])
    assert torch.allclose(net.conv2.weight.grad, expected)
    assert "conv1" not in callback.z and "fc" not in callback.z  # excluded by default


def test_penalty_brings_weights_to_the_pattern():
    torch.manual_seed(0)
    net = _Net()
    method = ADMM(sparsity=0.9, pattern="gather_scatter:16", rho=2.0)
    callback = ADMMCallback(method)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    distances = []  # energy of W outside its own projection onto the pattern
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):  # "epochs" of 10 steps
        callback.update(net)
        w = net.conv2.weight.detach()
        distances.append(float((w - w * project("gather_scatter:16", w.abs(), 0.1)).norm() / w.norm()))
        for _ in range(10):
            x, y = torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            callback.on_before_optimizer_step(None, _module(net), optimizer)
            optimizer.step()
    assert distances[-1] < 0.3 * distances[0]  # measured: 0.853 -> 0.095
    method.compress(net, None)
    assert check_gather_scatter(get_mask(net.conv2), 16, 1) == []
    assert 1 - get_mask(net.conv2).float().mean().item() == pytest.approx(0.9, abs=0.02)


@pytest.mark.parametrize("pattern", ["nm:2:4", "block:4:4"])
def test_pipeline_hardens_to_the_pattern_and_resumes_state(tmp_path, pattern):
    results = run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "method=admm", "method.sparsity=0.5",
                            f"method.pattern={pattern}", "evaluate.measure_latency=false"], tmp_path)
    assert results["metrics"]["model/prunable_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert results["method"]["last_residual"] is not None
    ckpt = torch.load(tmp_path / "checkpoints" / "train.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if "ADMMCallback" in k)
    assert state["z"] and state["u"]
    from compress_run.pipeline.runner import Pipeline  # noqa: F401  (checkpoint written by the pipeline)
    finetuned = torch.load(tmp_path / "checkpoints" / "finetune.ckpt", weights_only=False)["state_dict"]
    mask = finetuned["net.layer1.0.conv1.weight_mask"]
    if pattern == "nm:2:4":
        assert (as_matrix(mask).reshape(mask.shape[0], -1, 4).sum(2) == 2).all()
