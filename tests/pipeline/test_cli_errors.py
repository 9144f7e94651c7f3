"""Bad input: one paragraph naming cause and fix, exit code 2, nothing overwritten."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from compress_run.core.errors import EXIT_BAD_INPUT

FAST = ["dataset=digits", "debug=smoke", "logger=none"]

CASES = [
    # (id, overrides, fragments that must appear in stderr)
    ("unknown_option", ["model=resnet999"], ["unknown option 'resnet999'", "config group 'model'", "resnet20"]),
    ("unknown_key", ["method.foo=1"], ["method.foo", "Key 'foo' not in", "--cfg job"]),
    ("unknown_top_key", ["foo=1"], ["Key 'foo' not in"]),
    ("sparsity_one", ["method.sparsity=1.0"], ["method.sparsity=1.0 is not allowed", "[0, 1)"]),
    ("sparsity_negative", ["method.sparsity=-0.1"], ["method.sparsity=-0.1 is not allowed"]),
    ("sparsity_not_a_number", ["method.sparsity=abc"], ["'abc'", "could not be converted to Float"]),
    ("bad_distribution", ["method.distribution=bogus"], ["method.distribution='bogus'", "uniform, global, erk"]),
    ("exclude_matches_nothing", ["method.exclude=[nope*]"],
     ["cannot be applied to model=resnet20", "'nope*' matches no conv/linear layer", "layer1.0.conv1"]),
    ("nothing_left_to_prune", ["method.exclude=[*]"], ["no prunable conv/linear layer is left"]),
    ("dense_with_sparsity", ["method=dense", "method.sparsity=0.5"],
     ["Could not override 'method.sparsity'", "Key 'sparsity' not in"]),
    ("stage_order", ["stages=[compress,train]"], ["in pipeline order"]),
    ("unknown_stage", ["stages=[train,prune]"], ["unknown: ['prune']"]),
    ("negative_epochs", ["schedule.train.epochs=-1"], ["schedule.train.epochs=-1 is not allowed"]),
    ("optimizer_without_target", ["~schedule.optimizer._target_"], ["schedule.optimizer=", "_target_"]),
    ("calib_larger_than_the_data", ["method=rd", "method.calib_size=5000"],
     ["method.calib_size=5000 is larger than the train split", "cannot use dataset="]),
    ("qat_on_a_multilevel_model", ["method=multilevel", "quant=qat_w8a8"],
     ["quant=qat_w8a8 trains the network", "multi-level model", "quant=w8a8"]),
    ("quant_calib_larger_than_the_data", ["quant=qat_w8a8", "quant.calib_size=5000"],
     ["quant=qat_w8a8 cannot use dataset=", "quant.calib_size=5000 is larger than the train split",
      "lower quant.calib_size"]),
    ("gradient_hypernetwork_under_ddp", ["quant=qat_w8a8_grad4_hypernet", "trainer=ddp_cpu"],
     ["quant.hypernet=true needs one process", "trainer.devices=2", "set quant.hypernet=false"]),
    ("mest_data_removal_under_ddp", ["method=mest", "method.remove_n=100", "trainer=ddp_cpu"],
     ["method=mest cannot train in several processes", "method.remove_n=100", "trainer=cpu"]),
    ("gradient_hypernetwork_with_accumulation", ["quant=qat_w8a8_grad4_hypernet", "trainer.accumulate_grad_batches=2"],
     ["quant.hypernet=true needs one process", "trainer.accumulate_grad_batches=2"]),
    ("gradient_hypernetwork_with_adamw", ["quant=qat_w8a8_grad4_hypernet", "model=vit_fmnist", "schedule=fmnist_vit"],
     ["steps the quantized layers by SGD's update rule", "schedule.optimizer is torch.optim.AdamW"]),
    ("trainer_devices_zero", ["trainer.devices=0"], ["trainer.devices=0 is not a device count", "count >= 1"]),
    ("trainer_precision_17", ["trainer.precision=17"], ["trainer.precision=17 is not a precision", "32-true"]),
    ("trainer_strategy_unknown", ["trainer.strategy=ddp_magic"], ["trainer.strategy=ddp_magic is not a strategy",
                                                                  "ddp_spawn"]),
    ("lpvit_on_a_cnn", ["method=lpvit"], ["method=lpvit cannot be applied to model=resnet20", "method.layers"]),
    ("lpvit_unreachable_target", ["method=lpvit", "model=vit_fmnist", "method.macs_target=0.01"],
     ["method.macs_target=0.01 cannot be reached", "reachable range"]),
    ("model_dataset_mismatch", ["model.num_classes=5"], ["model.num_classes=5 does not match dataset.num_classes=10"]),
    ("gmp_end_after_training", ["method=gmp", "method.end_epoch=50"], ["method.end_epoch=50.0 is after the end"]),
    ("missing_dataset", ["dataset=cifar10", "dataset.download=false", "dataset.root=/nonexistent/cifar"],
     ["CIFAR-10 could not be loaded from /nonexistent/cifar/cifar-10-batches-py", "data_batch_1"]),
    ("gpu_without_cuda", ["trainer=gpu"], ["no usable CUDA device", "trainer=cpu"]),
    ("noise_negative_bits", ["noise=analog", "noise.adc_bits=-1"],
     ["noise.adc_bits=-1 is not allowed", "an integer from 2 to 16"]),
    ("noise_snr_not_a_number", ["evaluate.noise_snr_db=[loud]"], ["'loud'", "could not be converted to Float"]),
    ("noise_snr_nan", ["noise=analog", "noise.snr_db=nan"], ["noise.snr_db=nan is not allowed", "inf, or a number"]),
    ("noise_layer_missing", ["noise=analog", "noise.include=[head*]"],
     ["noise.include entry 'head*' matches no conv/linear layer", "layer1.0.conv1", "noise.include"]),
    ("noise_votes_zero", ["evaluate.noise_snr_db=[0]", "evaluate.noise_votes=[0]"],
     ["evaluate.noise_votes=[0] is not allowed", "from 1 to 1000"]),
    ("noise_injection_layer_missing", ["method=noise_injection", "method.exclude=[head]"],
     ["method=noise_injection cannot be applied", "exclude entry 'head' matches no conv/linear layer"]),
    ("noise_training_in_an_idle_stage", ["noise=analog", "noise.train_stages=[quantize]"],
     ["names ['quantize'], which does not train", "quant=, e.g. qat_w8a8"]),
    ("noise_injected_twice", ["method=noise_injection", "noise=analog", "noise.train_stages=[train]"],
     ["already trains its train stage under noise", "second noise on the same products"]),
    ("disco_one_node", ["method=disco", "method.nodes=1"], ["method.nodes=1 is not allowed", "an integer >= 2"]),
    ("corrupt_init_ckpt", ["init_ckpt={garbage}"], ["is corrupt or not a PyTorch checkpoint", "init_ckpt=null"]),
    ("mismatched_init_ckpt", ["init_ckpt={foreign}"], ["does not fit model=resnet20", "init_ckpt"]),
    ("unknown_hardware", ["hardware=tpu9"], ["unknown option 'tpu9'", "config group 'hardware'", "a100"]),
    ("unknown_evaluate_hardware", ["evaluate.hardware=[a100,tpu9]"], ["unknown: ['tpu9']", "jetson_orin"]),
    ("unknown_hardware_dtype", ["hardware.dtype=fp4"], ["hardware.dtype='fp4' is not allowed", "int8"]),
    ("dtype_without_peaks", ["hardware=systolic_asic", "hardware.dtype=fp32"],
     ["hardware.dtype='fp32'", "['int8']"]),
    ("zero_repeats", ["evaluate.repeats=0"], ["evaluate.repeats=0 is not allowed"]),
    ("rigl_alpha", ["method=rigl", "method.alpha=1.5"], ["method.alpha=1.5 is not allowed", "(0, 1)"]),
    ("l1_filter_unreachable_macs", ["method=l1_filter", "method.target=flops", "method.flops_reduction=0.99"],
     ["method.flops_reduction=0.99 cannot be reached", "reachable range is 0 < flops_reduction <="]),
    ("chex_unreachable_macs", ["method=chex", "method.target=flops", "method.flops_reduction=0.99",
                               "method.prune_residual=false"],
     ["method.flops_reduction=0.99 cannot be reached", "stay whole", "tied by a residual add"]),
    ("distill_kind", ["distill.teacher=train", "distill.kind=medium"], ["distill.kind='medium' is not allowed",
                                                                        "soft, hard"]),
    ("distill_train_teacher_in_train", ["distill.teacher=train", "distill.stages=[train,finetune]"],
     ["distill.stages", "cannot distil from its own result"]),
    ("latency_budget_on_one_sparsity", ["evaluate.latency_budget_ms=1.0"], ["trains a single sparsity"]),
    ("switch_with_wrong_segment_count", ["method=multilevel", "method.levels=[0.9,0.5]", "evaluate.level=[0.9,0.5]"],
     ["gives 2 levels, but the model has 3 segments"]),
    ("haloc_unreachable_latency", ["method=haloc", "method.hardware=mobile_a78", "method.lut_batch=64",
                                   "method.granularity=8", "method.latency_fraction=0.1"],
     ["method.latency_fraction=0.1 cannot be reached on hardware mobile_a78", "reachable range 0.25"]),
    ("haloc_no_rank_faster_than_dense", ["method=haloc"],
     ["no rank is cheaper than the dense conv on host_cpu", "method.lut_batch"]),
    ("unknown_torchvision_model", ["model=torchvision", "model.name=resnet999"],
     ["model.name='resnet999' is not a torchvision classification model", "resnet18"]),
    ("torchvision_model_too_big_for_the_images", ["model=torchvision", "model.name=inception_v3"],
     ["inception_v3 does not run on 8x8 inputs"]),
    ("gs_tile", ["method.pattern=gather_scatter:16:1:24"], ["tile T >= 0 that is a multiple of B/E"]),
    ("gs_on_a_layer_too_narrow", ["method.pattern=gather_scatter:16", "method.exclude=[classifier]"],
     ["method.pattern=gather_scatter:16 cannot hold on 1 layer(s), e.g. conv1", "9 columns", "method.exclude"]),
]


@pytest.fixture
def previous_run(tmp_path) -> Path:
    """An output dir holding an earlier result, which a rejected command must not touch."""
    out = tmp_path / "out"
    (out / ".hydra").mkdir(parents=True)
    (out / "results.json").write_text('{"status": "ok", "marker": 1}\n')
    (out / ".hydra" / "config.yaml").write_text("marker: 1\n")
    return out


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in ("compress-run.log", ".lock")}


@pytest.mark.parametrize(("overrides", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_paragraph(cli_forked, tmp_path, previous_run, overrides, fragments):
    (tmp_path / "garbage.ckpt").write_bytes(b"this is not a checkpoint")
    torch.save({"state_dict": {"net.conv.weight": torch.zeros(3, 3)}}, tmp_path / "foreign.ckpt")
    overrides = [o.format(garbage=tmp_path / "garbage.ckpt", foreign=tmp_path / "foreign.ckpt") for o in overrides]
    before = _digest(previous_run)
    proc = cli_forked(*FAST, *overrides, f"output_dir={previous_run}")
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    err = " ".join(proc.stderr.split())
    assert err.startswith("compress-run: error:"), err[:500]
    assert "Fix:" in err
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert _digest(previous_run) == before


def test_resume_with_different_settings_is_refused(cli_forked, tmp_path):
    cli = cli_forked
    out = tmp_path / "run"
    first = cli(*FAST, "method=magnitude", "stages=[train]", f"output_dir={out}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = _digest(out)
    second = cli(*FAST, "method=magnitude", "method.sparsity=0.5", f"output_dir={out}")
    assert second.returncode == EXIT_BAD_INPUT
    err = " ".join(second.stderr.split())
    assert "holds a run made with different settings" in err and "method.sparsity: 0.9 -> 0.5" in err
    assert _digest(out) == before


def test_corrupt_stage_checkpoint_on_resume(cli_forked, tmp_path):
    cli = cli_forked
    out = tmp_path / "run"
    assert cli(*FAST, "stages=[train]", f"output_dir={out}").returncode == 0
    ckpt = out / "checkpoints" / "train.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    before = _digest(out)
    proc = cli(*FAST, f"output_dir={out}")
    assert proc.returncode == EXIT_BAD_INPUT
    err = " ".join(proc.stderr.split())
    assert "the train checkpoint" in err and "is corrupt" in err and "redo the train stage" in err
    assert _digest(out) == before


@pytest.mark.parametrize("case", ["unknown_option", "exclude_matches_nothing"])
def test_the_installed_script_gives_what_the_forked_runs_check(cli, cli_forked, tmp_path, previous_run, case):
    """The cases above run ``main()`` in a forked child (to skip the import); the real script must agree."""
    overrides = next(c[1] for c in CASES if c[0] == case)
    script = cli(*FAST, *overrides, f"output_dir={previous_run}")
    forked = cli_forked(*FAST, *overrides, f"output_dir={previous_run}")
    assert (script.returncode, script.stderr) == (forked.returncode, forked.stderr) == (EXIT_BAD_INPUT, forked.stderr)


def test_start_from_a_run_of_other_settings_is_refused(cli_forked, tmp_path):
    import json

    from compress_run.pipeline.validate import fingerprint, result_config
    from tests.conftest import compose

    base = tmp_path / "base"
    cfg, _ = compose([*FAST, "method=magnitude", "method.sparsity=0.5"])
    (base / "stages").mkdir(parents=True)
    (base / "run.json").write_text(json.dumps({"fingerprint": fingerprint(cfg), "config": result_config(cfg)}))
    out = tmp_path / "out"
    proc = cli_forked(*FAST, "method=magnitude", "method.sparsity=0.9", "quant=w8a8", f"start_from={base}",
                      f"output_dir={out}")
    err = " ".join(proc.stderr.split())
    assert proc.returncode == EXIT_BAD_INPUT, err[-2000:]
    assert "was made with other settings than this run (method.sparsity: 0.5 -> 0.9)" in err
    assert not out.exists() or not any(out.rglob("*.ckpt"))
    same = cli_forked(*FAST, "method=magnitude", "method.sparsity=0.5", "quant=w8a8", f"start_from={base}",
                      f"output_dir={out}")  # same settings, but the base never finished its train stage
    assert same.returncode == EXIT_BAD_INPUT and "has not finished its train stage" in " ".join(same.stderr.split())
