"""Noise-injected training: the noise enters the training forward passes of the configured stages and layers
only (never validation, test or another stage), for method=noise_injection and for any method through the
noise group."""

from __future__ import annotations

import math

import pytest
import torch

from compress_run.methods.base import NotApplicable
from compress_run.methods.noise_injection import NoiseInjectionTraining
from compress_run.pipeline import lit_module
from tests.conftest import run_pipeline

# each key changes the network trained (tests/methods/test_config_keys.py flips them)
CONFIG_FLIPS = {"snr_db": ("10.0", []), "site": ("input", []), "weight_noise": ("0.1", []), "dac_bits": ("4", []),
                "adc_bits": ("4", []), "include": ("[fc]", []), "exclude": ("[fc]", [])}
FAST = ["dataset=digits", "debug=smoke", "logger=none", "evaluate.measure_latency=false"]


def _noisy_layers(net: torch.nn.Module) -> list[str]:
    return sorted(n for n, m in net.named_modules() if m._forward_hooks)


@pytest.fixture
def seen(monkeypatch):
    """(stage, step kind) -> the noisy layers seen at each step."""
    record: dict[tuple[str, str], list[list[str]]] = {}
    train, val = lit_module.ClassifierModule.training_step, lit_module.ClassifierModule.validation_step

    def spy_train(self, batch, batch_idx):
        record.setdefault((self.stage, "train"), []).append(_noisy_layers(self.net))
        return train(self, batch, batch_idx)

    def spy_val(self, batch, batch_idx):
        record.setdefault((getattr(self, "stage", "evaluate"), "val"), []).append(_noisy_layers(self.net))
        return val(self, batch, batch_idx)

    monkeypatch.setattr(lit_module.ClassifierModule, "training_step", spy_train)
    monkeypatch.setattr(lit_module.ClassifierModule, "validation_step", spy_val)
    return record


def test_method_trains_every_layer_under_noise_and_validates_without(seen, tmp_path):
    results = run_pipeline([*FAST, "method=noise_injection"], tmp_path)
    train_steps = seen[("train", "train")]
    assert train_steps and all(len(layers) == 20 for layers in train_steps)  # ResNet-20: 19 convs + the fc
    assert all(layers == [] for layers in seen[("train", "val")])
    assert results["method"]["training_noise"]["snr_db"] == 0.0


def test_noise_group_trains_only_the_configured_stage_and_layers_of_another_method(seen, tmp_path):
    run_pipeline([*FAST, "method=magnitude", "schedule.finetune.epochs=1", "noise=analog",
                  "noise.train_stages=[finetune]", "noise.include=[classifier]", "noise.train_snr_db=5"], tmp_path)
    assert all(layers == [] for layers in seen[("train", "train")])
    assert seen[("finetune", "train")] and all(layers == ["fc"] for layers in seen[("finetune", "train")])
    assert all(layers == [] for (stage, kind), steps in seen.items() if kind == "val" for layers in steps)


def test_the_training_noise_is_at_its_snr_in_the_training_pass(monkeypatch, tmp_path):
    """The fc output of each training step, a second noisy draw against the step's clean product: noise power over
    signal power pooled over the batch is the configured SNR."""
    ratios = []
    original = lit_module.ClassifierModule.training_step

    def spy(self, batch, batch_idx):
        fc = self.net.fc
        inputs = {}
        handle = fc.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0].detach()))
        out = original(self, batch, batch_idx)
        handle.remove()
        with torch.no_grad():
            clean = torch.nn.functional.linear(inputs["x"], fc.weight, fc.bias)
            noisy_out = fc(inputs["x"])  # the hooks are still on: another noisy draw of the same product
        ratios.append(((noisy_out - clean).pow(2).sum() / clean.pow(2).sum()).item())
        return out

    monkeypatch.setattr(lit_module.ClassifierModule, "training_step", spy)
    run_pipeline([*FAST, "method=noise_injection", "method.snr_db=3", "method.include=[fc]"], tmp_path)
    measured = -10 * math.log10(sum(ratios) / len(ratios))
    assert measured == pytest.approx(3.0, abs=0.3)


def test_a_setting_that_injects_nothing_or_no_layer_is_refused():
    net = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(NotApplicable, match="use method=dense"):
        NoiseInjectionTraining(_target_="x", snr_db=None).check_applicable(net)
    with pytest.raises(NotApplicable, match="exclude entry 'fc'"):
        NoiseInjectionTraining(_target_="x", exclude=["fc"]).check_applicable(net)
    with pytest.raises(ValueError, match="method.snr_db=nan"):
        NoiseInjectionTraining(_target_="x", snr_db=float("nan"))
