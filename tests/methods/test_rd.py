"""Rate-distortion layer-adaptive pruning (Xu et al., ICCV 2023): the DP is the knapsack's optimum (brute force
on toys), the budget is met to one bucket in weights or MACs, the curves are what they claim (worst-case MSE
measured, the Taylor option second-order accurate), additivity is measured and reported, and the iterative
schedule never lowers a layer's sparsity."""

from __future__ import annotations

import copy
import functools
import itertools

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from compress_run.core.masks import get_mask
from compress_run.core.projections import check_pattern
from compress_run.methods.calibration import macs_per_weight
from compress_run.methods.rd import (
    RD,
    RDConfig,
    WorstCaseMSE,
    allocate_levels,
    measured_curves,
    taylor_curves,
)
from tests.conftest import run_pipeline

# tests/methods/test_config_keys.py: each key flipped changes the run (digits smoke, calib 16, 5 levels)
CONFIG_FLIPS = {
    "sparsity": ("0.5", []), "budget": ("macs", []), "pattern": ("block:4:4", []), "exclude": ("[classifier]", []),
    "mask_grads": ("false", ["trainer.gradient_clip_val=0.05"]), "calib_size": ("8", []),
    "calib_source": ("noise", []), "levels": ("3", []), "distortion": ("taylor", []),
    "taylor_probes": ("4", ["method.distortion=taylor"]), "output": ("layer3", []), "buckets": ("10", []),
    "iterative": ("true", ["method.round_fraction=0.5"]),
    "round_fraction": ("0.6", ["method.iterative=true", "method.sparsity=0.5"]),
}


def brute_force(distortion, kept, budget, unit, min_level=None):
    """min Σ D over every choice within [budget - unit, budget]; if none is, over those keeping the most
    that fits (the DP's documented fallback); None when nothing fits."""
    n_layers, n_levels = distortion.shape
    ranges = [range(min_level[n] if min_level else 0, n_levels) for n in range(n_layers)]
    fitting = []
    for levels in itertools.product(*ranges):
        total = sum(kept[n, k] for n, k in enumerate(levels))
        if total <= budget + 1e-9:
            fitting.append((sum(distortion[n, k] for n, k in enumerate(levels)), total, levels))
    if not fitting:
        return None
    band = [f for f in fitting if f[1] >= budget - unit - 1e-9]
    if not band:
        most = max(f[1] for f in fitting)
        band = [f for f in fitting if f[1] == most]
    return min(band, key=lambda f: f[0])


@pytest.mark.parametrize("seed", range(12))
def test_dp_equals_brute_force_on_a_three_layer_toy(seed):
    rng = np.random.default_rng(seed)
    levels = 6
    sizes = rng.integers(5, 40, size=3)
    # kept falls with the level (a magnitude curve), distortion rises, both with noise: not convex
    kept = np.stack([np.round(s * (1 - np.arange(levels) / (levels - 1))) for s in sizes])
    distortion = np.sort(rng.exponential(1.0, size=(3, levels)), axis=1) + rng.uniform(0, 0.3, size=(3, levels))
    budget = float(rng.integers(int(kept[:, -1].sum()) + 1, int(kept[:, 0].sum())))
    min_level = [int(rng.integers(0, 2)), 0, int(rng.integers(0, 3))] if seed % 2 else None
    expected = brute_force(distortion, kept, budget, 1.0, min_level)
    if expected is None:
        with pytest.raises(ValueError):
            allocate_levels(distortion, kept, budget, int(budget), min_level)
        return
    result = allocate_levels(distortion, kept, budget, int(budget), min_level)  # unit 1: the DP is exact
    assert result.distortion == pytest.approx(expected[0])
    assert sum(distortion[n, k] for n, k in enumerate(result.levels)) == pytest.approx(expected[0])
    assert result.kept == sum(kept[n, k] for n, k in enumerate(result.levels)) == expected[1]
    assert result.kept <= budget
    if min_level:
        assert all(k >= m for k, m in zip(result.levels, min_level, strict=True))


def test_dp_meets_a_fractional_budget_to_one_bucket():
    rng = np.random.default_rng(3)
    layers, levels = 12, 101
    sizes = rng.integers(100, 5000, size=layers)
    macs = rng.uniform(1.0, 64.0, size=layers)           # MAC budgets: kept counts times MACs per weight
    fractions = 1 - np.arange(levels) / (levels - 1)
    kept = np.stack([np.round(s * fractions) * m for s, m in zip(sizes, macs, strict=True)])
    distortion = np.cumsum(rng.exponential(1.0, size=(layers, levels)), axis=1)
    for fraction in (0.05, 0.3, 0.7):  # many layers at 101 levels: the band [budget - u, budget] is reachable
        budget = fraction * kept[:, 0].sum()
        result = allocate_levels(distortion, kept, budget, 1000)
        assert budget - result.unit <= result.kept <= budget
        assert result.kept == pytest.approx(sum(kept[n, k] for n, k in enumerate(result.levels)))


def test_nm_is_refused_and_keys_are_checked():
    with pytest.raises(ValueError, match="nothing|no per-layer"):
        RDConfig(_target_="x", pattern="nm:2:4")
    with pytest.raises(ValueError, match="method.budget"):
        RDConfig(_target_="x", budget="flops")
    with pytest.raises(ValueError, match="method.distortion"):
        RDConfig(_target_="x", distortion="mse")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))


@functools.cache
def _trained_digits_net() -> tuple[nn.Module, list[torch.Tensor]]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target)
    net = small_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x[:1024]), y[:1024]).backward()
        optimizer.step()
    net.eval()
    return net, list(x[1024:1280].split(128))


def trained_digits_net() -> tuple[nn.Module, list[torch.Tensor]]:
    net, batches = _trained_digits_net()
    return copy.deepcopy(net), batches


def test_worst_case_curves_are_the_measured_worst_sample_mse():
    net, batches = trained_digits_net()
    names = ["0", "2", "6", "8"]
    worst = WorstCaseMSE(net, batches, None)
    curves = measured_curves(net, names, worst, "irregular", 5, 1, lambda: None)
    assert curves["0"][0] == 0.0                                # 0% sparsity: the reference itself
    reference = torch.cat([net(b) for b in batches]).detach()
    layer = net[2]
    original = layer.weight.detach().clone()
    with torch.no_grad():
        threshold = original.abs().flatten().kthvalue(original.numel() // 2).values
        layer.weight.mul_(original.abs() > threshold)            # level 2 of 5 = 50% by magnitude
        pruned = torch.cat([net(b) for b in batches])
        layer.weight.copy_(original)
    assert curves["2"][2] == pytest.approx(float((pruned - reference).pow(2).mean(1).max()), rel=1e-5)
    assert all(curves[n][-1] > curves[n][1] for n in names)     # pruning a layer away distorts more
    rebatched = measured_curves(net, names, WorstCaseMSE(net, [torch.cat(batches)], None), "irregular", 5, 1,
                                lambda: None)
    assert all(rebatched[n] == pytest.approx(curves[n], rel=1e-5) for n in names)  # calib_batch_size: no effect
    parallel = measured_curves(net, names, worst, "irregular", 5, 2, lambda: None)
    assert parallel.keys() == curves.keys()                      # workers: same curves, layers split
    assert all(parallel[n] == pytest.approx(curves[n]) for n in names)


def test_taylor_distortion_is_second_order_accurate_for_small_pruning():
    net, batches = trained_digits_net()
    worst = WorstCaseMSE(net, batches, None)
    levels = 101                                                 # level 1: the smallest 1% of a layer
    taylor = taylor_curves(net, ["2", "6"], batches, None, "irregular", levels, 256, seed=0)
    for name in ("2", "6"):
        layer = dict(net.named_modules())[name]
        original = layer.weight.detach().clone()
        for level in (1, 5):
            keep = original.abs().flatten().argsort(descending=True)[: round(original.numel() * (1 - level / 100))]
            mask = torch.zeros(original.numel(), dtype=torch.bool)
            mask[keep] = True
            with torch.no_grad():
                layer.weight.copy_(original * mask.view_as(original))
                measured = worst.mean(net)
                layer.weight.copy_(original)
            assert taylor[name][level] == pytest.approx(measured, rel=0.25), (name, level)


def test_macs_per_weight_counts_output_positions_and_tokens():
    net = small_net()
    per = macs_per_weight(net, ["0", "2", "6"], torch.zeros(2, 1, 8, 8))
    assert per == {"0": 64.0, "2": 64.0, "6": 1.0}
    tokens = nn.Sequential(nn.Linear(12, 6))
    assert macs_per_weight(tokens, ["0"], torch.zeros(1, 5, 12)) == {"0": 5.0}  # one MAC per weight per token


class DigitsData:
    """What RD reads of a datamodule: the train split and the batch transfer (normalisation)."""

    def __init__(self) -> None:
        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
        self.train_set = torch.utils.data.TensorDataset(x, torch.tensor(data.target))

    def on_after_batch_transfer(self, batch, index):
        return batch


@pytest.mark.parametrize(("budget", "pattern"), [("weights", "irregular"), ("macs", "block:4:4")])
def test_compress_meets_the_budget_and_the_pattern_and_reports_additivity(budget, pattern):
    net, _ = trained_digits_net()
    method = RD(_target_="x", sparsity=0.7, budget=budget, pattern=pattern, calib_size=256, levels=21,
                buckets=500)
    method.input_shape = (1, 8, 8)
    method.compress(net, DigitsData())
    layers = {n: m for n, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    per = macs_per_weight(net, list(layers), torch.zeros(1, 1, 8, 8)) if budget == "macs" else dict.fromkeys(layers, 1)
    kept = sum(float(get_mask(m).sum()) * per[n] for n, m in layers.items())
    total = sum(m.weight.numel() * per[n] for n, m in layers.items())
    report = method.summary()
    assert report["budget_kept"] == pytest.approx(kept)
    assert 0.3 * total - report["bucket"] - 1e-6 <= kept <= 0.3 * total + 1e-6
    for m in layers.values():
        assert not check_pattern(pattern, get_mask(m))
        assert torch.equal(m.weight != 0, (m.weight != 0) & get_mask(m))
    sparsities = set(round(s, 3) for s in report["layer_sparsity"].values())
    assert len(sparsities) > 1                                   # the allocation is not uniform
    # additivity: the joint distortion of the pruned network against the DP's sum of single-layer ones
    assert report["predicted_distortion"] > 0
    assert report["additivity_ratio"] == pytest.approx(report["measured_distortion"] / report["predicted_distortion"])
    assert 0.2 < report["additivity_ratio"] < 5.0


def test_iterative_rounds_never_lower_a_layer_sparsity(tmp_path, monkeypatch):
    import lightning as L

    from compress_run.methods import rd as rd_module

    history: list[dict[str, float]] = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append({n: 1 - float(get_mask(m).float().mean()) for n, m in pl_module.net.named_modules()
                            if get_mask(m) is not None})

    original = rd_module.RD.training_callbacks
    monkeypatch.setattr(rd_module.RD, "training_callbacks", lambda self, stage, model: [
        *original(self, stage, model), *([Spy()] if stage == "finetune" else [])])
    results = run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "method=rd", "method.sparsity=0.5",
                            "method.iterative=true", "method.calib_size=32", "method.levels=6",
                            "model.width_mult=0.25",
                            "schedule.finetune.epochs=3", "trainer.limit_train_batches=4"], tmp_path)
    assert results["method"]["rounds"] == 4 and results["method"]["round"] == 4
    distinct = [h for i, h in enumerate(history) if i == 0 or h != history[i - 1]]
    assert len(distinct) == 4                                    # the compress round + 3 finetune rounds
    for before, after in zip(history, history[1:], strict=False):
        assert all(after[n] >= before[n] - 1e-9 for n in before)
    total = results["method"]["budget_total"]
    assert total * 0.5 - results["method"]["bucket"] <= results["method"]["budget_kept"] <= total * 0.5 + 1e-6
