"""HALOC: candidates are hardware-granular ranks that save MACs, the LUT comes from the chosen cost
source, a candidate layer mixes its Tucker-2 branches, the search lowers the expected latency of a tiny
model, profiles with a different cost structure choose different ranks, and the pipeline runs end to end."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from compress_run.core.errors import UserError
from compress_run.core.factorized import Tucker2Conv2d, tucker2_fraction
from compress_run.hardware.layer_cost import layer_cost
from compress_run.hardware.profile import load_profile
from compress_run.methods.haloc import HALOC, CandidateConv, candidate_ranks
from tests.conftest import run_pipeline


def test_candidates_are_multiples_of_the_granularity_that_save_macs():
    conv = nn.Conv2d(32, 64, 3, padding=1)
    ranks = candidate_ranks(conv, 8)
    assert ranks == [r for r in range(8, 33, 8) if tucker2_fraction(32, 64, (3, 3), r, r) < 1]
    assert ranks and ranks[-1] <= 32
    assert candidate_ranks(nn.Conv2d(16, 16, 3), 16) == []  # full-rank Tucker-2 of 16 channels costs more


def test_lut_sources():
    profile = load_profile("host_cpu")
    conv = nn.Conv2d(64, 64, 3, padding=1)
    shape = (1, 64, 16, 16)
    dense_macs = layer_cost(conv, shape, "macs", profile)
    assert dense_macs == 64 * 64 * 9 * 16 * 16
    for r in (8, 32):
        assert layer_cost(Tucker2Conv2d.like(conv, r, r), shape, "macs", profile) == pytest.approx(
            dense_macs * tucker2_fraction(64, 64, (3, 3), r, r))
    simulated = [layer_cost(Tucker2Conv2d.like(conv, r, r), shape, "simulated", profile) for r in (8, 32, 56)]
    assert simulated == sorted(simulated) and simulated[0] < simulated[-1]
    assert layer_cost(conv, shape, "measured", profile) > 0


def test_candidate_layer_mixes_branches_and_measures_interference():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    layer = CandidateConv(conv, [8, 16], [1.0, 2.0])
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        layer.logits.copy_(torch.tensor([-50.0, 50.0]))  # all mass on the full-rank branch
        layer.tau = 0.1
        out = layer(x)
    assert torch.allclose(out, conv(x), atol=1e-4)  # full-rank HOSVD branch = the conv
    assert layer.expected_cost().item() == pytest.approx(2.0)
    assert layer.interference.item() > 0  # the rank-8 branch differs from the conv
    assert not layer.reference.weight.requires_grad


def _digits_batches():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = nn.functional.interpolate(x, size=16, mode="bilinear").repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target)
    return list(zip(x[:640].split(32), y[:640].split(32), strict=True))


def _tiny_net() -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(*block(3, 64), *block(64, 64), *block(64, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(96, 10))


def _search(profile: str) -> tuple[HALOC, dict[str, int]]:
    """A tiny CNN whose layers are compute-bound on the host at batch 16 (16×16 images, 64-96 channels)."""
    torch.manual_seed(0)
    net = _tiny_net()
    method = HALOC(hardware=profile, granularity=8, search_epochs=1, arch_lr=0.1, latency_fraction=0.3,
                   lut_batch=16, exclude=["0"])
    method.input_shape = (3, 16, 16)
    wrapped = method.wrap(net)
    method.search(net, wrapped, _digits_batches())
    return method, {n: w.ranks[int(w.logits.argmax())] for n, w in wrapped.items()}


def test_search_lowers_expected_latency_and_profiles_choose_differently():
    host, host_ranks = _search("host_cpu")
    costs = [h["expected_cost"] for h in host.history]
    assert costs[-1] < costs[0] and costs[-1] < 0.97 * costs[0]
    mobile, mobile_ranks = _search("mobile_a78")
    # the cheapest ranks cost 0.28 of dense on the host but 0.05 on the mobile core: the 0.3 target binds
    # on the host only, so the host ends at lower ranks
    host_floor = sum(min(t["costs"]) for t in host.luts.values()) / sum(t["dense"] for t in host.luts.values())
    mobile_floor = sum(min(t["costs"]) for t in mobile.luts.values()) / sum(t["dense"] for t in mobile.luts.values())
    assert mobile_floor < 0.5 * host_floor < 0.3
    assert host_ranks != mobile_ranks and sum(host_ranks.values()) < sum(mobile_ranks.values())


def _tables(profile: str, **keys) -> HALOC:
    method = HALOC(hardware=profile, granularity=8, exclude=["0"], **{"lut_batch": 16, **keys})
    method.input_shape = (3, 16, 16)
    method.lookup_tables(_tiny_net())
    return method


def test_no_candidate_is_slower_than_the_dense_conv_on_the_target():
    host = _tables("host_cpu", lut_batch=1)  # at batch 1 the host's per-kernel overhead dominates
    macs_ranks = {name: candidate_ranks(layer, 8) for name, layer in host.layers(_tiny_net()).items()}
    for name, lut in host.luts.items():
        assert all(cost < lut["dense"] for cost in lut["costs"])
        conv = host.layers(_tiny_net())[name]
        slower = [r for r in macs_ranks[name] if r not in lut["ranks"]]
        assert slower, "batch 1 should make the top ranks slower than the dense conv on the host"
        assert all(layer_cost(Tucker2Conv2d.like(conv, r, r), (1, conv.in_channels, 16, 16), "simulated",
                              load_profile("host_cpu")) >= lut["dense"] for r in slower)
    # on a GPU these layers are launch-bound: three kernels never beat one, so nothing is searched
    with pytest.raises(UserError, match="no rank is cheaper than the dense conv on a100"):
        _tables("a100").check_target()


def test_an_unreachable_latency_target_is_refused_with_the_reachable_range():
    method = _tables("host_cpu", latency_fraction=0.2)
    floor = sum(min(t["costs"]) for t in method.luts.values()) / sum(t["dense"] for t in method.luts.values())
    assert 0.2 < floor < 0.3
    with pytest.raises(UserError, match=rf"reachable range {math.ceil(floor * 1000) / 1000} <= latency_fraction"):
        method.check_target()
    _tables("host_cpu", latency_fraction=0.3).check_target()  # reachable: no error


def test_pipeline_searches_builds_tucker2_and_reloads(tmp_path):
    # 8x8 digits: only the mobile core at batch 64 has Tucker-2 ranks faster than the dense convs
    args = ["dataset=digits", "debug=smoke", "logger=none", "method=haloc", "method.granularity=8",
            "method.hardware=mobile_a78", "method.lut_batch=64", "method.search_epochs=0.5",
            "evaluate.measure_latency=false"]
    results = run_pipeline(args, tmp_path)
    info = results["method"]
    assert info["ranks"] and info["hardware"] == "mobile_a78" and info["chosen_cost_fraction"] < 1
    assert all(r % 8 == 0 for r in info["ranks"].values())
    m = results["metrics"]
    assert m["model/macs_effective"] < m["model/macs_dense"]
    again = run_pipeline([*args, "evaluate.breakdown=3"], tmp_path)
    assert again["metrics"]["test/acc"] == m["test/acc"]


def test_granularity_without_candidates_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="smaller method.granularity"):
        run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "method=haloc", "method.granularity=64",
                      "evaluate.measure_latency=false"], tmp_path)
