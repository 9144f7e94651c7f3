"""GMP: the cubic schedule (Zhu & Gupta 2017) and monotone masks."""

from __future__ import annotations

import pytest

from compress_run.methods.gmp import cubic_sparsity


def test_cubic_schedule_values():
    assert cubic_sparsity(0, 0, 100, 0.9) == 0.0
    assert cubic_sparsity(100, 0, 100, 0.9) == pytest.approx(0.9)
    assert cubic_sparsity(250, 0, 100, 0.9) == pytest.approx(0.9)
    assert cubic_sparsity(50, 0, 100, 0.9) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    assert cubic_sparsity(30, 20, 60, 0.8) == pytest.approx(0.8 * (1 - 0.75 ** 3))
    values = [cubic_sparsity(t, 10, 90, 0.95) for t in range(0, 100)]
    assert values == sorted(values)
    # cubic: steep early, flat late
    assert values[20] - values[10] > values[90] - values[80]


def test_masks_only_shrink_over_a_real_run_and_reach_the_target(tmp_path, monkeypatch):
    import lightning as L
    import torch

    from compress_run.core.masks import get_mask, prunable_layers
    from compress_run.methods import gmp as gmp_module
    from tests.conftest import run_pipeline

    history: list[dict[str, torch.Tensor]] = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            masks = {n: get_mask(m) for n, m in prunable_layers(pl_module.net).items()}
            if all(m is not None for m in masks.values()):
                history.append({n: m.clone() for n, m in masks.items()})

    original = gmp_module.GMP.training_callbacks
    monkeypatch.setattr(gmp_module.GMP, "training_callbacks", lambda self, stage, model: [
        *original(self, stage, model), *([Spy()] if stage == "train" else [])])
    run_pipeline(["dataset=digits", "debug=smoke", "logger=none", "method=gmp", "method.sparsity=0.8",
                  "method.frequency=1", "schedule.train.epochs=4", "stages=[train]"], tmp_path)
    assert len(history) >= 10
    changes = 0
    for before, after in zip(history, history[1:], strict=False):
        for name in before:
            assert not (after[name] & ~before[name]).any(), name   # nothing regrows
            changes += int(not torch.equal(after[name], before[name]))
    assert changes > 0                                              # pruning went on during training
    sparsity = [1 - sum(int(m.sum()) for m in h.values()) / sum(m.numel() for m in h.values()) for h in history]
    assert sparsity == sorted(sparsity) and abs(sparsity[-1] - 0.8) < 0.01
