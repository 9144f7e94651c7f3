"""RigL: constant per-layer non-zero counts, drop by |w| / grow by |dense grad| at zero, skipped update steps."""

from __future__ import annotations

import torch

from compress_run.core.masks import get_mask, prunable_layers
from compress_run.methods.rigl import drop_and_grow, drop_fraction
from tests.conftest import run_pipeline

SMOKE = ["dataset=digits", "debug=smoke", "logger=none", "method=rigl"]


def test_drop_and_grow_keeps_the_count_and_picks_by_magnitude_and_gradient():
    torch.manual_seed(0)
    mask = torch.rand(20, 30) < 0.2
    weight = torch.randn(20, 30) * mask
    grad = torch.randn(20, 30) * ~mask  # zero gradient on active weights: regrowth goes to inactive ones
    new = drop_and_grow(weight, grad, mask, 0.3)
    k = int(0.3 * mask.sum())
    dropped, grown = mask & ~new, new & ~mask
    assert new.sum() == mask.sum() and dropped.sum() == k and grown.sum() == k
    assert weight[dropped].abs().max() <= weight[mask & new].abs().min()   # the k smallest |w| go
    assert grad[grown].abs().min() >= grad[~mask & ~new].abs().max()      # the k largest |grad| come


def test_drop_fraction_is_cosine_annealed_to_zero():
    assert drop_fraction(0, 100, 0.3) == 0.3
    assert abs(drop_fraction(50, 100, 0.3) - 0.15) < 1e-12
    assert drop_fraction(100, 100, 0.3) == 0.0


def test_rigl_run_keeps_per_layer_counts_and_erk_densities(tmp_path):
    import lightning as L

    from compress_run.methods import rigl as rigl_module

    counts: list[dict[str, int]] = []
    unchanged: list[bool] = []

    class Spy(L.Callback):  # records non-zero counts after every batch and checks update steps are no-ops
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = {n: m.weight.detach().clone() for n, m in prunable_layers(pl_module.net).items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            layers = prunable_layers(pl_module.net)
            counts.append({n: int(get_mask(m).sum()) for n, m in layers.items()})
            if trainer.global_step % 2 == 1 and trainer.global_step > 1:  # that step was a mask update
                kept = [self.before[n][get_mask(m)] == m.weight.detach()[get_mask(m)] for n, m in layers.items()]
                unchanged.append(all(bool(k.all()) for k in kept))

    original = rigl_module.RigL.training_callbacks

    def with_spy(self, stage, model):
        return [*original(self, stage, model), Spy()] if stage == "train" else original(self, stage, model)

    rigl_module.RigL.training_callbacks = with_spy
    try:
        results = run_pipeline([*SMOKE, "method.delta_t=2", "method.end_fraction=1.0", "method.alpha=0.5",
                                "stages=[train,compress,evaluate]"], tmp_path)
    finally:
        rigl_module.RigL.training_callbacks = original
    assert len(counts) >= 3 and all(c == counts[0] for c in counts)
    # the per-layer counts are ERK's densities (the default distribution) at 90% overall
    from compress_run.core.allocation import allocate
    from compress_run.models.cifar_resnet import resnet20

    layers = prunable_layers(resnet20(10, 1, 8))
    erk = allocate({n: m.weight for n, m in layers.items()}, 0.9, "erk")
    for name, kept in counts[0].items():
        assert abs(kept - erk[name] * layers[name].weight.numel()) <= 1, name
    assert len({round(erk[n], 3) for n in layers}) > 2  # ERK really differs between layers here
    assert unchanged and all(unchanged)
    assert results["metrics"]["model/prunable_sparsity"] > 0.85
    assert results["method"]["mask_updates"] >= 1
