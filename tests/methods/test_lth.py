"""Lottery tickets: rewinding restores the original init on the surviving weights (after compress and at
every IMP round), masks only shrink, round sparsities 1 - 0.8^r clamped at the target, random re-init
control keeps the masks and changes the values."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from compress_run.core.masks import get_mask, prunable_layers
from compress_run.methods import lth as lth_module
from compress_run.methods.cycles import cycle_of
from compress_run.methods.lth import LTH, imp_rounds, weights_state
from tests.conftest import run_pipeline

SMOKE = ["dataset=digits", "debug=smoke", "logger=none", "method=lth", "method.sparsity=0.5",
         "schedule.finetune.epochs=4"]



def test_round_arithmetic():
    assert imp_rounds(0.9, 0.2) == 11 and imp_rounds(0.5, 0.2) == 4 and imp_rounds(0.2, 0.2) == 1
    method = LTH(sparsity=0.9)
    assert [round(method.round_sparsity(r), 4) for r in (1, 2, 3, 10, 11)] == [0.2, 0.36, 0.488, 0.8926, 0.9]
    assert LTH(sparsity=0.9, protocol="oneshot").rounds == 1


class InitSpy(L.Callback):
    """Captures the network's state when the train stage's callbacks are built (the original init), and
    the surviving weights at the first batch of every IMP round."""

    def __init__(self, method: LTH) -> None:
        self.method = method
        self.round_starts: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        total, step = trainer.estimated_stepping_batches, trainer.global_step
        if step == 0 or cycle_of(step, total, self.method.rounds) != cycle_of(step - 1, total, self.method.rounds):
            layers = prunable_layers(pl_module.net)
            self.round_starts.append(({n: m.weight.detach().clone() for n, m in layers.items()},
                                      {n: get_mask(m).clone() for n, m in layers.items()}))


@pytest.fixture
def captured(monkeypatch):
    box: dict = {"spies": []}
    original = LTH.training_callbacks

    def capture(self, stage, model):
        if stage == "train":
            box["init"] = weights_state(model)
        callbacks = original(self, stage, model)
        if stage == "finetune":
            box["spies"].append(InitSpy(self))
            callbacks.append(box["spies"][-1])
        return callbacks

    monkeypatch.setattr(lth_module.LTH, "training_callbacks", capture)
    return box


def test_imp_rewinds_survivors_to_the_original_init_every_round(tmp_path, captured):
    results = run_pipeline(SMOKE, tmp_path)
    init = captured["init"]
    rounds = captured["spies"][0].round_starts
    assert len(rounds) == 4
    previous_mask = None
    for r, (weights, masks) in enumerate(rounds, start=1):
        kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert abs(kept - (1 - results["method"]["round_sparsity"][r - 1])) < 1e-3
        for name, w in weights.items():
            assert torch.equal(w[masks[name]], init[f"{name}.weight"][masks[name]]), (r, name)
            assert (w[~masks[name]] == 0).all()
            if previous_mask is not None:
                assert not (masks[name] & ~previous_mask[name]).any()   # masks only shrink
        previous_mask = masks
    assert abs(results["metrics"]["model/prunable_sparsity"] - 0.5) < 1e-3
    assert [r["round"] for r in results["method"]["rounds_log"]] == [1, 2, 3, 4]


def test_oneshot_random_reinit_control_keeps_the_mask_and_changes_the_values(tmp_path, captured):
    common = [*SMOKE, "method.protocol=oneshot", "stages=[train,compress]"]
    run_pipeline([*common, "method.init=original"], tmp_path / "ticket")
    init = captured["init"]
    run_pipeline([*common, "method.init=random"], tmp_path / "random")
    ticket = torch.load(tmp_path / "ticket/checkpoints/compress.ckpt", weights_only=False)["state_dict"]
    control = torch.load(tmp_path / "random/checkpoints/compress.ckpt", weights_only=False)["state_dict"]
    masks = [k[:-5] for k in ticket if k.endswith("_mask")]
    assert masks
    for key in masks:
        mask = ticket[key + "_mask"]
        assert torch.equal(mask, control[key + "_mask"])                # same ticket mask
        assert torch.equal(ticket[key][mask], init[key[4:]][mask])     # ticket: the original init
        assert not torch.equal(control[key][mask], init[key[4:]][mask])  # control: other values
        ratio = control[key][mask].std() / init[key[4:]][mask].std()
        assert 0.7 < ratio < 1.4                                         # ... from the same initializer


def test_trained_init_keeps_the_trained_weights(tmp_path, captured):
    run_pipeline([*SMOKE, "method.protocol=oneshot", "method.init=trained", "stages=[train,compress]"], tmp_path)
    trained = torch.load(tmp_path / "checkpoints/train.ckpt", weights_only=False)["state_dict"]
    pruned = torch.load(tmp_path / "checkpoints/compress.ckpt", weights_only=False)["state_dict"]
    key = next(k[:-5] for k in pruned if k.endswith("_mask"))
    mask = pruned[key + "_mask"]
    assert torch.equal(pruned[key][mask], trained[key][mask])


def test_imp_random_reinit_control_trains_the_tickets_masks_at_every_round(tmp_path, captured):
    run_pipeline(SMOKE, tmp_path / "ticket")
    ticket_rounds = captured["spies"][0].round_starts
    init = captured["init"]
    results = run_pipeline([*SMOKE, "method.init=random", f"method.ticket={tmp_path / 'ticket'}"], tmp_path / "random")
    control_rounds = captured["spies"][1].round_starts
    assert len(ticket_rounds) == len(control_rounds) == 4
    for r, ((_, ticket_masks), (weights, masks)) in enumerate(zip(ticket_rounds, control_rounds, strict=True), 1):
        for name, mask in masks.items():
            assert torch.equal(mask, ticket_masks[name]), (r, name)          # the ticket's masks, bit for bit
            assert not torch.equal(weights[name][mask], init[f"{name}.weight"][mask])  # from another init
    assert results["stages"]["train"]["status"] == "skipped"                  # no dense training needed


def test_imp_random_control_without_a_ticket_is_refused(cli):
    proc = cli("dataset=digits", "debug=smoke", "logger=none", "method=lth", "method.init=random")
    assert proc.returncode == 2
    assert "method.ticket=<output dir of the finished IMP run" in " ".join(proc.stderr.split())
