"""P-GaP as independent jobs: one joblib multirun of kappa workers per round, merged between rounds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import read_json

ARGS = ["dataset=digits", "debug=smoke", "logger=none", "method.partitioner=by_stage", "method.num_partitions=3",
        "method.sparsity=0.8", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


def _net(path):
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k[4:]: v for k, v in state.items() if k.startswith("net.")}


@pytest.mark.slow  # an integration test of minutes: in CI's slow set
def test_pgap_jobs_merge_partition_i_from_worker_i(tmp_path):
    exe = Path(sys.executable).with_name("compress-pgap")
    proc = subprocess.run([str(exe) if exe.exists() else shutil.which("compress-pgap"), "--out", str(tmp_path),
                           "--rounds", "1", "--", *ARGS], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    workers = [_net(tmp_path / "round0" / str(i) / "checkpoints" / "train.ckpt") for i in range(3)]
    merged = _net(tmp_path / "round0" / "merged.ckpt")
    stages = ("layer1.", "layer2.", "layer3.")
    for i, worker in enumerate(workers):   # worker i trained with partition i (= stage i) dense
        grown = [k for k in worker if k.endswith("weight_mask") and k.startswith(stages[i])]
        assert grown and all(bool(worker[k].all()) for k in grown)
        for mask_key in grown:
            key = mask_key[: -len("_mask")]
            kept = merged[mask_key]
            assert abs(kept.float().mean().item() - 0.2) < 0.01                 # pruned back to the target
            assert torch.equal(merged[key][kept], worker[key][kept])          # values from worker i
    assert torch.equal(merged["bn1.running_mean"], workers[0]["bn1.running_mean"])   # the rest: worker 0
    assert torch.equal(merged["fc.weight"], workers[0]["fc.weight"])
    assert not torch.equal(workers[0]["fc.weight"], workers[1]["fc.weight"])
    final = read_json(tmp_path / "final" / "results.json")
    assert final["status"] == "ok" and abs(final["metrics"]["model/prunable_sparsity"] - 0.8) < 1e-3
    assert [s for s, r in final["stages"].items() if r["status"] == "done"] == ["finetune", "evaluate"]
