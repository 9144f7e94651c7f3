"""trainer=ddp_cpu: two gloo processes; the compression state (masks, partitions, channels, ranks, schedules)
is checked identical on every rank after every update (RankAgreement), for every method family."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from compress_run.core.masks import attach_mask, masked_parameters
from compress_run.pipeline.callbacks import RankAgreement
from tests.conftest import read_json


class Schedule(L.Callback):
    """A method callback with state (as GaP's partitions or a pruning schedule)."""

    def __init__(self, groups: list[list[str]]) -> None:
        self.groups = groups

    def state_dict(self) -> dict:
        return {"groups": self.groups}


def _module() -> SimpleNamespace:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    attach_mask(net[0], torch.rand(4, 6) > 0.5)
    return SimpleNamespace(net=net, device=torch.device("cpu"))


def _method() -> SimpleNamespace:
    return SimpleNamespace(state_dict=lambda: {"ranks": {"0": 3}, "history": [0.5, 0.25]})


def _check(rank0: SimpleNamespace, rank1: SimpleNamespace, callbacks: tuple[list, list] = ([], []),
           weights: bool = False) -> None:
    """Both ranks' RankAgreement, the all-gather played by stacking rank 1's local hashes under rank 0's."""
    other = RankAgreement("train", _method(), callbacks[1])
    peer = torch.tensor(list(other.parts(rank1, weights).values()), dtype=torch.int64)
    trainer = SimpleNamespace(world_size=2, current_epoch=1, global_step=7,
                              strategy=SimpleNamespace(all_gather=lambda local: torch.stack([local, peer])))
    RankAgreement("train", _method(), callbacks[0]).check(trainer, rank0, weights)


def test_identical_ranks_pass_and_batch_norm_statistics_may_differ():
    rank0, rank1 = _module(), _module()
    rank1.net[1].running_mean += 1.0  # DDP re-broadcasts these before each forward
    _check(rank0, rank1, ([Schedule([["a"], ["b"]])], [Schedule([["a"], ["b"]])]), weights=True)


@pytest.mark.parametrize("change, part", [
    (lambda m: next(masked_parameters(m.net))[2][0].logical_not_(), "masks"),
    (lambda m: m.net.__setitem__(2, nn.Linear(4, 2)), "shapes, weights"),
    (lambda m: m.net[2].weight.data.add_(1e-7), "weights"),
])
def test_a_rank_that_diverged_is_named(change, part):
    rank0, rank1 = _module(), _module()
    change(rank1)
    with pytest.raises(RuntimeError, match=f"stage: {part} differ between ranks at epoch 1 \\(global step 7\\)"):
        _check(rank0, rank1, weights=True)


def test_method_callback_state_is_compared():
    with pytest.raises(RuntimeError, match="Schedule state differ"):
        _check(_module(), _module(), ([Schedule([["a"], ["b"]])], [Schedule([["b"], ["a"]])]))


def test_a_mask_changed_in_place_is_rehashed_and_an_unchanged_one_is_not(monkeypatch):
    module, hashed = _module(), []
    agreement = RankAgreement("train", _method(), [])
    real = RankAgreement._hash
    monkeypatch.setattr(RankAgreement, "_hash", staticmethod(lambda t: hashed.append(t) or real(t)))
    first = agreement.parts(module, weights=False)["masks"]
    count = len(hashed)
    assert agreement.parts(module, weights=False)["masks"] == first and len(hashed) == count
    next(masked_parameters(module.net))[2][1, 2] ^= True
    changed = agreement.parts(module, weights=False)["masks"]
    assert changed != first and len(hashed) == count + 1
    same = copy.deepcopy(module)  # equal content in other tensors: equal hash
    assert RankAgreement("train", _method(), []).parts(same, weights=False)["masks"] == changed


# ------------------------------------------------------------------ two real gloo processes
class TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
        attach_mask(self.net[0], torch.ones(8, 6, dtype=torch.bool))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 2, (64,), generator=g))
        return torch.utils.data.DataLoader(data, batch_size=8)


class PruneFromLocalData(L.Callback):
    """A faulty method: prunes by the magnitude of *its own shard's* input at step 3, so ranks diverge."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 3:
            mask = next(masked_parameters(pl_module.net))[2]
            mask[:, batch[0].abs().mean(0).argmin()] = False


@pytest.mark.slow
def test_two_gloo_ranks_catch_a_method_that_prunes_from_rank_local_data(monkeypatch):
    # ddp_spawn unpickles this file's classes in fresh processes, which import them by module name: with
    # pytest's importlib mode the repository root is not on sys.path unless put there
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    module = TinyModule()
    agreement = RankAgreement("train", SimpleNamespace(state_dict=dict), [])
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[PruneFromLocalData(), agreement])
    with pytest.raises(Exception, match="masks differ between ranks at epoch 0 \\(global step 3\\)"):
        trainer.fit(module)


# ------------------------------------------------------------------ every method family through the CLI
FAMILIES = {  # id: the family and what its state holds
    "gap": ["method=gap"],                    # sparse training: partitions and their schedule
    "rigl": ["method=rigl"],                  # sparse training: drop and regrow from dense gradients
    "mest": ["method=mest"],                  # sparse training: drop and grow, phases
    "chex": ["method=chex"],                  # channels: shrink and regrow, compaction
    "elrt": ["method=elrt"],                  # low rank: ranks
    "admm_2of4": ["method=admm", "method.pattern=nm:2:4", "method.sparsity=0.5"],  # patterns: Z, U, 2:4 masks
    "multilevel": ["method=multilevel", "method.levels=[0.9,0.7,0.5]"],            # nested masks
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_ddp_cpu_run_keeps_the_compression_state_identical_across_ranks(cli, tmp_path, family):
    proc = cli("trainer=ddp_cpu", "dataset=digits", "debug=smoke", *FAMILIES[family], "logger=none",
               "evaluate.measure_latency=false", f"output_dir={tmp_path / 'run'}", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = read_json(tmp_path / "run" / "results.json")
    assert results["config"]["trainer"]["devices"] == 2
    assert "evaluate" in results["stages"]
    checked = re.findall(r"stage (\w+): compression state identical on 2 ranks at all (\d+) checks", proc.stdout)
    trained = {stage for stage, record in results["stages"].items()
               if stage in ("train", "finetune") and record["status"] == "done"}
    assert trained and {stage for stage, _ in checked} == trained and all(int(n) > 0 for _, n in checked)
