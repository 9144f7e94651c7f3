"""Per-layer kernel choice: every masked layer is timed with each kernel that can run it (gather-scatter only
for GS-valid masks), the choice is the fastest recorded, and the executed model computes the masked model's
outputs whatever was chosen."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress_run.core.masks import attach_mask, get_mask
from compress_run.core.projections import project
from compress_run.hardware.kernel_choice import choose_kernels
from compress_run.kernels.select import HOST_CANDIDATES, executed_layer, to_fastest


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1, stride=2)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc = nn.Linear(32, 16)

    def forward(self, x):
        return self.fc(self.dw(torch.relu(self.conv2(torch.relu(self.conv1(x))))).mean((2, 3)))


def _masked_net() -> _Net:
    torch.manual_seed(0)
    net = _Net().eval()
    attach_mask(net.conv2, project("gather_scatter:16", net.conv2.weight.abs(), 0.1))
    attach_mask(net.fc, project("irregular", net.fc.weight.abs(), 0.2))
    attach_mask(net.dw, project("irregular", net.dw.weight.abs(), 0.5))
    return net


def test_choice_is_the_fastest_timed_kernel_and_outputs_match():
    net = _masked_net()
    choice = choose_kernels(net, (3, 12, 12), repeats=3, min_time_s=0.0)
    assert set(choice) == {"conv2", "fc", "dw"}  # conv1 has no mask
    for row in choice.values():
        assert row["kernel"] == min(row["ms"], key=row["ms"].__getitem__)
    assert "gather_scatter" in choice["conv2"]["ms"]
    assert "gather_scatter" not in choice["fc"]["ms"]  # fc's mask is not GS-valid
    assert set(choice["dw"]["ms"]) == {"dense"}  # no sparse kernel runs a depthwise conv
    assert set(choice["conv2"]["ms"]) == {"dense", *HOST_CANDIDATES}  # nm_2_4 needs CUDA and a 2:4 mask
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(to_fastest(net, choice)(x), net(x), atol=1e-5)


@pytest.mark.parametrize("fmt", HOST_CANDIDATES)
def test_every_kernel_computes_the_masked_layer(fmt):
    net = _masked_net()
    x = torch.randn(2, 32, 12, 12)
    with torch.no_grad():
        assert torch.allclose(executed_layer(net.conv2, fmt)(x), net.conv2(x), atol=1e-5)
    forced = {"conv2": {"kernel": fmt}, "fc": {"kernel": "dense" if fmt == "gather_scatter" else fmt},
              "dw": {"kernel": "dense"}}
    with torch.no_grad():
        x = torch.randn(2, 3, 12, 12)
        assert torch.allclose(to_fastest(net, forced)(x), net(x), atol=1e-5)
    assert get_mask(net.conv2) is not None  # the original model is left as it was


def test_gs_needs_a_gs_mask():
    net = _masked_net()
    with pytest.raises(ValueError, match="gather-scatter"):
        executed_layer(net.fc, "gather_scatter")


def test_2_of_4_kernel_is_refused_off_cuda_or_without_a_2_of_4_mask():
    net = _masked_net()
    with pytest.raises(ValueError, match="CUDA|2:4"):
        executed_layer(net.conv2, "nm_2_4")
