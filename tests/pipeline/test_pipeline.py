"""End-to-end stage runs on the digits data (in-process) and the CLI's sweep behaviour."""

from __future__ import annotations

import pytest
import torch

from compress_run.core.masks import MASK_SUFFIX
from compress_run.pipeline.checkpoints import net_state_from_checkpoint
from tests.conftest import read_json, run_pipeline

SMOKE = ["dataset=digits", "debug=smoke", "logger=none"]


def _masked_state(path):
    state = net_state_from_checkpoint(torch.load(path, map_location="cpu", weights_only=False))
    return {k[: -len(MASK_SUFFIX)]: (state[k[: -len(MASK_SUFFIX)]], v) for k, v in state.items()
            if k.endswith(MASK_SUFFIX)}


def test_magnitude_uniform_every_masked_weight_is_zero_and_sparsity_is_target(tmp_path):
    # the one smoke run that times the host (debug=smoke turns host timing off everywhere else)
    results = run_pipeline([*SMOKE, "method=magnitude", "method.sparsity=0.8", "evaluate.measure_latency=true",
                            "evaluate.kernels=measured"], tmp_path)
    masked = _masked_state(tmp_path / "checkpoints" / "finetune.ckpt")
    assert len(masked) == 18  # resnet20: 19 convs + fc, minus the stem conv and the classifier
    for name, (weight, mask) in masked.items():
        assert torch.all(weight[~mask] == 0), name
        assert abs((1 - mask.float().mean().item()) - 0.8) < 1.0 / mask.numel() + 1e-9, name
        assert results["sparsity_per_layer"][f"{name}"] >= 0.8 - 1.0 / mask.numel()
    m = results["metrics"]
    assert abs(m["model/prunable_sparsity"] - 0.8) < 1e-3
    assert m["model/params_nonzero"] < m["model/params_dense"]
    assert results["status"] == "ok" and results["seed"] == 0
    assert {"test/acc", "val/acc", "time/train_s", "time/finetune_s", "train/test/acc"} <= set(m)
    assert 0 < m["time/train_cpu_s"] <= 1.5 * m["time/train_s"]  # one thread; the clock counts epochs only
    assert results["versions"]["torch"] and "commit" in results["git"]
    assert results["config"]["method"]["sparsity"] == 0.8
    # resnet20 on 1x8x8 digits: prunable layers' MACs shrink to 20%, stem and classifier stay dense
    per_layer = results["macs_per_layer"]
    assert m["model/macs_dense"] == sum(v["dense"] for v in per_layer.values())
    assert per_layer["conv1"]["effective"] == per_layer["conv1"]["dense"]
    for name, (_, mask) in masked.items():
        layer = per_layer[name.rsplit(".", 1)[0]]
        assert layer["effective"] == round(layer["dense"] * mask.float().mean().item())
    assert m["model/flops_dense"] == 2 * m["model/macs_dense"]
    assert [results["stages"][s]["status"] for s in ("train", "compress", "finetune", "evaluate")] == ["done"] * 4
    assert results["stages"]["evaluate"]["evaluated"] == str(tmp_path / "checkpoints" / "finetune.ckpt")
    # hardware view: irregular masks run dense on the host profile unless its CSR path is faster
    assert m["hardware"] == "host_cpu" and m["latency_sim_ms/host_cpu"] > 0 and m["latency_sim_ms/host_cpu/b8"] > 0
    assert m["model/macs_effective"] <= m["model/macs_executed"] <= m["model/macs_dense"]
    assert m["latency_host_ms/b1"] > 0 and m["latency_host_ms/b8"] > 0 and m["latency_host/threads"] >= 1
    assert results["latency_per_layer"]["host_cpu"]
    # the deployed form beside it: the same network run by ONNX Runtime, checked against it, timed in this run
    assert m["latency_deploy_ms/b1"] > 0 and m["latency_deploy_ms/b8"] > 0 and m["latency_deploy/max_abs_diff"] < 1e-3
    assert m["latency_deploy/speedup_over_eager/b1"] == round(m["latency_host_ms/b1"] / m["latency_deploy_ms/b1"], 3)
    # every masked layer ran its fastest measured kernel (dense included as a candidate)
    kernels = results["kernels_per_layer"]
    assert set(kernels) == {name.rsplit(".", 1)[0] for name in masked}
    assert all(k["kernel"] == min(k["ms"], key=k["ms"].get) and {"dense", "csr"} <= set(k["ms"])
               for k in kernels.values())
    assert m["latency_host/sparse_layers"] == sum(k["kernel"] != "dense" for k in kernels.values())


def test_changed_evaluate_settings_rerun_only_evaluate(tmp_path, capsys):
    first = run_pipeline([*SMOKE, "method=dense", "evaluate.measure_latency=false"], tmp_path)
    assert "latency_host_ms/b1" not in first["metrics"]
    capsys.readouterr()
    second = run_pipeline([*SMOKE, "method=dense", "evaluate.measure_latency=false",
                           "evaluate.hardware=[a100,systolic_asic]", "evaluate.plot=true"], tmp_path)
    out = capsys.readouterr().out
    assert "stage train: already finished, skipped" in out and "stage evaluate: start" in out
    m = second["metrics"]
    assert {"latency_sim_ms/host_cpu", "latency_sim_ms/a100", "latency_sim_ms/systolic_asic"} <= set(m)
    assert m["model/macs_executed/a100"] == m["model/macs_dense"]
    assert (tmp_path / "latency_breakdown.png").stat().st_size > 1000
    assert "MACs and latency per hardware profile" in out and "a100" in out
    assert second["metrics"]["test/acc"] == first["metrics"]["test/acc"]
    # provenance: the first start and the train stage's own record are kept; every stage says its load
    assert second["started_at"] == first["started_at"] == second["stages"]["train"]["started_at"]
    assert second["stages"]["train"] == first["stages"]["train"]
    assert second["stages"]["evaluate"]["started_at"] >= first["stages"]["evaluate"]["started_at"]
    assert second["metrics"]["time/total_s"] == round(sum(r.get("wall_s") or 0 for r in second["stages"].values()
                                                          if r["status"] == "done"), 3)
    for results in (first, second):
        assert results["git"]["source"] == "git" and results["config_digest"] and results["host"]["key"]
        assert all("load" in r and r["load"]["started_at"] == r["started_at"]
                   for r in results["stages"].values() if r["status"] == "done")
        assert set(results["load"]) >= {"measured", "stages_without"}
    assert set(second["hardware_profiles"]) == {"host_cpu", "a100", "systolic_asic"}
    assert second["hardware_profiles"]["host_cpu"]  # a fitted profile says when and where
    assert not (tmp_path / "stages" / "evaluate.load-partial.json").exists()


def test_magnitude_global_meets_budget_with_unequal_layers(tmp_path):
    results = run_pipeline([*SMOKE, "method=magnitude", "method.sparsity=0.7", "method.distribution=global"],
                           tmp_path)
    masked = _masked_state(tmp_path / "checkpoints" / "finetune.ckpt")
    assert len(masked) == 18  # every prunable layer of resnet20 is masked
    total = sum(m.numel() for _, m in masked.values())
    kept = sum(int(m.sum()) for _, m in masked.values())
    assert kept == round(0.3 * total)
    for weight, mask in masked.values():
        assert torch.all(weight[~mask] == 0)
    per_layer = [1 - m.float().mean().item() for _, m in masked.values()]
    assert max(per_layer) - min(per_layer) > 0.01  # one threshold, not one sparsity per layer
    assert abs(results["metrics"]["model/prunable_sparsity"] - 0.7) < 1e-3


def test_gmp_reaches_target_during_train_and_keeps_it(tmp_path):
    run_pipeline([*SMOKE, "method=gmp", "method.sparsity=0.75", "method.frequency=1"], tmp_path)
    for stage in ("train", "finetune"):
        masked = _masked_state(tmp_path / "checkpoints" / f"{stage}.ckpt")
        assert len(masked) == 18, stage
        for name, (weight, mask) in masked.items():
            assert torch.all(weight[~mask] == 0), (stage, name)
            assert abs((1 - mask.float().mean().item()) - 0.75) <= 1.0 / mask.numel(), (stage, name)


def test_dense_records_skipped_stages_and_rerun_skips_finished_ones(tmp_path, capsys):
    first = run_pipeline([*SMOKE, "method=dense"], tmp_path)
    assert first["stages"]["compress"] == {"stage": "compress", "status": "skipped",
                                           "reason": "method=dense does not use the compress stage"}
    assert read_json(tmp_path / "stages" / "finetune.json")["status"] == "skipped"
    mtime = (tmp_path / "checkpoints" / "train.ckpt").stat().st_mtime_ns
    capsys.readouterr()
    second = run_pipeline([*SMOKE, "method=dense"], tmp_path)
    out = capsys.readouterr().out
    assert "stage train: already finished, skipped" in out and "stage train: start" not in out
    assert (tmp_path / "checkpoints" / "train.ckpt").stat().st_mtime_ns == mtime
    assert second["metrics"]["test/acc"] == first["metrics"]["test/acc"]
    assert "test acc" in out and "evaluate" in out  # the summary table


def test_partial_stages_then_the_rest(tmp_path):
    run_pipeline([*SMOKE, "stages=[train]"], tmp_path)
    assert not (tmp_path / "stages" / "compress.json").exists()
    results = run_pipeline(SMOKE, tmp_path)
    assert [results["stages"][s]["status"] for s in ("compress", "finetune", "evaluate")] == ["done"] * 3


def test_a_stage_draws_the_same_random_numbers_whether_or_not_train_ran_in_the_same_process(tmp_path):
    # SPViT's compress stage draws its token selectors' initial weights: a run stopped after its train stage
    # and resumed (or one that takes the train stage over) must build the same selectors as an uninterrupted run
    spvit = [*SMOKE, "evaluate.measure_latency=false", "method=spvit", "model=vit_fmnist", "model.embed_dim=32",
             "model.depth=4", "model.num_heads=2", "model.patch_size=2"]
    uninterrupted = run_pipeline(spvit, tmp_path / "uninterrupted")
    run_pipeline([*spvit, "stages=[train]"], tmp_path / "split")
    resumed = run_pipeline(spvit, tmp_path / "split")
    for stage in ("compress", "finetune"):
        a, b = (torch.load(tmp_path / run / "checkpoints" / f"{stage}.ckpt", map_location="cpu",
                           weights_only=False)["state_dict"] for run in ("uninterrupted", "split"))
        assert a.keys() == b.keys() and any("selector" in key for key in a)
        assert all(torch.equal(a[key], b[key]) for key in a if torch.is_tensor(a[key])), stage
    assert resumed["metrics"]["test/acc"] == uninterrupted["metrics"]["test/acc"]


def test_help_and_cfg(cli_forked):
    help_text = cli_forked("--help").stdout
    for word in ("model:", "resnet20", "method:", "gmp", "compress-run -m", "smollm2_135m", "shakespeare"):
        assert word in help_text
    job = cli_forked("--cfg", "job", "method=gmp").stdout
    assert "_target_: compress_run.methods.gmp.GMP" in job


@pytest.mark.slow  # an integration run (~15 s): in the CI slow set
def test_wandb_logger_offline_no_network(cli, tmp_path):
    out = tmp_path / "run"
    proc = cli(*SMOKE[:2], "logger=wandb", "method=dense", f"output_dir={out}", timeout=300,
               env={"WANDB_API_KEY": "", "WANDB_MODE": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((out / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
