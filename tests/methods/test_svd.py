"""SVD + finetune: target=flops lands at the MAC reduction, target=energy keeps the smallest rank holding
the energy, factorizations that save nothing stay dense (and, with skip_slower, those the hardware prices
slower), and the pipeline reloads factorized checkpoints and reports which factorized layers are slower."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress_run.core.factorized import (
    Factorized,
    LowRankConv2d,
    layer_fraction,
    rank_for_energy,
    singular_values,
)
from compress_run.hardware.layer_cost import factorized_costs
from compress_run.hardware.macs import count_macs
from compress_run.hardware.profile import load_profile
from compress_run.methods.svd import SVD
from compress_run.models.cifar_resnet import resnet20
from tests.conftest import run_pipeline

SHAPE = (1, 3, 16, 16)


def _model():
    torch.manual_seed(0)
    return resnet20(10, 3, 16).eval()


@pytest.mark.parametrize("form", ["channel", "spatial"])
@pytest.mark.parametrize("reduction", [0.3, 0.6])
def test_flops_target_meets_the_mac_reduction(form, reduction):
    model = _model()
    dense = count_macs(model, SHAPE).dense
    method = SVD(form=form, target="flops", flops_reduction=reduction)
    method.input_shape = SHAPE[1:]
    method.compress(model, None)
    effective = count_macs(model, SHAPE).effective
    assert 1 - reduction - 0.03 <= effective / dense <= 1 - reduction + 1e-9
    assert count_macs(model, SHAPE).dense == pytest.approx(dense, rel=1e-6)
    assert method.ranks and all(isinstance(model.get_submodule(n), Factorized) for n in method.ranks)
    assert not isinstance(model.conv1, Factorized) and not isinstance(model.fc, Factorized)  # excluded


def test_energy_target_keeps_the_smallest_rank_holding_that_energy():
    model = _model()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"}
    expected = {}
    for name, layer in layers.items():
        rank = rank_for_energy(singular_values(layer), 0.6)
        if layer_fraction(layer, rank) < 1.0:
            expected[name] = rank
    method = SVD(target="energy", energy=0.6)
    method.compress(model, None)
    assert method.ranks == expected
    assert set(method.left_dense) == set(layers) - set(expected)  # no MAC gain at that rank: left dense
    for name, rank in expected.items():
        assert model.get_submodule(name).ranks() == [rank]


@pytest.mark.parametrize("profile", ["host_cpu", "a100"])
def test_skip_slower_leaves_dense_exactly_the_layers_the_profile_prices_slower_factorized(profile):
    """Same energy threshold with and without skip_slower: the layers only the MAC rule factorizes are those the
    profile prices slower factorized (checked layer by layer on the factorized network), the rest are kept."""
    plain, skipping = SVD(target="energy", energy=0.6), SVD(target="energy", energy=0.6, skip_slower=True)
    skipping.hardware = load_profile(profile)
    skipping.input_shape = SHAPE[1:]
    factorized = _model()
    plain.compress(factorized, None)
    skipping.compress(_model(), None)
    costs = factorized_costs(factorized, SHAPE[1:], load_profile(profile))
    assert set(costs) == set(plain.ranks)
    assert set(skipping.ranks) == {n for n, c in costs.items() if not c["slower"]}
    assert all(skipping.ranks[n] == plain.ranks[n] for n in skipping.ranks)
    assert set(skipping.left_dense) == set(plain.left_dense) | {n for n, c in costs.items() if c["slower"]}


def test_factorized_costs_price_a_thin_factorization_faster_and_a_near_full_one_slower():
    torch.manual_seed(0)
    conv = nn.Conv2d(256, 256, 3, padding=1)
    costs = {}
    for rank in (8, 230):  # 3% and 100% of the dense MACs
        net = nn.Sequential(LowRankConv2d.from_conv(conv, rank))
        costs[rank] = factorized_costs(net, (256, 14, 14), load_profile("host_cpu"))["0"]
    assert costs[8]["factorized_ms"] < costs[8]["dense_ms"] and not costs[8]["slower"]
    assert costs[230]["factorized_ms"] > costs[230]["dense_ms"] and costs[230]["slower"]
    assert costs[8]["dense_ms"] == costs[230]["dense_ms"]


def test_unreachable_target_is_a_clear_error():
    method = SVD(target="flops", flops_reduction=0.99, min_rank=16)
    method.input_shape = SHAPE[1:]
    with pytest.raises(Exception, match="cannot be reached"):
        method.compress(_model(), None)


def test_pipeline_factorizes_finetunes_and_reloads(tmp_path):
    args = ["dataset=digits", "debug=smoke", "logger=none", "method=svd", "method.flops_reduction=0.5",
            "evaluate.measure_latency=false"]
    results = run_pipeline(args, tmp_path)
    m = results["metrics"]
    assert 0.47 <= m["model/macs_effective"] / m["model/macs_dense"] <= 0.5
    per_layer = results["lowrank_per_layer"]  # every factorized layer priced against the dense layer it replaces
    assert set(per_layer) == {n for n, r in results["method"]["ranks"].items()} and per_layer
    assert m[f"lowrank/slower_than_dense/{m['hardware']}"] == sorted(n for n, c in per_layer.items() if c["slower"])
    assert m["model/params_original"] > m["model/params_dense"]
    again = run_pipeline([*args, "evaluate.breakdown=3"], tmp_path)  # re-evaluates from the finetune checkpoint
    assert again["metrics"]["test/acc"] == m["test/acc"]
