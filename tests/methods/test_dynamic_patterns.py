"""Dynamic sparse training keeps the pattern: after every mask update of a real RigL or MEST run, every mask
passes its pattern's checker and every layer keeps its count, for every pattern the projections know."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from compress_run.core.masks import get_mask, prunable_layers
from compress_run.core.projections import PATTERNS, check_pattern, drop_and_regrow, parse_pattern
from compress_run.methods import mest as mest_module
from compress_run.methods import rigl as rigl_module
from tests.conftest import run_pipeline

PATTERN_SPECS = ["irregular", "nm:2:4", "block:4:4", "filter", "channel", "gather_scatter:16",
                 "gather_scatter:8:1:16"]


def test_every_registered_pattern_is_covered():
    assert {parse_pattern(p)[0] for p in PATTERN_SPECS} == set(PATTERNS)


class MaskSpy(L.Callback):
    """After every batch: the pattern's violations per layer, the counts, and whether any mask changed."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.problems: list[str] = []
        self.counts: list[dict[str, int]] = []
        self.changes = 0
        self.last: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        counts = {}
        for name, layer in prunable_layers(pl_module.net).items():
            mask = get_mask(layer)
            self.problems += [f"step {trainer.global_step} {name}: {p}" for p in check_pattern(self.pattern, mask)]
            counts[name] = int(mask.sum())
            if name in self.last and not torch.equal(self.last[name], mask):
                self.changes += 1
            self.last[name] = mask.clone()
        self.counts.append(counts)


# gather-scatter runs take a minute each: they run in the slow set (CI runs it, Makefile CI_SLOW_TESTS)
REAL_RUN_SPECS = [pytest.param(p, marks=pytest.mark.slow) if p.startswith("gather_scatter") else p
                  for p in PATTERN_SPECS]


@pytest.mark.parametrize("method", ["rigl", "mest"])
@pytest.mark.parametrize("pattern", REAL_RUN_SPECS)
def test_every_update_of_a_real_run_keeps_the_pattern_and_the_counts(tmp_path, monkeypatch, method, pattern):
    spy = MaskSpy(pattern)
    module = rigl_module.RigL if method == "rigl" else mest_module.MEST
    original = module.training_callbacks
    monkeypatch.setattr(module, "training_callbacks", lambda self, stage, model: [
        *original(self, stage, model), *([spy] if stage == "train" else [])])
    sparsity = "0.5" if pattern.startswith("nm") else "0.75"
    extra = ["method.delta_t=2", "method.end_fraction=1.0", "method.alpha=0.5", "method.distribution=uniform"] \
        if method == "rigl" else ["method.mode=em", "method.update_every=1"]
    run_pipeline(["dataset=digits", "debug=smoke", "logger=none", f"method={method}", f"method.pattern={pattern}",
                  f"method.sparsity={sparsity}", "schedule.train.epochs=2", "stages=[train]", "model.width_mult=0.5",
                  "evaluate.measure_latency=false", *extra], tmp_path)
    assert len(spy.counts) >= 6
    assert not spy.problems, spy.problems[:5]
    assert all(c == spy.counts[0] for c in spy.counts), "a layer's count changed"
    assert spy.changes > 0, "no update changed a mask: the test would not see a broken pattern"


@pytest.mark.parametrize("pattern", PATTERN_SPECS)
def test_drop_and_regrow_moves_whole_units_and_prefers_the_grow_scores(pattern):
    torch.manual_seed(0)
    density = 0.5 if pattern.startswith("nm") else 0.25
    from compress_run.core.projections import project

    weight = torch.randn(32, 16, 3, 3)
    mask = project(pattern, weight.abs(), density)
    grow = torch.rand_like(weight)
    active = int(mask.sum())
    new = drop_and_regrow(pattern, mask, weight.abs(), grow, active * 3 // 4, active)
    assert not check_pattern(pattern, new) and int(new.sum()) == active
    grown = new & ~mask
    assert grown.any()
    # regrown positions score higher on average than the positions left inactive
    assert grow[grown].mean() > grow[~new & ~mask].mean()
