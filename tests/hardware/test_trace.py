"""Dispatch-level trace: op classes, PyTorch's conv backend rule, bytes and module attribution."""

from __future__ import annotations

import math

from torch import nn

from compress_run.hardware.trace import trace_model


def test_conv_backend_follows_pytorch_rule_and_inplace_ops_move_memory():
    net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.ReLU(inplace=True))
    small = trace_model(net, (1, 16, 32, 32))       # 16384 input values <= 20480, batch 1: unfold + GEMM
    kinds = [op.kind for op in small.ops if op.kind != "view"]
    assert kinds == ["conv_im2col", "elementwise"]
    relu = [op for op in small.ops if op.kind == "elementwise"][0]
    assert relu.in_bytes == relu.out_bytes == 16 * 32 * 32 * 4
    assert [op.kind for op in trace_model(net, (2, 16, 32, 32)).ops if op.kind != "view"][0] == "conv"
    depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    assert [op.kind for op in trace_model(depthwise, (1, 16, 32, 32)).ops if op.macs] == ["conv_dw"]


def test_weights_are_separated_from_activations_and_ops_attributed_to_modules():
    net = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8))
    trace = trace_model(net, (4, 64))
    gemms = [op for op in trace.ops if op.kind == "gemm"]
    assert [op.module for op in gemms] == ["0", "2"]
    assert gemms[0].weight_bytes == (64 * 32 + 32) * 4 and gemms[0].in_bytes == 4 * 64 * 4
    assert gemms[0].gemms == [(1, 4, 32, 64)] and gemms[0].macs == 4 * 64 * 32
    assert trace.module_calls == 4  # the Sequential and its three children


def test_pooling_work_counts_the_window():
    trace = trace_model(nn.MaxPool2d(3, 2, 1), (1, 8, 16, 16))
    (pool,) = [op for op in trace.ops if op.kind == "pool"]
    assert pool.work == 8 * 8 * 8 * 9


def test_input_creation_is_not_traced():
    trace = trace_model(nn.Identity(), (1, 3, 8, 8))
    assert not [op for op in trace.ops if op.kind != "view"] and trace.macs == 0


class _Select(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x):
        return x.topk(self.k, dim=-1, sorted=False)[0].sum() + x.sort(dim=-1)[0].sum()


def test_top_k_and_sort_are_priced_by_the_elements_they_read_not_the_k_they_return():
    """A selection's time grows with the elements it scans (E-ViT's attention level takes a top-k over every
    attention row), so a top-k is a ``select`` op whose work is its input, whatever k; a sort's work is its input
    x log2 of the sorted length. The GPU profiles, which have no measured class for them, price them as
    elementwise ops."""
    from compress_run.hardware.profile import load_profile

    for k in (3, 90):
        ops = {op.kind: op for op in trace_model(_Select(k), (4, 100)).ops if op.kind in ("select", "sort")}
        assert ops["select"].op == "topk" and ops["select"].work == 4 * 100
        assert ops["sort"].work == round(4 * 100 * math.log2(100))
    a100 = load_profile("a100")
    assert a100.peak("select") == a100.peak("sort") == a100.peak("elementwise")
