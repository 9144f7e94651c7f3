"""Kill -9 during the train stage, rerun the same command: same final metrics and weights as an
uninterrupted run (deterministic CPU trainer). GMP, RigL and GaP are used so masks and method state
evolve mid-stage (RigL: drop/regrow every 3 steps; GaP: 6 grow-and-prune steps over 8 epochs, the kill
lands inside one; P-GaP: worker snapshots and the round start live in the checkpoint; MEST: epoch-wise
prune-and-regrow; LTH: killed inside the IMP retraining rounds of the finetune stage; CHEX: killed mid-
exploration, the compacted architecture must come out the same; multi-level: killed inside the per-level
finetune phases; QAT: killed inside the quantize stage's training, int8 gradients with stochastic rounding;
E-ViT: killed between example swaps, the held-out set and forgetting counts restored; SPViT: killed inside the
finetune of its token selectors, whose Gumbel decisions draw from the restored RNG; freq_select: killed while its
frequency-channel gates train, their temperature schedule and Gumbel decisions resumed)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import cli_path, read_json

COMMON = ["dataset=digits", "schedule=fmnist", "schedule.batch_size=64",
          "schedule.train.epochs=8", "schedule.finetune.epochs=2", "logger=csv", "trainer.deterministic=true"]
GAP = ["method=gap", "method.partitioner=by_stage", "method.num_partitions=3", "method.rounds=2"]
METHODS = {"gmp": ["method=gmp", "method.frequency=3"], "rigl": ["method=rigl", "method.delta_t=3"],
           "gap": GAP, "pgap": [*GAP, "method.variant=parallel"],
           "mest": ["method=mest", "method.update_every=1", "method.phase_epochs=[3,6]"],
           "mest_removal": ["method=mest", "method.update_every=1", "method.remove_n=400",
                            "method.remove_data_epoch=3"],
           "lth": ["method=lth", "method.sparsity=0.5", "schedule.finetune.epochs=6"],
           "chex": ["method=chex", "method.delta_t_epochs=1", "method.t_max_fraction=0.75"],
           "multilevel": ["method=multilevel", "method.levels=[0.9,0.7,0.5]", "schedule.finetune.epochs=6"],
           "qat": ["method=magnitude", "quant=qat_w8a8", "quant.grad_bits=8", "quant.hypernet=true", "quant.epochs=4"],
           "evit": ["method=evit", "method.swap_epochs=[100,200]", "model=vit_fmnist", "model.embed_dim=32",
                    "model.depth=2", "model.num_heads=2", "model.patch_size=2"],
           "noise_injection": ["method=noise_injection", "method.snr_db=10"],
           "disco": ["method=disco", "schedule.finetune.epochs=2"],
           "freq_select": ["method=freq_select", "dataset.input_domain=dct", "dataset.dct_block=4",
                           "method.calib_size=64"],
           "spvit": ["method=spvit", "model=vit_fmnist", "model.embed_dim=32", "model.depth=4", "model.num_heads=2",
                     "model.patch_size=2", "schedule.train.epochs=1", "schedule.finetune.epochs=4"]}
NO_SPARSITY_KEY = {"multilevel", "evit", "spvit", "freq_select", "noise_injection", "disco"}
# IMP: kill inside the retraining rounds (4 rounds over 6 epochs); multilevel: inside the level phases; QAT:
# inside the quantize stage's training (fake-quant layers, their input ranges, the gradient hypernetwork, its
# optimizer and the kept gradients restored before the resume)
KILL_IN = {"lth": "finetune", "multilevel": "finetune", "qat": "quantize", "spvit": "finetune"}


def _run(args, out, cwd):
    return subprocess.run([cli_path(), *args, f"output_dir={out}"], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_sigkill_during_train_then_rerun_matches_uninterrupted_run(tmp_path, method):
    sparsity = [] if method in NO_SPARSITY_KEY else ["method.sparsity=0.8"]
    args = [*COMMON, *METHODS[method], *sparsity]  # a method's own schedule (lth's 6 finetune epochs) wins
    reference = _run(args, tmp_path / "reference", tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen([cli_path(), *args, f"output_dir={out}"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    stage = KILL_IN.get(method, "train")
    last = out / "checkpoints" / f"{stage}-last.ckpt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if last.is_file() and _epochs_done(last) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "stages" / f"{stage}.json").exists(), f"the run finished its {stage} stage before the kill"
    assert last.is_file()

    resumed = _run(args, out, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"stage {stage}: resuming from" in resumed.stdout
    ref, res = read_json(tmp_path / "reference" / "results.json"), read_json(out / "results.json")
    resumed_load = res["stages"][stage]["load"]  # the part before the kill is in the stage's measure
    assert resumed_load["parts"] == 2 and resumed_load["started_at"] == res["stages"][stage]["started_at"]
    assert res["started_at"] <= res["stages"][stage]["started_at"] < res["process_started_at"]
    for key in ("test/acc", "test/loss", "val/acc", "val/loss", "train/test/acc", "model/sparsity"):
        assert res["metrics"][key] == ref["metrics"][key], key
    final = next(s for s in ("quantize", "finetune", "train")
                 if (tmp_path / "reference" / "checkpoints" / f"{s}.ckpt").is_file())
    a = _state(tmp_path / "reference" / "checkpoints" / f"{final}.ckpt")
    b = _state(out / "checkpoints" / f"{final}.ckpt")
    assert a.keys() == b.keys()
    for key in a:  # tensors, and the compacted layers' shapes (extra state) for CHEX
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


def _epochs_done(last) -> int:
    """Epochs completed according to the epoch checkpoint (0 while it is being replaced)."""
    try:
        return int(torch.load(last, map_location="cpu", weights_only=False)["epoch"]) + 1
    except Exception:
        return 0
