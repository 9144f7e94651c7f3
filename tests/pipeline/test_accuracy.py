"""Accuracy on real data (slow). Digits runs in `make test-slow` (CI runs the GaP and CHEX rows); the
Fashion-MNIST run is the README's headline figure."""

from __future__ import annotations

import pytest

from tests.conftest import read_json, run_cli


@pytest.mark.slow
def test_digits_magnitude_90_percent(tmp_path):
    # measured 2026-11-22 on 2 CPU cores: dense 97.49%, 90% sparse after finetune 94.71% (2.5 min)
    proc = run_cli(["dataset=digits", "method=magnitude", "method.sparsity=0.9", "schedule=fmnist",
                    "schedule.batch_size=64", "schedule.train.epochs=15", "schedule.finetune.epochs=5",
                    "logger=none", "output_dir=run"], tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_json(tmp_path / "run" / "results.json")["metrics"]
    assert m["train/test/acc"] >= 0.96
    assert m["test/acc"] >= 0.93
    assert abs(m["model/prunable_sparsity"] - 0.9) < 1e-3


@pytest.mark.slow
def test_fashion_mnist_magnitude_90_percent(tmp_path):
    """The issue's acceptance run (about 50 minutes on 2 CPU cores)."""
    proc = run_cli(["method=magnitude", "model=resnet20", "dataset=fashion_mnist", "schedule=fmnist",
                    "method.sparsity=0.9", "output_dir=run"], tmp_path, timeout=4 * 3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_json(tmp_path / "run" / "results.json")["metrics"]
    assert m["train/test/acc"] >= 0.925
    assert m["test/acc"] >= 0.915


@pytest.mark.slow
def test_digits_rigl_90_percent_from_scratch(tmp_path):
    # measured 2026-11-22 on 2 CPU cores: 97.21% test accuracy at 90% sparsity, 11 mask updates (30 s)
    proc = run_cli(["dataset=digits", "method=rigl", "method.sparsity=0.9", "method.delta_t=20", "schedule=fmnist",
                    "schedule.batch_size=64", "schedule.train.epochs=15", "schedule.finetune.epochs=5",
                    "logger=none", "output_dir=run"], tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_json(tmp_path / "run" / "results.json")
    assert results["metrics"]["test/acc"] >= 0.94
    assert abs(results["metrics"]["model/prunable_sparsity"] - 0.9) < 1e-3
    assert results["stages"]["train"]["metrics"]["model/prunable_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert results["method"]["mask_updates"] >= 10


DIGITS_BUDGET = ["dataset=digits", "method.sparsity=0.9", "schedule=fmnist", "schedule.batch_size=64",
                 "schedule.train.epochs=15", "schedule.finetune.epochs=5", "logger=none", "output_dir=run"]


@pytest.mark.slow
def test_digits_gap_90_percent_from_scratch(tmp_path):
    # measured 2026-11-22 on 2 CPU cores: 97.49% test at 90% (dense 97.49% and one-shot magnitude 94.71% at
    # the same budget), 3 partitions by stage x 2 rounds; 27 s
    proc = run_cli(["method=gap", "method.partitioner=by_stage", "method.num_partitions=3", "method.rounds=2",
                    *DIGITS_BUDGET], tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_json(tmp_path / "run" / "results.json")
    assert results["metrics"]["test/acc"] >= 0.95
    assert abs(results["metrics"]["model/prunable_sparsity"] - 0.9) < 1e-3


@pytest.mark.slow
def test_digits_mest_90_percent_from_scratch(tmp_path):
    # measured 2026-11-22 on 2 CPU cores: 96.10% test at 90% (EM&S, update every epoch); 25 s
    proc = run_cli(["method=mest", "method.update_every=1", *DIGITS_BUDGET], tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_json(tmp_path / "run" / "results.json")
    assert results["metrics"]["test/acc"] >= 0.94
    assert results["method"]["mask_updates"] == 15
    assert abs(results["metrics"]["model/prunable_sparsity"] - 0.9) < 1e-3


@pytest.mark.slow
def test_digits_chex_half_the_macs_from_scratch(tmp_path):
    # measured 2026-11-22 on 2 CPU cores: 96.66% test with 2.01x fewer MACs (dense 97.21% at the same budget),
    # 31% fewer parameters after compaction; 34 s
    proc = run_cli(["method=chex", "method.target=flops", "method.flops_reduction=0.5", "method.delta_t_epochs=1",
                    *DIGITS_BUDGET], tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_json(tmp_path / "run" / "results.json")
    metrics = results["metrics"]
    assert metrics["test/acc"] >= 0.94
    assert 0.47 <= metrics["model/macs_effective"] / metrics["model/macs_dense"] <= 0.5
    assert metrics["model/params_original"] > metrics["model/params_dense"]



LOWRANK_BUDGET = ["dataset=digits", "schedule=fmnist", "schedule.batch_size=64", "logger=none", "output_dir=run",
                  "evaluate.measure_latency=false"]


@pytest.mark.slow
@pytest.mark.parametrize("method,args,floor,mac_floor", [
    # measured 2026-11-22 on 2 CPU cores at 2x fewer MACs, 20 epochs in all: dense 97.21%, svd + finetune
    # 95.82%, TRP 97.49%, ELRT (Tucker-2 from scratch) 98.33%, HALOC with a MAC LUT 95.82% at 1.81x (40-60 s each)
    ("trp", ["method.target=flops", "method.flops_reduction=0.5", "schedule.train.epochs=15",
             "schedule.finetune.epochs=5"], 0.95, 1.95),
    ("elrt", ["method.flops_reduction=0.5", "schedule.train.epochs=20"], 0.95, 1.95),
    ("haloc", ["method.latency_source=macs", "method.latency_fraction=0.5", "method.granularity=8",
               "method.search_epochs=1", "schedule.train.epochs=15", "schedule.finetune.epochs=4"], 0.93, 1.5),
])  # HALOC's target is a soft loss term (1.81x here, 1.74x in a CI run), TRP's and ELRT's are exact
def test_digits_lowrank_at_half_the_macs(tmp_path, method, args, floor, mac_floor):
    proc = run_cli([f"method={method}", *args, *LOWRANK_BUDGET], tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_json(tmp_path / "run" / "results.json")["metrics"]
    assert m["test/acc"] >= floor
    assert m["model/macs_dense"] / m["model/macs_effective"] >= mac_floor
